"""Validation of a parsed trajectory, with structured errors.

Each :class:`FormatError` names its rule, a path into the tree
(``block 2 > thread 1 > block 1``) and the token (or character, for text
trees) offset where the offending element starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from threadweaver_verl.format.tags import Tag
from threadweaver_verl.format.tree import Block, Marker, Outline, Outlines, Span, Stray, Thread, Trajectory, node_length

_NUMBER = re.compile(r"^\s*(\d{1,6})\s*:")

Decode = Callable[[Sequence[int]], str]

# Rule names (stable: tests, rewards and reports key on them).
STRAY_TAG = "stray_tag"
UNCLOSED = "unclosed"
NO_OUTLINES = "no_outlines"
MULTIPLE_OUTLINES = "multiple_outlines"
OUTLINES_AFTER_THREAD = "outlines_after_thread"
TEXT_IN_BLOCK = "text_in_block"
TEXT_IN_OUTLINES = "text_in_outlines"
OUTLINE_NUMBER = "outline_number"
OUTLINE_NUMBERING = "outline_numbering"
THREAD_NUMBER = "thread_number"
THREAD_NUMBERING = "thread_numbering"
TOO_MANY_THREADS = "too_many_threads"
TOO_DEEP = "too_deep"
THINK_ORDER = "think_order"


@dataclass(frozen=True)
class FormatError:
    rule: str
    message: str
    path: str
    offset: int

    def __str__(self) -> str:
        where = self.path or "top level"
        return f"[{self.rule}] at {where} (offset {self.offset}): {self.message}"


@dataclass(frozen=True)
class Limits:
    """Structural limits a valid trajectory keeps within."""

    max_threads_per_block: int = 16
    max_depth: int = 2  # 1 = no nesting; 2 = a thread may open one block


def content_text(content, decode: Decode | None) -> str:
    if isinstance(content, str):
        return content
    if decode is None:
        raise ValueError("an id tree needs `decode` to read outline/thread numbers")
    return decode(list(content))


def leading_number(body: tuple, decode: Decode | None) -> int | None:
    """The ``N:`` an outline or thread body starts with, or None."""
    if not body or not isinstance(body[0], Span):
        return None
    m = _NUMBER.match(content_text(body[0].content, decode))
    return int(m.group(1)) if m else None


def outline_numbers(block: Block, decode: Decode | None = None) -> list[int | None]:
    outlines = block.outlines
    return [] if outlines is None else [leading_number(o.body, decode) for o in outlines.outlines]


def _blank(span: Span, decode: Decode | None) -> bool:
    return content_text(span.content, decode).strip() == ""


def validate(
    traj: Trajectory, decode: Decode | None = None, limits: Limits = Limits(), length=len
) -> list[FormatError]:
    """All format errors of a trajectory (empty list = valid)."""
    errors: list[FormatError] = []
    state = {"offset": 0}

    def err(rule: str, msg: str, path: str, offset: int) -> None:
        errors.append(FormatError(rule, msg, path, offset))

    def advance(node) -> None:
        state["offset"] += node_length(node, length)

    def line(nodes: tuple, path: str, depth: int, top: bool) -> None:
        think_seen = think_closed = False
        nblocks = 0
        for n in nodes:
            start = state["offset"]
            if isinstance(n, Block):
                nblocks += 1
                block(n, f"{path} > block {nblocks}" if path else f"block {nblocks}", depth + 1)
                continue
            if isinstance(n, Stray):
                err(STRAY_TAG, f"{n.tag.value} is not allowed here", path, start)
            elif isinstance(n, Marker):
                if n.tag is Tag.THINK_OPEN:
                    if think_seen:
                        err(THINK_ORDER, "a second <think>", path, start)
                    think_seen = True
                else:
                    if not think_seen or think_closed:
                        err(THINK_ORDER, "</think> without an open <think>", path, start)
                    think_closed = True
            advance(n)
        if top and think_seen and not think_closed:
            err(UNCLOSED, "<think> is never closed", path, state["offset"])

    def block(b: Block, path: str, depth: int) -> None:
        start = state["offset"]
        if depth > limits.max_depth:
            err(TOO_DEEP, f"block nested {depth} deep; the limit is {limits.max_depth}", path, start)
        if not b.closed:
            err(UNCLOSED, "<Parallel> is never closed", path, start)
        state["offset"] += 1  # <Parallel>
        seen_outlines = 0
        seen_thread = False
        thread_nums: list[int | None] = []
        for p in b.parts:
            here = state["offset"]
            if isinstance(p, Span):
                if not _blank(p, None if isinstance(p.content, str) else decode):
                    err(TEXT_IN_BLOCK, "text outside outlines and threads inside <Parallel>", path, here)
                advance(p)
            elif isinstance(p, Stray):
                err(STRAY_TAG, f"{p.tag.value} is not allowed inside <Parallel>", path, here)
                advance(p)
            elif isinstance(p, Outlines):
                seen_outlines += 1
                if seen_outlines > 1:
                    err(MULTIPLE_OUTLINES, "a second <Outlines> in one block", path, here)
                if seen_thread:
                    err(OUTLINES_AFTER_THREAD, "<Outlines> after a <Thread>", path, here)
                outlines(p, path)
            elif isinstance(p, Thread):
                seen_thread = True
                k = len(thread_nums) + 1
                tpath = f"{path} > thread {k}"
                num = leading_number(p.body, decode)
                thread_nums.append(num)
                if num is None:
                    err(THREAD_NUMBER, "thread does not start with its number 'N:'", tpath, here)
                if not p.closed:
                    err(UNCLOSED, "<Thread> is never closed", tpath, here)
                state["offset"] += 1  # <Thread>
                line(p.body, tpath, depth, top=False)
                if p.closed:
                    state["offset"] += 1
        if b.closed:
            state["offset"] += 1
        if seen_outlines == 0:
            err(NO_OUTLINES, "block has no <Outlines>", path, start)
            return
        nums = outline_numbers(b, decode)
        if len(thread_nums) > limits.max_threads_per_block:
            err(
                TOO_MANY_THREADS,
                f"{len(thread_nums)} threads; the limit is {limits.max_threads_per_block}",
                path,
                start,
            )
        if nums and all(n is not None for n in nums) and nums != list(range(1, len(nums) + 1)):
            err(OUTLINE_NUMBERING, f"outlines are numbered {nums}, expected 1..{len(nums)}", path, start)
        if thread_nums != nums:
            err(THREAD_NUMBERING, f"threads are numbered {thread_nums} but outlines {nums}", path, start)

    def outlines(o: Outlines, path: str) -> None:
        if not o.closed:
            err(UNCLOSED, "<Outlines> is never closed", path, state["offset"])
        state["offset"] += 1
        k = 0
        for p in o.parts:
            here = state["offset"]
            if isinstance(p, Span):
                if not _blank(p, None if isinstance(p.content, str) else decode):
                    err(TEXT_IN_OUTLINES, "text between outlines", path, here)
            elif isinstance(p, Stray):
                err(STRAY_TAG, f"{p.tag.value} is not allowed inside <Outlines>", path, here)
            elif isinstance(p, Outline):
                k += 1
                opath = f"{path} > outline {k}"
                if not p.closed:
                    err(UNCLOSED, "<Outline> is never closed", opath, here)
                if leading_number(p.body, decode) is None:
                    err(OUTLINE_NUMBER, "outline does not start with its number 'N:'", opath, here)
                for q in p.body:
                    if isinstance(q, Stray):
                        err(STRAY_TAG, f"{q.tag.value} inside an outline", opath, here)
            advance(p)
        if o.closed:
            state["offset"] += 1

    line(traj.body, "", 0, top=True)
    return errors


def is_valid(traj: Trajectory, decode: Decode | None = None, limits: Limits = Limits()) -> bool:
    return not validate(traj, decode, limits)
