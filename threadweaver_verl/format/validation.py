"""Validation of a parsed trajectory, with structured errors.

Each :class:`FormatError` names its rule, a path into the tree
(``block 2 > thread 1 > block 1``) and the token (or character, for text
trees) offset where the offending element starts.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from threadweaver_verl.format.tags import Tag
from threadweaver_verl.format.tree import Block, Marker, Outline, Outlines, Span, Stray, Thread, Trajectory, node_length

_NUMBER = re.compile(r"^\s*(\d{1,6})\s*:")

Decode = Callable[[Sequence[int]], str]


class Rule(enum.StrEnum):
    """The name of each format rule (stable strings: tests, rewards and reports key on them)."""

    STRAY_TAG = "stray_tag"
    UNCLOSED = "unclosed"
    NO_OUTLINES = "no_outlines"
    EMPTY_BLOCK = "empty_block"
    SINGLE_THREAD_BLOCK = "single_thread_block"
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
    rule: Rule
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
    single_thread_blocks: bool = False
    """Whether a block of one thread is valid. It parallelises nothing (its critical path is all of
    it), so by default it is a format error (``single_thread_block``) and counts as no block anywhere
    validity is asked (generator stage 2's ``min_blocks``, the reward's format check). A block with
    no outline and no thread is never valid (``empty_block``)."""


def split_number(text: str) -> tuple[int, str] | None:
    """``(N, the text after "N:")`` when ``text`` starts with an outline's or thread's number ``N:``,
    else None: the one reading of that number in the project."""
    m = _NUMBER.match(text)
    return (int(m.group(1)), text[m.end() :]) if m else None


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
    number = split_number(content_text(body[0].content, decode))
    return number[0] if number else None


def outline_numbers(block: Block, decode: Decode | None = None) -> list[int | None]:
    outlines = block.outlines
    return [] if outlines is None else [leading_number(o.body, decode) for o in outlines.outlines]


def validate(
    traj: Trajectory, decode: Decode | None = None, limits: Limits = Limits(), length=len
) -> list[FormatError]:
    """All format errors of a trajectory (empty list = valid)."""
    return TrajectoryValidator(decode, limits, length).run(traj)


class TrajectoryValidator:
    """One validation pass over a trajectory: walks the tree in order, keeping the offset of the
    element it is at, and collects every :class:`FormatError`."""

    def __init__(self, decode: Decode | None, limits: Limits, length=len):
        self.decode = decode
        self.limits = limits
        self.length = length
        self.offset = 0
        self.errors: list[FormatError] = []

    def run(self, traj: Trajectory) -> list[FormatError]:
        self.line(traj.body, "", 0, top=True)
        return self.errors

    def error(self, rule: Rule, message: str, path: str, offset: int) -> None:
        self.errors.append(FormatError(rule, message, path, offset))

    def advance(self, node) -> None:
        self.offset += node_length(node, self.length)

    def blank(self, span: Span) -> bool:
        return content_text(span.content, None if isinstance(span.content, str) else self.decode).strip() == ""

    def line(self, nodes: tuple, path: str, depth: int, top: bool) -> None:
        """The main line (``top``) or a thread's body."""
        think_seen = think_closed = False
        nblocks = 0
        for n in nodes:
            start = self.offset
            if isinstance(n, Block):
                nblocks += 1
                self.block(n, f"{path} > block {nblocks}" if path else f"block {nblocks}", depth + 1)
                continue
            if isinstance(n, Stray):
                self.error(Rule.STRAY_TAG, f"{n.tag.value} is not allowed here", path, start)
            elif isinstance(n, Marker):
                if n.tag is Tag.THINK_OPEN:
                    if think_seen:
                        self.error(Rule.THINK_ORDER, "a second <think>", path, start)
                    think_seen = True
                else:
                    if not think_seen or think_closed:
                        self.error(Rule.THINK_ORDER, "</think> without an open <think>", path, start)
                    think_closed = True
            self.advance(n)
        if top and think_seen and not think_closed:
            self.error(Rule.UNCLOSED, "<think> is never closed", path, self.offset)

    def block(self, b: Block, path: str, depth: int) -> None:
        start = self.offset
        limits = self.limits
        if depth > limits.max_depth:
            self.error(Rule.TOO_DEEP, f"block nested {depth} deep; the limit is {limits.max_depth}", path, start)
        if not b.closed:
            self.error(Rule.UNCLOSED, "<Parallel> is never closed", path, start)
        self.offset += 1  # <Parallel>
        seen_outlines = 0
        seen_thread = False
        thread_nums: list[int | None] = []
        for p in b.parts:
            here = self.offset
            if isinstance(p, Span):
                if not self.blank(p):
                    self.error(Rule.TEXT_IN_BLOCK, "text outside outlines and threads inside <Parallel>", path, here)
                self.advance(p)
            elif isinstance(p, Stray):
                self.error(Rule.STRAY_TAG, f"{p.tag.value} is not allowed inside <Parallel>", path, here)
                self.advance(p)
            elif isinstance(p, Outlines):
                seen_outlines += 1
                if seen_outlines > 1:
                    self.error(Rule.MULTIPLE_OUTLINES, "a second <Outlines> in one block", path, here)
                if seen_thread:
                    self.error(Rule.OUTLINES_AFTER_THREAD, "<Outlines> after a <Thread>", path, here)
                self.outlines(p, path)
            elif isinstance(p, Thread):
                seen_thread = True
                tpath = f"{path} > thread {len(thread_nums) + 1}"
                num = leading_number(p.body, self.decode)
                thread_nums.append(num)
                if num is None:
                    self.error(Rule.THREAD_NUMBER, "thread does not start with its number 'N:'", tpath, here)
                if not p.closed:
                    self.error(Rule.UNCLOSED, "<Thread> is never closed", tpath, here)
                self.offset += 1  # <Thread>
                self.line(p.body, tpath, depth, top=False)
                if p.closed:
                    self.offset += 1
        if b.closed:
            self.offset += 1
        if seen_outlines == 0:
            self.error(Rule.NO_OUTLINES, "block has no <Outlines>", path, start)
            return
        nums = outline_numbers(b, self.decode)
        if not nums and not thread_nums:
            self.error(Rule.EMPTY_BLOCK, "block has no outline and no thread", path, start)
        if len(thread_nums) == 1 and not limits.single_thread_blocks:
            self.error(
                Rule.SINGLE_THREAD_BLOCK,
                "block has one thread, which parallelises nothing (Limits.single_thread_blocks=False)",
                path,
                start,
            )
        if len(thread_nums) > limits.max_threads_per_block:
            self.error(
                Rule.TOO_MANY_THREADS,
                f"{len(thread_nums)} threads; the limit is {limits.max_threads_per_block}",
                path,
                start,
            )
        if nums and all(n is not None for n in nums) and nums != list(range(1, len(nums) + 1)):
            self.error(Rule.OUTLINE_NUMBERING, f"outlines are numbered {nums}, expected 1..{len(nums)}", path, start)
        if thread_nums != nums:
            self.error(Rule.THREAD_NUMBERING, f"threads are numbered {thread_nums} but outlines {nums}", path, start)

    def outlines(self, o: Outlines, path: str) -> None:
        if not o.closed:
            self.error(Rule.UNCLOSED, "<Outlines> is never closed", path, self.offset)
        self.offset += 1
        k = 0
        for p in o.parts:
            here = self.offset
            if isinstance(p, Span):
                if not self.blank(p):
                    self.error(Rule.TEXT_IN_OUTLINES, "text between outlines", path, here)
            elif isinstance(p, Stray):
                self.error(Rule.STRAY_TAG, f"{p.tag.value} is not allowed inside <Outlines>", path, here)
            elif isinstance(p, Outline):
                k += 1
                opath = f"{path} > outline {k}"
                if not p.closed:
                    self.error(Rule.UNCLOSED, "<Outline> is never closed", opath, here)
                if leading_number(p.body, self.decode) is None:
                    self.error(Rule.OUTLINE_NUMBER, "outline does not start with its number 'N:'", opath, here)
                for q in p.body:
                    if isinstance(q, Stray):
                        self.error(Rule.STRAY_TAG, f"{q.tag.value} inside an outline", opath, here)
            self.advance(p)
        if o.closed:
            self.offset += 1


def is_valid(traj: Trajectory, decode: Decode | None = None, limits: Limits = Limits()) -> bool:
    return not validate(traj, decode, limits)
