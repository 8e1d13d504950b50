"""Stage-1 input: correct sequential traces, one ``(question, trace, answer)`` row each.

Read from ``.parquet``, ``.jsonl`` or ``.json`` (:func:`threadweaver_verl.data.schema.read_records`);
the column names are settings. A sample's id
is its ``id`` column when one is named, else a content hash of question and
trace, so ids stay stable across reruns and reorderings of the input file.

A trace is cut into *units* (paragraphs; lines when it has too few paragraphs):
the granularity at which the LLM marks steps and blocks. The cut keeps every
separator, so joining the units back gives the original reasoning exactly.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from threadweaver_verl.data.schema import SchemaError, read_records
from threadweaver_verl.format.tags import TAG_PATTERN, Tag
from threadweaver_verl.runs import UserError


class InputError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class SourceSample:
    id: str
    question: str
    trace: str
    answer: str
    index: int  # row number in the input file


@dataclass(frozen=True)
class SplitTrace:
    """A trace as reasoning units plus the final-answer text that follows the reasoning."""

    units: tuple[str, ...]  # stripped, non-empty
    seps: tuple[str, ...]  # seps[i] is the whitespace between units[i] and units[i + 1]
    final: str | None  # text after </think>, stripped; None when the trace has no </think>

    def join(self, first: int, last: int) -> str:
        """Units ``first..last`` (0-based, inclusive) with their original separators."""
        parts = []
        for i in range(first, last + 1):
            parts.append(self.units[i])
            if i < last:
                parts.append(self.seps[i])
        return "".join(parts)


def _field(row: dict[str, Any], name: str, path: Path, i: int) -> str:
    if name not in row:
        raise InputError(
            f"{path} row {i} has no column {name!r} (columns: {sorted(row)}); set the matching *_field setting"
        )
    value = row[name]
    if value is None or (isinstance(value, float) and value != value):
        raise InputError(f"{path} row {i}: column {name!r} is empty")
    return str(value)


def sample_id(question: str, trace: str) -> str:
    return hashlib.sha256(f"{question}\x00{trace}".encode()).hexdigest()[:16]


def load_samples(
    path: str,
    question_field: str = "question",
    trace_field: str = "trace",
    answer_field: str = "answer",
    id_field: str | None = None,
    limit: int | None = None,
) -> tuple[list[SourceSample], int]:
    """The samples of ``path`` and the number of exact duplicates dropped.

    Two rows with one explicit id but different content are an error; identical
    rows (same content hash) are one sample.
    """
    if limit is not None and limit < 0:
        raise InputError(f"limit={limit}: a count cannot be negative (0 means none; leave it unset for all)")
    p = Path(path)
    try:
        rows = read_records(p, "samples")
    except SchemaError as e:  # the file itself: missing, unsupported type, a line that is not JSON
        raise InputError(str(e)) from e
    out: list[SourceSample] = []
    seen: dict[str, SourceSample] = {}
    duplicates = 0
    for i, row in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        q = _field(row, question_field, p, i)
        t = _field(row, trace_field, p, i)
        a = _field(row, answer_field, p, i)
        sid = _field(row, id_field, p, i) if id_field else sample_id(q, t)
        s = SourceSample(sid, q, t, a, i)
        if sid in seen:
            prev = seen[sid]
            if (prev.question, prev.trace, prev.answer) != (q, t, a):
                raise InputError(f"{p}: rows {prev.index} and {i} share the id {sid!r} but differ; ids must be unique")
            duplicates += 1
            continue
        seen[sid] = s
        out.append(s)
    return out, duplicates


_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_LINE = re.compile(r"\n\s*")


def _cut(text: str, pattern: re.Pattern) -> tuple[list[str], list[str]]:
    units: list[str] = []
    seps: list[str] = []
    pos = 0
    for m in pattern.finditer(text):
        piece = text[pos : m.start()]
        if piece.strip():
            units.append(piece)
            seps.append(m.group(0))
        elif seps:  # an empty piece: fold its separator into the previous one
            seps[-1] += piece + m.group(0)
        pos = m.end()
    tail = text[pos:]
    if tail.strip():
        units.append(tail)
    elif seps:
        seps.pop()
    return units, seps


def split_trace(trace: str, min_units: int = 6) -> SplitTrace:
    """Cut a trace into reasoning units. Raises :class:`InputError` when it holds format tags
    other than a leading ``<think>`` and one ``</think>``."""
    text = trace.strip()
    if text.startswith(Tag.THINK_OPEN.value):
        text = text[len(Tag.THINK_OPEN.value) :]
    final: str | None = None
    if Tag.THINK_CLOSE.value in text:
        text, final = text.split(Tag.THINK_CLOSE.value, 1)
        final = final.strip()
    tags = sorted({m.group(0) for m in TAG_PATTERN.finditer(text + (final or ""))})
    if tags:
        raise InputError(f"the trace already holds format tags {tags}; stage 1 takes sequential traces only")
    text = text.strip()
    if not text:
        raise InputError("the trace has no reasoning text")
    units, seps = _cut(text, _PARAGRAPH)
    if len(units) < min_units:
        units, seps = _cut(text, _LINE)
    # Leading/trailing whitespace of a unit moves into the separators, so units are stripped.
    clean_units: list[str] = []
    clean_seps: list[str] = []
    for k, u in enumerate(units):
        lead = u[: len(u) - len(u.lstrip())]
        trail = u[len(u.rstrip()) :]
        if lead and clean_seps:
            clean_seps[-1] += lead
        clean_units.append(u.strip())
        if k < len(seps):
            clean_seps.append(trail + seps[k])
    return SplitTrace(tuple(clean_units), tuple(clean_seps), final)
