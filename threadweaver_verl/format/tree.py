"""The trajectory tree, its lossless parser and its renderer.

One parser (:class:`Parser`) serves text and token ids: both are first cut into
*atoms*, each a :class:`Tag` or a run of content (a ``str`` for text, a
``tuple[int, ...]`` of token ids for ids). It reads atoms one at a time and can
be fed more later (the fork/join controller feeds it each completion). It never
raises: a tag out of place becomes a :class:`Stray` node and an unclosed element
is kept with ``closed=False``, so
``render(parse(x)) == x`` for ANY input and ``parse(render(t)) == t`` for any
tree the parser can produce. Whether a tree is a *valid* trajectory is the
validator's question (:mod:`threadweaver_verl.format.validate`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Union

from threadweaver_verl.format.tags import TAG_PATTERN, Tag, TagVocab, tag_of_string

Content = Union[str, tuple]  # str for text trees, tuple[int, ...] for id trees
Atom = Union[Tag, str, tuple]

# Nesting beyond this is parsed as stray tags, so that untrusted input can never
# exhaust the stack. The validator's own depth limit is far lower.
HARD_MAX_DEPTH = 64


@dataclass(frozen=True)
class Span:
    """Content with no tags in it."""

    content: Content


@dataclass(frozen=True)
class Stray:
    """A tag where the grammar does not allow it (kept so rendering is lossless)."""

    tag: Tag


@dataclass(frozen=True)
class Marker:
    """``<think>`` or ``</think>`` on the main line."""

    tag: Tag


@dataclass(frozen=True)
class Outline:
    body: tuple  # of Span | Stray
    closed: bool = True


@dataclass(frozen=True)
class Outlines:
    parts: tuple  # of Span | Stray | Outline
    closed: bool = True

    @property
    def outlines(self) -> tuple[Outline, ...]:
        return tuple(p for p in self.parts if isinstance(p, Outline))


@dataclass(frozen=True)
class Thread:
    body: tuple  # of Span | Stray | Marker | Block (a nested block)
    closed: bool = True


@dataclass(frozen=True)
class Block:
    """``<Parallel> ... </Parallel>``: an outline list and its threads."""

    parts: tuple  # of Span | Stray | Outlines | Thread
    closed: bool = True

    @property
    def outlines(self) -> Outlines | None:
        return next((p for p in self.parts if isinstance(p, Outlines)), None)

    @property
    def threads(self) -> tuple[Thread, ...]:
        return tuple(p for p in self.parts if isinstance(p, Thread))


@dataclass(frozen=True)
class Trajectory:
    """A whole response: sequential spans, markers and blocks."""

    body: tuple  # of Span | Stray | Marker | Block

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(n for n in self.body if isinstance(n, Block))


Node = Union[Span, Stray, Marker, Outline, Outlines, Thread, Block]


# --------------------------------------------------------------------------- atoms


def text_atoms(text: str) -> list[Atom]:
    """Cut text into tags and the content runs between them."""
    atoms: list[Atom] = []
    pos = 0
    for m in TAG_PATTERN.finditer(text):
        if m.start() > pos:
            atoms.append(text[pos : m.start()])
        atoms.append(tag_of_string(m.group(0)))
        pos = m.end()
    if pos < len(text):
        atoms.append(text[pos:])
    return atoms


def id_atoms(ids: Sequence[int], vocab: TagVocab) -> list[Atom]:
    """Cut token ids into tags and the runs of other ids between them."""
    if not isinstance(ids, (list, tuple)):  # an array or a tensor: plain ints, so that ids hash as ids
        ids = [int(i) for i in ids]
    by_id = vocab.tags_by_id
    atoms: list[Atom] = []
    start = 0
    for pos in [pos for pos, i in enumerate(ids) if i in by_id]:  # (the tags are few: find them first)
        if pos > start:
            atoms.append(tuple(map(int, ids[start:pos])))
        atoms.append(by_id[ids[pos]])
        start = pos + 1
    if start < len(ids):
        atoms.append(tuple(map(int, ids[start:])))
    return atoms


# --------------------------------------------------------------------------- parser


class _Open(enum.Enum):
    """The kinds of element the parser can be inside of."""

    TOP = "top"  # the main line: never ends
    THREAD = "thread"
    BLOCK = "block"
    OUTLINES = "outlines"
    OUTLINE = "outline"


class _Frame:
    """An open element: its kind, its nesting depth (blocks) and the nodes read into it so far."""

    __slots__ = ("kind", "depth", "items")

    def __init__(self, kind: _Open, depth: int, items: list):
        self.kind, self.depth, self.items = kind, depth, items


def _closed_node(kind: _Open, items: tuple, closed: bool) -> Node:
    if kind is _Open.THREAD:
        return Thread(items, closed)
    if kind is _Open.BLOCK:
        return Block(items, closed)
    if kind is _Open.OUTLINES:
        return Outlines(items, closed)
    return Outline(items, closed)


_ENDS_OUTLINE = frozenset({Tag.OUTLINE_OPEN, Tag.OUTLINES_CLOSE, Tag.THREAD_OPEN, Tag.PARALLEL_CLOSE})
_ENDS_OUTLINES = frozenset({Tag.THREAD_OPEN, Tag.PARALLEL_CLOSE})  # (and a thread's body)
_THINK = frozenset({Tag.THINK_OPEN, Tag.THINK_CLOSE})


class Parser:
    """The parser of the format: reads atoms left to right, one at a time, and never looks back, so more
    atoms can be fed at any time. :meth:`tree` is the tree of everything fed so far (an element still
    open is ``closed=False``); :func:`parse_atoms` is ``Parser().feed(atoms).tree()``.

    The fork/join controller keeps one per line and feeds it each completion instead of re-reading the
    line's context; :meth:`copy` reads a continuation without changing this one (a what-if), at the cost
    of the open elements' node lists, not of what was read.

    A tag out of place becomes a :class:`Stray` node; a tag that ends open elements without their
    closing tag (``<Outline>`` inside an open outline, ``<Thread>`` inside an open thread, ...) closes
    them as ``closed=False`` and is recorded (:meth:`first_ended_open`)."""

    __slots__ = ("_stack", "length", "_ended_open")

    def __init__(self) -> None:
        self._stack = [_Frame(_Open.TOP, 0, [])]
        self.length = 0
        """Size of what was fed, in content units (token ids or characters); a tag counts 1."""
        self._ended_open: list[tuple[int, Node]] = []

    def copy(self) -> Parser:
        """An independent parser at the same point."""
        other = type(self).__new__(type(self))
        other._stack = [_Frame(f.kind, f.depth, list(f.items)) for f in self._stack]
        other.length = self.length
        other._ended_open = list(self._ended_open)
        return other

    def feed(self, atoms: Iterable[Atom]) -> Parser:
        """Read ``atoms``; returns self."""
        for atom in atoms:
            if isinstance(atom, Tag):  # (a Tag is a str too: test it first)
                self._tag(atom)
                self.length += 1
            else:
                items = self._stack[-1].items
                # merge adjacent content, so that one run of text is one Span
                if items and isinstance(items[-1], Span):
                    items[-1] = Span(items[-1].content + atom)
                else:
                    items.append(Span(atom))
                self.length += len(atom)
        return self

    def tree(self) -> Trajectory:
        """The tree of everything fed so far; the elements still open are ``closed=False``."""
        child = None
        for frame in reversed(self._stack[1:]):
            child = _closed_node(frame.kind, tuple(frame.items) if child is None else (*frame.items, child), False)
        top = self._stack[0].items
        return Trajectory(tuple(top) if child is None else (*top, child))

    def first_ended_open(self, from_offset: int) -> tuple[int, list[Node]] | None:
        """The first offset >= ``from_offset`` holding a tag that ended elements without their closing
        tag, and those elements, innermost first (None when no tag there did)."""
        first = next((offset for offset, _ in self._ended_open if offset >= from_offset), None)
        if first is None:
            return None
        return first, [node for offset, node in self._ended_open if offset == first]

    def _tag(self, tag: Tag) -> None:
        stack = self._stack
        while True:
            frame = stack[-1]
            kind = frame.kind
            if kind is _Open.TOP or kind is _Open.THREAD:
                in_thread = kind is _Open.THREAD
                if tag is Tag.PARALLEL_OPEN and frame.depth < HARD_MAX_DEPTH:
                    stack.append(_Frame(_Open.BLOCK, frame.depth + 1, []))
                elif tag in _THINK:
                    frame.items.append(Stray(tag) if in_thread else Marker(tag))
                elif in_thread and tag is Tag.THREAD_CLOSE:
                    self._close(True)
                elif in_thread and tag in _ENDS_OUTLINES:
                    self._close(False)
                    continue  # the enclosing block reads it
                else:
                    frame.items.append(Stray(tag))
            elif kind is _Open.BLOCK:
                if tag is Tag.OUTLINES_OPEN:
                    stack.append(_Frame(_Open.OUTLINES, frame.depth, []))
                elif tag is Tag.THREAD_OPEN:
                    stack.append(_Frame(_Open.THREAD, frame.depth, []))
                elif tag is Tag.PARALLEL_CLOSE:
                    self._close(True)
                else:
                    frame.items.append(Stray(tag))
            elif kind is _Open.OUTLINES:
                if tag is Tag.OUTLINE_OPEN:
                    stack.append(_Frame(_Open.OUTLINE, frame.depth, []))
                elif tag is Tag.OUTLINES_CLOSE:
                    self._close(True)
                elif tag in _ENDS_OUTLINES:
                    self._close(False)
                    continue
                else:
                    frame.items.append(Stray(tag))
            else:  # an outline
                if tag is Tag.OUTLINE_CLOSE:
                    self._close(True)
                elif tag in _ENDS_OUTLINE:
                    self._close(False)
                    continue
                else:
                    frame.items.append(Stray(tag))
            return

    def _close(self, closed: bool) -> None:
        frame = self._stack.pop()
        node = _closed_node(frame.kind, tuple(frame.items), closed)
        self._stack[-1].items.append(node)
        if not closed:  # ended by the tag being read, at offset self.length
            self._ended_open.append((self.length, node))


def parse_atoms(atoms: Iterable[Atom]) -> Trajectory:
    """The tree of ``atoms``. Never raises; see :func:`validate` for errors."""
    return Parser().feed(atoms).tree()


def parse_text(text: str) -> Trajectory:
    """Parse a response's text. Never raises; see :func:`validate` for errors."""
    return parse_atoms(text_atoms(text))


def parse_ids(ids: Sequence[int], vocab: TagVocab) -> Trajectory:
    """Parse a response's token ids. Never raises; see :func:`validate` for errors."""
    return parse_atoms(id_atoms(ids, vocab))


# --------------------------------------------------------------------------- render


def iter_atoms(node) -> Iterator[Atom]:
    """The atoms of a tree or node, in order (inverse of the parser)."""
    if isinstance(node, Span):
        yield node.content
    elif isinstance(node, (Stray, Marker)):
        yield node.tag
    elif isinstance(node, Trajectory):
        for n in node.body:
            yield from iter_atoms(n)
    elif isinstance(node, Block):
        yield Tag.PARALLEL_OPEN
        for n in node.parts:
            yield from iter_atoms(n)
        if node.closed:
            yield Tag.PARALLEL_CLOSE
    elif isinstance(node, Outlines):
        yield Tag.OUTLINES_OPEN
        for n in node.parts:
            yield from iter_atoms(n)
        if node.closed:
            yield Tag.OUTLINES_CLOSE
    elif isinstance(node, Outline):
        yield Tag.OUTLINE_OPEN
        for n in node.body:
            yield from iter_atoms(n)
        if node.closed:
            yield Tag.OUTLINE_CLOSE
    elif isinstance(node, Thread):
        yield Tag.THREAD_OPEN
        for n in node.body:
            yield from iter_atoms(n)
        if node.closed:
            yield Tag.THREAD_CLOSE
    else:
        raise TypeError(f"not a trajectory node: {type(node).__name__}")


def atoms_text(atoms: Iterable[Atom]) -> str:
    """The text of text atoms (a tag as its string)."""
    return "".join(a.value if isinstance(a, Tag) else a for a in atoms)


def render_text(node) -> str:
    return atoms_text(iter_atoms(node))


def render_ids(node, vocab: TagVocab) -> list[int]:
    out: list[int] = []
    for a in iter_atoms(node):
        if isinstance(a, Tag):
            out.append(vocab.id(a))
        else:
            out.extend(a)
    return out


def node_length(node, length=len) -> int:
    """Size of a node in tokens (id trees) or in ``length`` units of content; a tag counts 1."""
    return sum(1 if isinstance(a, Tag) else length(a) for a in iter_atoms(node))
