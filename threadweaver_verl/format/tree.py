"""The trajectory tree, its lossless parser and its renderer.

One parser serves text and token ids: both are first cut into *atoms*, each a
:class:`Tag` or a run of content (a ``str`` for text, a ``tuple[int, ...]`` of
token ids for ids). The parser never raises: a tag out of place becomes a
:class:`Stray` node and an unclosed element is kept with ``closed=False``, so
``render(parse(x)) == x`` for ANY input and ``parse(render(t)) == t`` for any
tree the parser can produce. Whether a tree is a *valid* trajectory is the
validator's question (:mod:`threadweaver_verl.format.validate`).
"""

from __future__ import annotations

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
    atoms: list[Atom] = []
    run: list[int] = []
    for i in ids:
        tag = vocab.tag(int(i))
        if tag is None:
            run.append(int(i))
        else:
            if run:
                atoms.append(tuple(run))
                run = []
            atoms.append(tag)
    if run:
        atoms.append(tuple(run))
    return atoms


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, atoms: list[Atom]):
        self.atoms = atoms
        self.i = 0

    def peek(self) -> Atom | None:
        return self.atoms[self.i] if self.i < len(self.atoms) else None

    def take(self) -> Atom:
        a = self.atoms[self.i]
        self.i += 1
        return a

    @staticmethod
    def _push_content(out: list, atom: Atom) -> None:
        # Merge adjacent content so that one run of text is one Span.
        if out and isinstance(out[-1], Span):
            out[-1] = Span(out[-1].content + atom)
        else:
            out.append(Span(atom))

    def line(self, depth: int, in_thread: bool) -> tuple[tuple, bool]:
        """A main line (top level) or a thread body. Returns (nodes, closed)."""
        out: list = []
        while (a := self.peek()) is not None:
            if not isinstance(a, Tag):
                self._push_content(out, self.take())
            elif a is Tag.PARALLEL_OPEN and depth < HARD_MAX_DEPTH:
                self.take()
                out.append(self.block(depth + 1))
            elif a in (Tag.THINK_OPEN, Tag.THINK_CLOSE):
                self.take()
                out.append(Marker(a) if not in_thread else Stray(a))
            elif in_thread and a is Tag.THREAD_CLOSE:
                self.take()
                return tuple(out), True
            elif in_thread and a in (Tag.THREAD_OPEN, Tag.PARALLEL_CLOSE):
                return tuple(out), False  # the enclosing block takes it
            else:
                out.append(Stray(self.take()))
        return tuple(out), not in_thread

    def block(self, depth: int) -> Block:
        parts: list = []
        while (a := self.peek()) is not None:
            if not isinstance(a, Tag):
                self._push_content(parts, self.take())
            elif a is Tag.OUTLINES_OPEN:
                self.take()
                parts.append(self.outlines())
            elif a is Tag.THREAD_OPEN:
                self.take()
                body, closed = self.line(depth, in_thread=True)
                parts.append(Thread(body, closed))
            elif a is Tag.PARALLEL_CLOSE:
                self.take()
                return Block(tuple(parts), True)
            else:
                parts.append(Stray(self.take()))
        return Block(tuple(parts), False)

    def outlines(self) -> Outlines:
        parts: list = []
        while (a := self.peek()) is not None:
            if not isinstance(a, Tag):
                self._push_content(parts, self.take())
            elif a is Tag.OUTLINE_OPEN:
                self.take()
                parts.append(self.outline())
            elif a is Tag.OUTLINES_CLOSE:
                self.take()
                return Outlines(tuple(parts), True)
            elif a in (Tag.THREAD_OPEN, Tag.PARALLEL_CLOSE):
                return Outlines(tuple(parts), False)
            else:
                parts.append(Stray(self.take()))
        return Outlines(tuple(parts), False)

    def outline(self) -> Outline:
        body: list = []
        while (a := self.peek()) is not None:
            if not isinstance(a, Tag):
                self._push_content(body, self.take())
            elif a is Tag.OUTLINE_CLOSE:
                self.take()
                return Outline(tuple(body), True)
            elif a in (Tag.OUTLINE_OPEN, Tag.OUTLINES_CLOSE, Tag.THREAD_OPEN, Tag.PARALLEL_CLOSE):
                return Outline(tuple(body), False)
            else:
                body.append(Stray(self.take()))
        return Outline(tuple(body), False)


def parse_atoms(atoms: list[Atom]) -> Trajectory:
    body, _ = _Parser(list(atoms)).line(0, in_thread=False)
    return Trajectory(body)


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
