"""The text layout of a block: the one place that writes what goes between a block's parts.

Fork/join inference inserts everything after a block's ``</Outlines>``: the fork gap,
each thread's ``<Thread>`` and header ``\\nN:``, the separator between threads, the
join gap and ``</Parallel>``. The outline list before it is model output; data
writers (the multiplication task, stage 1, random test trajectories) write it the
way :meth:`BlockLayout.outline_atoms` does, so a model trained on them writes it so::

    <Parallel>\\n<Outlines>\\n<Outline>1: a</Outline>\\n<Outline>2: b</Outline>\\n</Outlines>   <- generated
    {fork_gap}<Thread>{header 1} ... </Thread>{thread_sep}<Thread>{header 2} ... </Thread>   <- inserted + threads
    {join_gap}</Parallel>                                                                 <- inserted

:class:`~threadweaver_verl.format.tokens.TokenFormat` builds its ids (fork contexts,
joins, encoded text trajectories) from :meth:`BlockLayout.fork_atoms` and
:meth:`BlockLayout.join_atoms`; text writers call :meth:`BlockLayout.block_text`.
A layout piece is an *atom* (:mod:`threadweaver_verl.format.tree`): a :class:`Tag`,
a text, or a run of token ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from threadweaver_verl.format.tags import Tag
from threadweaver_verl.format.tree import Atom, atoms_text


@dataclass(frozen=True)
class BlockLayout:
    """The whitespace and thread headers fork/join inference inserts around a block's threads."""

    fork_gap: str = "\n"
    """Between ``</Outlines>`` and the first ``<Thread>`` (and in every thread's fork context)."""
    thread_sep: str = "\n"
    """Between one thread's ``</Thread>`` and the next ``<Thread>`` in the joined context."""
    join_gap: str = "\n"
    """Between the last ``</Thread>`` and ``</Parallel>``."""
    header_template: str = "\n{n}:"
    """The header after ``<Thread>`` that tells thread ``n`` which outline it answers."""

    def header(self, n: int) -> str:
        return self.header_template.format(n=n)

    def fork_atoms(self, n: int) -> list[Atom]:
        """What inference appends to the shared context (ending in ``</Outlines>``) to start thread ``n``."""
        return _present([self.fork_gap, Tag.THREAD_OPEN, self.header(n)])

    def join_atoms(self, threads: Iterable[tuple[int, Sequence[Atom]]]) -> list[Atom]:
        """A block after its ``</Outlines>``, from each thread's number and the atoms of its completion
        (everything after its header, ``</Thread>`` included): the joined context's tail."""
        out: list[Atom] = [self.fork_gap]
        for k, (n, completion) in enumerate(threads):
            if k:
                out.append(self.thread_sep)
            out += [Tag.THREAD_OPEN, self.header(n), *completion]
        out += [self.join_gap, Tag.PARALLEL_CLOSE]
        return _present(out)

    @staticmethod
    def outline_atoms(outlines: Sequence[str]) -> list[Atom]:
        """``<Parallel>`` and the outline list as data writers write it: outline ``k`` reads ``k: {outlines[k-1]}``."""
        out: list[Atom] = [Tag.PARALLEL_OPEN, "\n", Tag.OUTLINES_OPEN, "\n"]
        for k, outline in enumerate(outlines, start=1):
            out += [Tag.OUTLINE_OPEN, f"{k}: {outline}", Tag.OUTLINE_CLOSE, "\n"]
        out.append(Tag.OUTLINES_CLOSE)
        return out

    def block_atoms(self, outlines: Sequence[str], threads: Sequence[str]) -> list[Atom]:
        """A whole block: the outline list, then thread ``k`` with ``threads[k-1]`` after its header."""
        return self.outline_atoms(outlines) + self.join_atoms(
            (k, [text, Tag.THREAD_CLOSE]) for k, text in enumerate(threads, start=1)
        )

    def block_text(self, outlines: Sequence[str], threads: Sequence[str]) -> str:
        """:meth:`block_atoms` as text: ``block_text(["a", "b"], [" x", " y"])`` is
        ``<Parallel>\\n<Outlines>\\n<Outline>1: a</Outline>\\n<Outline>2: b</Outline>\\n</Outlines>\\n``
        ``<Thread>\\n1: x</Thread>\\n<Thread>\\n2: y</Thread>\\n</Parallel>`` in the default layout."""
        return atoms_text(self.block_atoms(outlines, threads))


def _present(atoms: list[Atom]) -> list[Atom]:
    """Drop empty texts (a layout may set a gap to ``""``), so no atom is an empty content run."""
    return [a for a in atoms if isinstance(a, Tag) or len(a)]
