"""The token level of the format: one object that knows a tokenizer's tag ids, its EOS ids
and the exact ids fork/join inference inserts between model completions.

Both the fork/join controller and the request splitter (and so every training
path) build contexts ONLY with :meth:`TokenFormat.fork_context` and
:meth:`TokenFormat.join`; text is never re-tokenized as a whole. Text
trajectories (generated data) become ids through :meth:`TokenFormat.encode_tree`,
which encodes each piece separately in the same layout, and a text fragment (a
completion, a test's script) through :meth:`TokenFormat.fragment_ids`. The layout
itself (gaps, thread headers) is :class:`~threadweaver_verl.format.layout.BlockLayout`'s.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from threadweaver_verl.format.layout import BlockLayout
from threadweaver_verl.format.stats import TrajectoryStats, compute_stats
from threadweaver_verl.format.tags import Tag, TagVocab, TokenizerError
from threadweaver_verl.format.tree import (
    Atom,
    Block,
    Marker,
    Outlines,
    Span,
    Stray,
    Trajectory,
    iter_atoms,
    parse_ids,
    parse_text,
    text_atoms,
)
from threadweaver_verl.format.validation import FormatError, Limits, split_number, validate


class NonCanonicalTrajectory(ValueError):
    """A trajectory that fork/join inference could not have produced as it stands."""


@dataclass
class TokenFormat:
    vocab: TagVocab
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_ids: tuple[int, ...]
    """Every id that ends a response (see :func:`eos_token_ids`); the first is the tokenizer's own."""
    layout: BlockLayout = field(default_factory=BlockLayout)
    limits: Limits = field(default_factory=Limits)
    _layout_ids: dict[str, list[int]] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        limits: Limits | None = None,
        layout: BlockLayout | None = None,
        generation_config: Any = None,
    ) -> TokenFormat:
        """The format of a HF tokenizer. ``generation_config`` adds the model's EOS ids to the
        tokenizer's (:func:`eos_token_ids`; by default read from the tokenizer's folder)."""
        return cls(
            vocab=TagVocab.from_tokenizer(tokenizer),
            encode=lambda s: list(tokenizer.encode(s, add_special_tokens=False)),
            decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False),
            eos_ids=eos_token_ids(tokenizer, generation_config),
            layout=layout or BlockLayout(),
            limits=limits or Limits(),
        )

    # ------------------------------------------------------------------ pieces
    def tag_id(self, tag: Tag) -> int:
        return self.vocab.id(tag)

    def atom_ids(self, atoms: Iterable[Atom]) -> list[int]:
        """Ids of atoms: a tag is its id, each text is encoded on its own, a run of ids is kept."""
        return self._ids(atoms, self.encode)

    def fragment_ids(self, text: str) -> list[int]:
        """Ids of a text fragment (a completion, part of a trajectory): tags as their ids and the
        text between them encoded piece by piece, as inference and :meth:`encode_tree` produce them."""
        return self.atom_ids(text_atoms(text))

    def _ids(self, atoms: Iterable[Atom], encode: Callable[[str], list[int]]) -> list[int]:
        out: list[int] = []
        for a in atoms:
            if isinstance(a, Tag):  # (a Tag is a str too: test it first)
                out.append(self.vocab.id(a))
            elif isinstance(a, str):
                out += encode(a)
            else:
                out += a
        return out

    def _encode_layout(self, piece: str) -> list[int]:
        """Ids of a layout piece (a gap or a thread header): few distinct strings, encoded once each."""
        ids = self._layout_ids.get(piece)
        if ids is None:
            ids = self._layout_ids[piece] = self.encode(piece)
        return ids

    def thread_header(self, n: int) -> list[int]:
        """``<Thread>`` plus the encoded header of thread ``n`` (``\\nN:`` by default)."""
        return self._ids([Tag.THREAD_OPEN, self.layout.header(n)], self._encode_layout)

    @property
    def sequential_stop_ids(self) -> list[int]:
        """Stops of a main-line request: the end of an outline list, or EOS."""
        return [self.tag_id(Tag.OUTLINES_CLOSE), *self.eos_ids]

    @property
    def thread_stop_ids(self) -> list[int]:
        """Stops of a thread request: its end, a nested outline list, or EOS."""
        return [self.tag_id(Tag.THREAD_CLOSE), self.tag_id(Tag.OUTLINES_CLOSE), *self.eos_ids]

    def fork_context(self, shared: Sequence[int], n: int) -> list[int]:
        """The prompt of thread ``n``: the shared context (ending in ``</Outlines>``) plus its header."""
        return [*shared, *self._ids(self.layout.fork_atoms(n), self._encode_layout)]

    def join(self, shared: Sequence[int], threads: Sequence[tuple[int, Sequence[int]]]) -> list[int]:
        """Shared context + every (number, completion) thread in order + ``</Parallel>``."""
        atoms = self.layout.join_atoms((n, [tuple(completion)]) for n, completion in threads)
        return [*shared, *self._ids(atoms, self._encode_layout)]

    # ------------------------------------------------------------------ whole trajectories
    def parse(self, ids: Sequence[int]) -> Trajectory:
        return parse_ids(ids, self.vocab)

    def validate(self, traj: Trajectory | Sequence[int]) -> list[FormatError]:
        if not isinstance(traj, Trajectory):
            traj = self.parse(traj)
        return validate(traj, self.decode, self.limits)

    def stats(self, traj: Trajectory | Sequence[int]) -> TrajectoryStats:
        if not isinstance(traj, Trajectory):
            traj = self.parse(traj)
        return compute_stats(traj)

    def encode_text(self, text: str) -> list[int]:
        """Ids of a text trajectory in the layout inference produces (validates first)."""
        return self.encode_tree(parse_text(text))

    def encode_tree(self, traj: Trajectory) -> list[int]:
        errors = validate(traj, None, self.limits)
        if errors:
            raise NonCanonicalTrajectory("cannot encode an invalid trajectory: " + "; ".join(map(str, errors[:5])))
        return self._line_ids(traj.body)

    def _line_ids(self, nodes: tuple) -> list[int]:
        out: list[int] = []
        for n in nodes:
            if isinstance(n, Span):
                out += self.encode(n.content)
            elif isinstance(n, (Marker, Stray)):
                out.append(self.tag_id(n.tag))
            elif isinstance(n, Block):
                out += self._block_ids(n)
            else:  # pragma: no cover - the parser makes no other line nodes
                raise TypeError(type(n).__name__)
        return out

    def _block_ids(self, b: Block) -> list[int]:
        """A (valid) block as inference lays it out: the outline list as written, then :meth:`join` of
        its threads, each re-headed with :meth:`thread_header` and the rest of its text encoded."""
        k = next(i for i, p in enumerate(b.parts) if isinstance(p, Outlines))
        generated = self.atom_ids(a for p in b.parts[: k + 1] for a in iter_atoms(p))  # gaps, the outline list
        threads = []
        for t in b.threads:
            number, rest = split_number(t.body[0].content)
            completion = (self.encode(rest) if rest else []) + self._line_ids(t.body[1:])
            threads.append((number, completion + [self.tag_id(Tag.THREAD_CLOSE)]))
        return self.join([self.tag_id(Tag.PARALLEL_OPEN), *generated], threads)


def eos_token_ids(tokenizer: Any, generation_config: Any = None) -> tuple[int, ...]:
    """Every id that ends a response, as vLLM stops: the tokenizer's ``eos_token_id`` first, then each
    ``eos_token_id`` of the model's generation config (Qwen3's adds ``<|endoftext|>``), which vLLM adds
    to every request's stop ids.

    ``generation_config``: a ``transformers.GenerationConfig`` (or anything with ``eos_token_id``), a
    mapping, a model folder or hub id; None reads the tokenizer's own folder
    (``tokenizer.name_or_path``), which is the model's when they are saved together. A model without
    a generation config adds nothing, as in vLLM."""
    ids: list[int] = []
    first = _id_list(getattr(tokenizer, "eos_token_id", None))
    if not first:
        raise TokenizerError("the tokenizer has no eos_token_id; set one (e.g. '<|im_end|>') before using ThreadWeaver")
    source = generation_config if generation_config is not None else getattr(tokenizer, "name_or_path", None)
    for i in first + _id_list(_generation_eos(source)):
        if i not in ids:
            ids.append(i)
    return tuple(ids)


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _generation_eos(source: Any) -> Any:
    """The ``eos_token_id`` of a generation config given as an object, a mapping or where to load it."""
    if source is None or source == "":
        return None
    if isinstance(source, Mapping):
        return source.get("eos_token_id")
    if not isinstance(source, (str, os.PathLike)):
        return source.eos_token_id
    path = os.fspath(source)
    if os.path.isdir(path):
        file = os.path.join(path, "generation_config.json")
        if not os.path.isfile(file):
            return None
        with open(file, encoding="utf-8") as f:
            return json.load(f).get("eos_token_id")
    from transformers import GenerationConfig

    try:  # a hub id: the hub's (or the local cache's) generation_config.json, if the model has one
        return GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:
        return None
