"""The token level of the format: one object that knows a tokenizer's tag ids
and the exact ids fork/join inference inserts between model completions.

Both the fork/join controller and the request splitter (and so every training
path) build contexts ONLY with :meth:`TokenFormat.fork_context` and
:meth:`TokenFormat.join`; text is never re-tokenized as a whole. Text
trajectories (generated data) become ids through :meth:`TokenFormat.encode_tree`,
which encodes each piece separately in the same layout.

Layout of one block (the parts after ``</Outlines>`` are inserted by inference)::

    <Parallel>\\n<Outlines>\\n<Outline>1: a</Outline>\\n...</Outlines>   <- generated
    {fork_gap}<Thread>{header 1}                                       <- inserted
    ... thread 1's completion ... </Thread>                            <- generated
    {thread_sep}<Thread>{header 2} ... </Thread>
    {join_gap}</Parallel>                                              <- inserted
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from threadweaver_verl.format.stats import TrajectoryStats, compute_stats
from threadweaver_verl.format.tags import Tag, TagVocab
from threadweaver_verl.format.tree import (
    Block,
    Marker,
    Outlines,
    Span,
    Stray,
    Trajectory,
    parse_ids,
    parse_text,
    render_ids,
)
from threadweaver_verl.format.validation import FormatError, Limits, validate

_HEAD = re.compile(r"^\s*(\d{1,6})\s*:")


class NonCanonicalTrajectory(ValueError):
    """A trajectory that fork/join inference could not have produced as it stands."""


@dataclass
class TokenFormat:
    vocab: TagVocab
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    eos_ids: tuple[int, ...]
    fork_gap: str = "\n"
    thread_sep: str = "\n"
    join_gap: str = "\n"
    header_template: str = "\n{n}:"
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, limits: Limits | None = None, **layout: str) -> TokenFormat:
        vocab = TagVocab.from_tokenizer(tokenizer)
        eos = tokenizer.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        if not eos_ids:
            raise ValueError("the tokenizer has no eos_token_id; set one (e.g. '<|im_end|>') before using ThreadWeaver")
        return cls(
            vocab=vocab,
            encode=lambda s: list(tokenizer.encode(s, add_special_tokens=False)),
            decode=lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False),
            eos_ids=eos_ids,
            limits=limits or Limits(),
            **layout,
        )

    # ------------------------------------------------------------------ pieces
    def tag_id(self, tag: Tag) -> int:
        return self.vocab.id(tag)

    @functools.cached_property
    def _fork_gap_ids(self) -> list[int]:
        return self.encode(self.fork_gap)

    @functools.cached_property
    def _sep_ids(self) -> list[int]:
        return self.encode(self.thread_sep)

    @functools.cached_property
    def _join_gap_ids(self) -> list[int]:
        return self.encode(self.join_gap)

    def thread_header(self, n: int) -> list[int]:
        """``<Thread>`` plus the encoded ``\\nN:`` header of thread ``n``."""
        return [self.tag_id(Tag.THREAD_OPEN)] + self.encode(self.header_template.format(n=n))

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
        return [*shared, *self._fork_gap_ids, *self.thread_header(n)]

    def join(self, shared: Sequence[int], threads: Sequence[tuple[int, Sequence[int]]]) -> list[int]:
        """Shared context + every (number, completion) thread in order + ``</Parallel>``."""
        out = [*shared, *self._fork_gap_ids]
        for k, (n, completion) in enumerate(threads):
            if k:
                out += self._sep_ids
            out += self.thread_header(n)
            out += list(completion)
        out += self._join_gap_ids
        out.append(self.tag_id(Tag.PARALLEL_CLOSE))
        return out

    # ------------------------------------------------------------------ whole trajectories
    def parse(self, ids: Sequence[int]) -> Trajectory:
        return parse_ids(ids, self.vocab)

    def render(self, traj: Trajectory) -> list[int]:
        return render_ids(traj, self.vocab)

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
        out: list[int] = []
        self._encode_line(traj.body, out)
        return out

    def _encode_line(self, nodes: tuple, out: list[int]) -> None:
        for n in nodes:
            if isinstance(n, Span):
                out += self.encode(n.content)
            elif isinstance(n, (Marker, Stray)):
                out.append(self.tag_id(n.tag))
            elif isinstance(n, Block):
                self._encode_block(n, out)
            else:  # pragma: no cover - the parser makes no other line nodes
                raise TypeError(type(n).__name__)

    def _encode_block(self, b: Block, out: list[int]) -> None:
        out.append(self.tag_id(Tag.PARALLEL_OPEN))
        k = next(i for i, p in enumerate(b.parts) if isinstance(p, Outlines))
        for p in b.parts[: k + 1]:  # generated as written: gaps, the outline list
            out += render_ids_text(p, self)
        out += self._fork_gap_ids
        for j, t in enumerate(b.threads):
            if j:
                out += self._sep_ids
            first = t.body[0].content
            m = _HEAD.match(first)
            out += self.thread_header(int(m.group(1)))
            rest = first[m.end() :]
            if rest:
                out += self.encode(rest)
            self._encode_line(t.body[1:], out)
            out.append(self.tag_id(Tag.THREAD_CLOSE))
        out += self._join_gap_ids
        out.append(self.tag_id(Tag.PARALLEL_CLOSE))


def render_ids_text(node, fmt: TokenFormat) -> list[int]:
    """Ids of a text node with each content run encoded on its own (tags as ids)."""
    from threadweaver_verl.format.tree import iter_atoms

    out: list[int] = []
    for a in iter_atoms(node):
        out += [fmt.tag_id(a)] if isinstance(a, Tag) else fmt.encode(a)
    return out
