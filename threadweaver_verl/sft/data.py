"""SFT data: parquet rows -> Requests -> training rows (tries or Request chains).

Schema: :mod:`threadweaver_verl.data.schema`'s SFT rows, one trajectory each:
``prompt`` (chat messages), ``response`` (the trajectory text WITHOUT the EOS;
:func:`threadweaver_verl.data.chat.response_ids` appends it), ``data_source``,
``extra_info``. Prompts and responses
become ids ONLY through :mod:`threadweaver_verl.data.chat`; Requests ONLY
through :func:`threadweaver_verl.format.split_requests`.

Layouts:
* ``trie``     - one trie per trajectory, tries packed block-diagonally into rows of
  at most ``max_tokens`` tokens;
* ``expanded`` - one chain per Request (context + completion, loss on the
  completion); :func:`build_rows` packs the chains too (the verl dataset keeps one
  Request per row and lets verl pack).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from threadweaver_verl.data.chat import prompt_ids, response_ids
from threadweaver_verl.data.schema import read_sft
from threadweaver_verl.format import NonCanonicalTrajectory, Request, TokenFormat, split_requests
from threadweaver_verl.runs import UserError
from threadweaver_verl.sft.trie import Trie, build_trie, chain, pack


class Layout(enum.StrEnum):
    """How trajectories become training rows (``SFTConfig.layout``)."""

    TRIE = "trie"  # one trie per trajectory: each shared context once
    EXPANDED = "expanded"  # one causal chain per Request


class SFTDataError(UserError, ValueError):
    """SFT data or a data setting is wrong (the message names the row or setting and the fix)."""


@dataclass(frozen=True)
class SFTExample:
    source: str  # "file.parquet:row"
    requests: tuple[Request, ...]


def example_requests(tokenizer: Any, fmt: TokenFormat, messages: Any, response: str, source: str = "") -> list[Request]:
    """The Requests of one (prompt messages, response text) pair."""
    if not isinstance(response, str):
        raise SFTDataError(f"{source}: response must be the trajectory text, got {type(response).__name__}")
    msgs = list(messages) if not isinstance(messages, str) else [{"role": "user", "content": messages}]
    try:
        p = prompt_ids(tokenizer, msgs)
        r = response_ids(fmt, response)
        return split_requests(p, r, fmt)
    except NonCanonicalTrajectory as e:
        raise SFTDataError(
            f"{source}: not a valid trajectory: {e}. Fix or drop this sample "
            "(validate with threadweaver_verl.format.validate)."
        ) from e


def load_examples(
    files: str | Sequence[str], tokenizer: Any, fmt: TokenFormat | None = None, max_samples: int = -1
) -> list[SFTExample]:
    """Read SFT parquet files (checked by :func:`threadweaver_verl.data.schema.read_sft`) into Requests."""
    fmt = fmt or TokenFormat.from_tokenizer(tokenizer)
    paths = [files] if isinstance(files, (str, Path)) else list(files)
    if not paths:
        raise SFTDataError("no SFT data files given")
    out: list[SFTExample] = []
    for path in paths:
        path = str(Path(str(path)).expanduser())
        for i, row in enumerate(read_sft(path, eos_token=getattr(tokenizer, "eos_token", None))):
            source = f"{path}:{i}"
            out.append(
                SFTExample(source, tuple(example_requests(tokenizer, fmt, row["prompt"], row["response"], source)))
            )
            if 0 < max_samples <= len(out):
                return out
    return out


def example_tries(examples: Iterable[SFTExample], layout: str) -> list[Trie]:
    """One trie per trajectory (``trie``) or one chain per Request (``expanded``)."""
    if layout not in tuple(Layout):
        raise SFTDataError(f"layout must be one of {[x.value for x in Layout]}, got {layout!r}")
    if layout == Layout.TRIE:
        return [build_trie(e.requests) for e in examples]
    return [chain(r) for e in examples for r in e.requests if r.completion_ids]


def build_rows(examples: Sequence[SFTExample], layout: str, max_tokens: int, pack_rows: bool = True) -> list[Trie]:
    """Training rows: tries (or Request chains) packed up to ``max_tokens`` tokens each, or one per row
    (``pack_rows=False``; still at most ``max_tokens``)."""
    tries = example_tries(examples, layout)
    if layout == Layout.TRIE:
        for e, t in zip(examples, tries):
            if len(t) > max_tokens:
                raise SFTDataError(
                    f"{e.source}: its trie has {len(t)} tokens, more than the row budget "
                    f"{max_tokens}; raise the budget (max_tokens / data.max_length)"
                )
    if not pack_rows:
        for t in tries:
            if len(t) > max_tokens:
                raise SFTDataError(
                    f"a training row needs {len(t)} tokens, more than max_tokens={max_tokens}; raise the budget"
                )
        return tries
    return [row for row, _ in pack(tries, max_tokens)]
