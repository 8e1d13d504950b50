"""Stage 1's strict checks of each LLM answer, and the assembly of the trajectory.

Every ``check_*`` function takes the JSON object an LLM step answered and either
returns the plan it describes or raises :class:`PlanError` with a message that
says what is wrong (sent back to the LLM once as a repair request, and recorded
as the rejection reason when the repair fails too). :func:`assemble` builds the
trajectory tree with the format module's nodes, and :func:`check_trajectory` is
step 5: the format module's parser and validator, the answer check, and, with a
tokenizer, the exact ids training will use.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from threadweaver_verl.format import (
    BlockLayout,
    Limits,
    Marker,
    NonCanonicalTrajectory,
    Span,
    Tag,
    TokenFormat,
    Trajectory,
    compute_stats,
    parse_text,
    render_text,
    validate,
)
from threadweaver_verl.format.tags import TAG_PATTERN
from threadweaver_verl.format.tree import parse_atoms
from threadweaver_verl.generator.inputs import SplitTrace


class PlanError(ValueError):
    """An LLM answer that does not meet its step's contract."""


# --------------------------------------------------------------------------- JSON

_FENCE = re.compile(r"^```(?:json)?\s*\n(.*)\n```$", re.DOTALL)


def parse_json_object(text: str | None) -> dict[str, Any]:
    """The JSON object of an answer: the whole answer, or one fenced ```json block and nothing else."""
    if text is None or not text.strip():
        raise PlanError("the answer is empty; a JSON object was expected")
    body = text.strip()
    m = _FENCE.match(body)
    if m:
        body = m.group(1).strip()
    try:
        obj = json.loads(body)
    except json.JSONDecodeError as e:
        raise PlanError(f"the answer is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise PlanError("the answer's JSON is nested too deeply") from None
    if not isinstance(obj, dict):
        raise PlanError(f"the answer is JSON {type(obj).__name__}, not an object")
    return obj


def _keys(obj: Any, required: set[str], where: str) -> None:
    if not isinstance(obj, dict):
        raise PlanError(f"{where} must be an object, got {type(obj).__name__}")
    missing = sorted(required - set(obj))
    extra = sorted(set(obj) - required)
    if missing:
        raise PlanError(f"{where} lacks key(s) {missing}")
    if extra:
        raise PlanError(f"{where} has unexpected key(s) {extra}; allowed: {sorted(required)}")


def _int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise PlanError(f"{where} must be an integer, got {json.dumps(v)}")
    return v


def _pair(v: Any, where: str) -> tuple[int, int]:
    if not isinstance(v, list) or len(v) != 2:
        raise PlanError(f"{where} must be a list [first, last], got {json.dumps(v)}")
    a, b = _int(v[0], where), _int(v[1], where)
    if a > b:
        raise PlanError(f"{where} = [{a}, {b}] runs backwards")
    return a, b


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise PlanError(f"{where} must be a list, got {type(v).__name__}")
    return v


def _text(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v.strip():
        raise PlanError(f"{where} must be a non-empty string")
    tags = sorted({m.group(0) for m in TAG_PATTERN.finditer(v)})
    if tags:
        raise PlanError(f"{where} contains the markup tag(s) {tags}, which are not allowed in text")
    return v.strip()


# --------------------------------------------------------------------------- step 1


@dataclass(frozen=True)
class Step:
    number: int  # 1-based
    first_unit: int  # 0-based, inclusive
    last_unit: int
    purpose: str
    relies_on: tuple[int, ...]  # 1-based step numbers, all smaller


def check_structure(obj: dict[str, Any], num_units: int) -> list[Step]:
    _keys(obj, {"steps"}, "the answer")
    raw = _list(obj["steps"], "'steps'")
    if not raw:
        raise PlanError("'steps' is empty")
    steps: list[Step] = []
    next_unit = 1
    for k, s in enumerate(raw, start=1):
        where = f"step {k}"
        _keys(s, {"step", "units", "purpose", "relies_on"}, where)
        if _int(s["step"], f"{where} 'step'") != k:
            raise PlanError(f"steps must be numbered 1, 2, 3, ...; entry {k} is numbered {s['step']}")
        a, b = _pair(s["units"], f"{where} 'units'")
        if a != next_unit:
            raise PlanError(
                f"{where} starts at unit {a}, but the next uncovered unit is {next_unit}; "
                "steps must cover the units in order without gaps or overlaps"
            )
        if b > num_units:
            raise PlanError(f"{where} ends at unit {b}, but there are only {num_units} units")
        relies = tuple(_int(r, f"{where} 'relies_on'") for r in _list(s["relies_on"], f"{where} 'relies_on'"))
        bad = [r for r in relies if not 1 <= r < k]
        if bad:
            raise PlanError(f"{where} relies on {bad}; a step may only rely on earlier steps (1..{k - 1})")
        purpose = s["purpose"]
        if not isinstance(purpose, str):
            raise PlanError(f"{where} 'purpose' must be a string")
        steps.append(Step(k, a - 1, b - 1, purpose.strip(), tuple(sorted(set(relies)))))
        next_unit = b + 1
    if next_unit != num_units + 1:
        raise PlanError(f"the steps end at unit {next_unit - 1}, but there are {num_units} units; cover all of them")
    return steps


# --------------------------------------------------------------------------- step 2


@dataclass(frozen=True)
class BlockPlan:
    threads: tuple[tuple[int, int], ...]  # (first step, last step), 1-based inclusive, per thread

    @property
    def first_step(self) -> int:
        return self.threads[0][0]

    @property
    def last_step(self) -> int:
        return self.threads[-1][1]


def check_blocks(obj: dict[str, Any], steps: Sequence[Step], max_threads: int) -> list[BlockPlan]:
    """Blocks in order, non-overlapping, 2..max_threads contiguous threads each, and no thread relying on a
    step of a sibling thread (by step 1's dependencies). An empty list is allowed here (the caller rejects)."""
    _keys(obj, {"blocks"}, "the answer")
    raw = _list(obj["blocks"], "'blocks'")
    plans: list[BlockPlan] = []
    after = 0  # last step used by the previous block
    for b, blk in enumerate(raw, start=1):
        where = f"block {b}"
        _keys(blk, {"threads"}, where)
        threads = [
            _pair(t, f"{where} thread {k}") for k, t in enumerate(_list(blk["threads"], f"{where} 'threads'"), start=1)
        ]
        if not 2 <= len(threads) <= max_threads:
            raise PlanError(f"{where} has {len(threads)} thread(s); a block needs 2 to {max_threads}")
        for k in range(1, len(threads)):
            if threads[k][0] != threads[k - 1][1] + 1:
                raise PlanError(
                    f"{where}: thread {k + 1} starts at step {threads[k][0]} but thread {k} ends at step "
                    f"{threads[k - 1][1]}; threads must follow each other without gaps"
                )
        if threads[0][0] <= after:
            raise PlanError(
                f"{where} starts at step {threads[0][0]}, inside or before the previous block "
                f"(which ends at step {after}); blocks must be in order and must not overlap"
            )
        if threads[-1][1] > len(steps):
            raise PlanError(f"{where} ends at step {threads[-1][1]}, but there are only {len(steps)} steps")
        owner = {s: k for k, (a, z) in enumerate(threads) for s in range(a, z + 1)}
        for k, (a, z) in enumerate(threads):
            for s in range(a, z + 1):
                for r in steps[s - 1].relies_on:
                    if r in owner and owner[r] != k:
                        raise PlanError(
                            f"{where}: step {s} (thread {k + 1}) relies on step {r}, which is in thread "
                            f"{owner[r] + 1} of the same block; threads must not rely on each other"
                        )
        plans.append(BlockPlan(tuple(threads)))
        after = threads[-1][1]
    return plans


# --------------------------------------------------------------------------- steps 3 and 4


def similarity(a: str, b: str) -> float:
    """Word-level similarity in [0, 1] (difflib ratio over whitespace-separated words)."""
    return difflib.SequenceMatcher(None, a.split(), b.split(), autojunk=False).ratio()


def _per_block(obj: dict[str, Any], key: str, shape: Sequence[int]) -> list[list[Any]]:
    _keys(obj, {"blocks"}, "the answer")
    raw = _list(obj["blocks"], "'blocks'")
    if len(raw) != len(shape):
        raise PlanError(f"the answer has {len(raw)} block(s); {len(shape)} were given")
    out = []
    for b, (blk, n) in enumerate(zip(raw, shape), start=1):
        _keys(blk, {key}, f"block {b}")
        items = _list(blk[key], f"block {b} '{key}'")
        if len(items) != n:
            raise PlanError(f"block {b} has {len(items)} {key}; it has {n} threads")
        out.append(items)
    return out


def check_edits(obj: dict[str, Any], originals: Sequence[Sequence[str]], min_similarity: float) -> list[list[str]]:
    """Edited thread texts, one per original thread; each must stay close to its original."""
    raw = _per_block(obj, "threads", [len(b) for b in originals])
    out: list[list[str]] = []
    for b, (texts, origs) in enumerate(zip(raw, originals), start=1):
        block: list[str] = []
        for t, (text, orig) in enumerate(zip(texts, origs), start=1):
            text = _text(text, f"block {b} thread {t}")
            sim = similarity(orig, text)
            if sim < min_similarity:
                raise PlanError(
                    f"block {b} thread {t} was rewritten, not minimally edited (word similarity "
                    f"{sim:.2f} < {min_similarity}); keep the original text and change only what "
                    "refers to sibling threads"
                )
            block.append(text)
        out.append(block)
    return out


def check_outlines(obj: dict[str, Any], shape: Sequence[int], max_chars: int) -> list[list[str]]:
    raw = _per_block(obj, "outlines", shape)
    out: list[list[str]] = []
    for b, items in enumerate(raw, start=1):
        block = []
        for t, item in enumerate(items, start=1):
            text = " ".join(_text(item, f"block {b} outline {t}").split())
            if len(text) > max_chars:
                raise PlanError(f"block {b} outline {t} has {len(text)} characters; keep it under {max_chars}")
            block.append(text)
        out.append(block)
    return out


# --------------------------------------------------------------------------- assembly


def unit_range(steps: Sequence[Step], first_step: int, last_step: int) -> tuple[int, int]:
    return steps[first_step - 1].first_unit, steps[last_step - 1].last_unit


def thread_texts(split: SplitTrace, steps: Sequence[Step], plans: Sequence[BlockPlan]) -> list[list[str]]:
    return [[split.join(*unit_range(steps, a, z)) for a, z in p.threads] for p in plans]


def text_before_blocks(split: SplitTrace, steps: Sequence[Step], plans: Sequence[BlockPlan]) -> list[str]:
    """The original reasoning before each block (what a thread's worker has read)."""
    return [
        split.join(0, unit_range(steps, p.first_step, p.last_step)[0] - 1)
        if unit_range(steps, p.first_step, p.last_step)[0] > 0
        else ""
        for p in plans
    ]


def assemble(
    split: SplitTrace,
    steps: Sequence[Step],
    plans: Sequence[BlockPlan],
    threads: Sequence[Sequence[str]],
    outlines: Sequence[Sequence[str]],
    final: str,
    layout: BlockLayout | None = None,
) -> Trajectory:
    """The parallel trajectory: ``<think>``, sequential text and blocks in trace order, ``</think>``, ``final``.
    Each block is the format's :meth:`BlockLayout.block_atoms` (``layout``: the TokenFormat's, so the text
    decodes from its own ids), thread ``k`` reading ``" " + threads[k-1]`` after its header. It is built
    from atoms, not parsed from text, so a tag hidden in a text shows as a mismatch in :func:`check_trajectory`."""
    layout = layout or BlockLayout()
    body: list = [Marker(Tag.THINK_OPEN)]
    pending = "\n"
    unit = 0
    for plan, ths, outs in zip(plans, threads, outlines):
        start, end = unit_range(steps, plan.first_step, plan.last_step)
        if start > unit:
            pending += split.join(unit, start - 1) + "\n"
        body.append(Span(pending))
        (block,) = parse_atoms(layout.block_atoms(outs, [" " + t for t in ths])).body
        body.append(block)
        pending = "\n"
        unit = end + 1
    if unit < len(split.units):
        pending += split.join(unit, len(split.units) - 1) + "\n"
    body += [Span(pending), Marker(Tag.THINK_CLOSE)]
    if final:
        body.append(Span("\n" + final))
    return Trajectory(tuple(body))


# --------------------------------------------------------------------------- step 5


@dataclass(frozen=True)
class Checked:
    text: str
    stats: dict[str, Any]
    stats_unit: str  # "tokens" with a tokenizer, else "chars"
    response_ids: list[int] | None


def check_trajectory(traj: Trajectory, limits: Limits, fmt: TokenFormat | None = None) -> Checked:
    """Step 5's format half: render, re-parse, validate, and (with ``fmt``) encode to the training ids.
    Raises :class:`PlanError` naming the first problems. (The answer half is the caller's: it is a
    math-verify call.)"""
    text = render_text(traj)
    reparsed = parse_text(text)
    if reparsed != traj:
        raise PlanError("the rendered text does not parse back into the assembled tree (a tag hides in the text)")
    errors = validate(reparsed, limits=limits)
    if errors:
        raise PlanError("format errors: " + "; ".join(str(e) for e in errors[:5]))
    if not reparsed.blocks:
        raise PlanError("the trajectory has no parallel block")
    ids = None
    if fmt is not None:
        from threadweaver_verl.data.chat import response_ids

        try:
            ids = response_ids(fmt, text)
        except NonCanonicalTrajectory as e:
            raise PlanError(f"the text cannot be encoded as a training trajectory: {e}") from None
        if fmt.decode(ids[:-1]) != text:
            raise PlanError("the training ids do not decode back to the text (the tokenizer is not lossless here)")
        stats = fmt.stats(ids[:-1])
        unit = "tokens"
    else:
        stats = compute_stats(reparsed)
        unit = "chars"
    return Checked(text, stats.as_dict(), unit, ids)
