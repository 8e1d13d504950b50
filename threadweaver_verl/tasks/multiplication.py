"""Synthetic multiplication: problems with a parallel and a sequential solution.

A problem multiplies factors with fixed digit counts, e.g. ``digits=(4, 3)`` is
a 4-digit number times a 3-digit number. Each factor after the first is one
*stage*: the running product is multiplied by each digit of the factor (one
partial product per digit, computed independently), and the partial products
are then summed column by column. In the parallel solution each stage is one
``<Parallel>`` block whose threads compute the partial products; the sum is
sequential after the join. The sequential solution writes the very same steps,
one partial product per line.

Numbers are read least-significant digit first, one explicit step per digit
with its carry, every step a fixed width (two-digit results, leading zero
kept), so every problem of a difficulty has the same layout. For ``2468 * 37``::

    <think>
    <Parallel>
    <Outlines>
    <Outline>1: *7</Outline>
    <Outline>2: *3</Outline>
    </Outlines>
    <Thread>
    1: *7 8*7=56+0=56 6*7=42+5=47 4*7=28+4=32 2*7=14+3=17</Thread>
    <Thread>
    2: *3 8*3=24+0=24 6*3=18+2=20 4*3=12+2=14 2*3=06+1=07</Thread>
    </Parallel>
    sum: 0+6=06 0+7=07+4=11 1+2=03+0=03 0+7=07+4=11 1+1=02+7=09 0+0=00
    </think>
    \\boxed{91316}

Each partial-product line opens by restating its multiplier digit (``1: *7``),
the very text of its outline: a thread finds its digit by matching its own
header against the outlines (a copy a tiny model learns early), not by
counting outlines.

Step ``a*d=PQ+c=XY``: digit ``a`` of the multiplicand times the line's digit
``d`` is ``PQ`` (a times-table fact), plus the carry ``c`` is ``XY``; ``Y`` is
the digit, ``X`` the next carry (the last step's ``X`` is the partial
product's top digit). The product and the carry are added in two moves because
a tiny model learns the 100 table facts and a one-digit addition far sooner
than the 900 facts ``a*d+c`` in one go. Sum step ``c+t1=AB+t2=CD...``: a
running sum over one column, the carry first (it is the previous result's
``X``, right before it), then the column's digits of the partial products
(partial product ``j`` is shifted ``j-1`` places), one digit per move, so every
move adds one digit to a number below 100; adding three or four digits in one
move was the error a tiny model made most. The last result's ``Y`` is the
product's digit, least-significant first; the running product keeps its fixed
width (a leading zero included) as the next stage's multiplicand.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from threadweaver_verl.format import BlockLayout, Tag
from threadweaver_verl.runs import UserError

DATA_SOURCE = "threadweaver/multiplication"

# name -> digits per factor. The first factor is the multiplicand; every further
# factor is one block with one thread per digit.
PRESETS: dict[str, tuple[int, ...]] = {
    "2x2": (2, 2),
    "3x2": (3, 2),
    "3x3": (3, 3),
    "4x3": (4, 3),
    "3x4": (3, 4),
    "5x3": (5, 3),
    "4x4": (4, 4),
    "6x3": (6, 3),
    "3x2x2": (3, 2, 2),
}


class DifficultyError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Difficulty:
    """How hard the problems are: digits per factor (a preset name or explicit)."""

    digits: tuple[int, ...]

    def __post_init__(self) -> None:
        d = tuple(int(x) for x in self.digits)
        object.__setattr__(self, "digits", d)
        if len(d) < 2:
            raise DifficultyError(f"need at least two factors, got digits={list(d)}")
        if d[0] < 1 or d[0] > 12:
            raise DifficultyError(f"the first factor needs 1..12 digits, got {d[0]}")
        bad = [x for x in d[1:] if not 2 <= x <= 9]
        if bad:
            raise DifficultyError(
                f"every factor after the first opens a block with one thread per digit, so it "
                f"needs 2..9 digits; got digits={list(d)}"
            )

    @classmethod
    def parse(cls, spec: str | Sequence[int]) -> Difficulty:
        """A preset name (``"4x3"``), a spec like ``"3x2x2"``, or a list of digit counts."""
        if isinstance(spec, str):
            if spec in PRESETS:
                return cls(PRESETS[spec])
            try:
                digits = tuple(int(x) for x in spec.lower().split("x"))
            except ValueError:
                raise DifficultyError(
                    f"unknown difficulty {spec!r}: use a preset ({', '.join(PRESETS)}) or digits per factor like '4x3'"
                ) from None
            return cls(digits)
        return cls(tuple(spec))

    @property
    def name(self) -> str:
        return "x".join(map(str, self.digits))

    @property
    def threads_per_block(self) -> tuple[int, ...]:
        return self.digits[1:]


@dataclass(frozen=True)
class Problem:
    factors: tuple[int, ...]

    @property
    def product(self) -> int:
        p = 1
        for f in self.factors:
            p *= f
        return p

    @property
    def answer(self) -> str:
        return str(self.product)

    @property
    def question(self) -> str:
        return "What is " + " * ".join(map(str, self.factors)) + "?"


# --------------------------------------------------------------------------- generation


def generate_problems(
    difficulty: Difficulty, n: int, seed: int, split: str = "train", exclude: Iterable[Problem] = ()
) -> list[Problem]:
    """``n`` distinct problems, deterministic for (``seed``, ``split``); none of ``exclude`` (e.g. the test set)."""
    rng = random.Random(f"threadweaver-multiplication:{difficulty.name}:{split}:{seed}")
    seen = set(exclude)
    space = 1
    for d in difficulty.digits:
        space *= 9 * 10 ** (d - 1)
    if n + len(seen) > space // 2:
        raise DifficultyError(
            f"{n} distinct problems requested but {difficulty.name} has only {space} "
            "(minus the excluded ones); ask for fewer or a harder difficulty"
        )
    out: list[Problem] = []
    while len(out) < n:
        p = Problem(tuple(rng.randint(10 ** (d - 1), 10**d - 1) for d in difficulty.digits))
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


# --------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class MulStep:
    a: int  # digit of the multiplicand
    d: int  # the thread's digit of the multiplier
    carry: int
    value: int  # a * d + carry (< 100)

    @property
    def text(self) -> str:
        return f"{self.a}*{self.d}={self.a * self.d:02d}+{self.carry}={self.value:02d}"


@dataclass(frozen=True)
class SumStep:
    terms: tuple[int, ...]  # the column's digits of the partial products, partial product 1 first
    carry: int
    value: int  # sum(terms) + carry (< 100)

    @property
    def text(self) -> str:
        """The running sum ``c+t1=AB+t2=CD...``: carry first, then one digit per move."""
        total, out = self.carry, str(self.carry)
        for t in self.terms:
            total += t
            out += f"+{t}={total:02d}"
        return out


@dataclass(frozen=True)
class Stage:
    """Multiplying the running product by one factor: partial products, then their sum."""

    multiplicand: tuple[int, ...]  # digits, least-significant first, fixed width
    multiplier: tuple[int, ...]  # digits, least-significant first
    partials: tuple[tuple[MulStep, ...], ...]  # one row per multiplier digit
    columns: tuple[SumStep, ...]

    @property
    def result(self) -> tuple[int, ...]:
        """Digits of the stage's product, least-significant first (fixed width)."""
        return tuple(s.value % 10 for s in self.columns)


def _digits(n: int, width: int) -> tuple[int, ...]:
    return tuple((n // 10**i) % 10 for i in range(width))


def _partial(multiplicand: tuple[int, ...], d: int) -> tuple[MulStep, ...]:
    steps, carry = [], 0
    for a in multiplicand:
        v = a * d + carry
        steps.append(MulStep(a, d, carry, v))
        carry = v // 10
    return tuple(steps)


def _columns(partials: tuple[tuple[MulStep, ...], ...]) -> tuple[SumStep, ...]:
    # Partial product j (0-based) has digits [Y of each step] + [X of the last step], shifted j places.
    rows = [[s.value % 10 for s in steps] + [steps[-1].value // 10] for steps in partials]
    width = len(rows[0]) + len(rows) - 1
    out, carry = [], 0
    for c in range(width):
        terms = tuple(row[c - j] for j, row in enumerate(rows) if 0 <= c - j < len(row))
        v = sum(terms) + carry
        out.append(SumStep(terms, carry, v))
        carry = v // 10
    if carry:  # pragma: no cover - a product of w and k digits has at most w + k digits
        raise AssertionError("final carry left over")
    return tuple(out)


def solve(problem: Problem) -> list[Stage]:
    """The steps shared by both solutions."""
    stages: list[Stage] = []
    first = problem.factors[0]
    multiplicand = _digits(first, len(str(first)))
    for f in problem.factors[1:]:
        multiplier = _digits(f, len(str(f)))
        partials = tuple(_partial(multiplicand, d) for d in multiplier)
        stage = Stage(multiplicand, multiplier, partials, _columns(partials))
        stages.append(stage)
        multiplicand = stage.result
    value = sum(d * 10**i for i, d in enumerate(stages[-1].result))
    if value != problem.product:  # pragma: no cover - guarded by the tests
        raise AssertionError(f"steps give {value}, expected {problem.product}")
    return stages


# --------------------------------------------------------------------------- text


def _digit_label(d: int) -> str:
    """What a partial-product line is about: ``*d``. Its outline says ``N: *d`` and the line restates it."""
    return f"*{d}"


def _row_text(steps: Sequence[MulStep]) -> str:
    """A partial-product line after its ``N:`` header: its digit label, then the steps."""
    return f" {_digit_label(steps[0].d)} " + " ".join(s.text for s in steps)


def _sum_line(stage: Stage) -> str:
    return "sum: " + " ".join(s.text for s in stage.columns)


def _ending(problem: Problem) -> str:
    return f"\n{Tag.THINK_CLOSE.value}\n\\boxed{{{problem.answer}}}"


def parallel_solution(problem: Problem, layout: BlockLayout | None = None) -> str:
    """The solution with one ``<Parallel>`` block per stage, in the fork/join layout (``layout``, by
    default the format's): outline ``j`` is the ``j``-th multiplier digit, thread ``j`` its partial product."""
    layout = layout or BlockLayout()
    out = [Tag.THINK_OPEN.value, "\n"]
    for stage in solve(problem):
        outlines = [_digit_label(d) for d in stage.multiplier]
        threads = [_row_text(steps) for steps in stage.partials]
        out += [layout.block_text(outlines, threads), "\n", _sum_line(stage), "\n"]
    out[-1:] = [_ending(problem)]
    return "".join(out)


def sequential_solution(problem: Problem, layout: BlockLayout | None = None) -> str:
    """The same steps without blocks: one line per partial product (headed as its thread is), then the sum."""
    layout = layout or BlockLayout()
    out = [Tag.THINK_OPEN.value]
    for stage in solve(problem):
        for j, steps in enumerate(stage.partials, start=1):
            out.append(layout.header(j) + _row_text(steps))
        out.append("\n" + _sum_line(stage))
    out.append(_ending(problem))
    return "".join(out)


@dataclass(frozen=True)
class Sample:
    """A problem with its two solutions (trajectory texts, without EOS)."""

    problem: Problem
    parallel: str
    sequential: str


def make_samples(
    difficulty: Difficulty, n: int, seed: int, split: str = "train", exclude: Iterable[Problem] = ()
) -> list[Sample]:
    return [
        Sample(p, parallel_solution(p), sequential_solution(p))
        for p in generate_problems(difficulty, n, seed, split, exclude)
    ]


# --------------------------------------------------------------------------- checks and token counts


@dataclass(frozen=True)
class SampleTokens:
    """Token counts of a sample's two solutions under one tokenizer."""

    sequential_T: int
    parallel_T: int
    parallel_L: int
    threads_per_block: tuple[int, ...]
    num_requests: int  # fork/join requests of the parallel solution

    @property
    def ideal_speedup(self) -> float:
        """Sequential T / parallel L, if a model wrote exactly these solutions."""
        return self.sequential_T / self.parallel_L


class BadSample(AssertionError):
    """A generated solution that is not what the task promises (a bug in this module)."""


def check_sample(sample: Sample, fmt, prompt_ids: Sequence[int] = ()) -> SampleTokens:
    """Encode both solutions as inference would, check them, and count their tokens.

    Raises :class:`BadSample` unless: the parallel solution is format-valid and
    splits into fork/join Requests that rebuild it; the sequential one is valid
    and has no block; both box the true product; both have the same steps.
    """
    from threadweaver_verl.format import split_requests

    par_ids = fmt.encode_text(sample.parallel)  # raises NonCanonicalTrajectory if invalid
    seq_ids = fmt.encode_text(sample.sequential)
    par, seq = fmt.parse(par_ids), fmt.parse(seq_ids)
    errors = fmt.validate(par) + fmt.validate(seq)
    if errors:
        raise BadSample(f"{sample.problem.question}: format errors {[str(e) for e in errors]}")
    requests = split_requests(list(prompt_ids), par_ids, fmt)
    replay = list(requests[-1].context_ids) + list(requests[-1].completion_ids)
    if replay[len(prompt_ids) :] != par_ids:
        raise BadSample(f"{sample.problem.question}: the fork/join requests do not rebuild the parallel solution")
    boxed = f"\\boxed{{{sample.problem.answer}}}"
    for name, text in (("parallel", sample.parallel), ("sequential", sample.sequential)):
        if not text.endswith(boxed) or text.count("\\boxed") != 1:
            raise BadSample(f"{sample.problem.question}: the {name} solution does not end with {boxed}")
    if steps_of(sample.parallel) != steps_of(sample.sequential):
        raise BadSample(f"{sample.problem.question}: the two solutions have different steps")
    p, s = fmt.stats(par), fmt.stats(seq)
    if s.num_blocks:
        raise BadSample(f"{sample.problem.question}: the sequential solution has a block")
    return SampleTokens(s.total_tokens, p.total_tokens, p.critical_path, p.threads_per_block, len(requests))


_STEP = re.compile(r"\d\*\d=\d\d\+\d=\d\d|\d(?:\+\d=\d\d)+")


def steps_of(text: str) -> list[str]:
    """The arithmetic steps of a solution, in order (``a*d=PQ+c=XY`` and ``c+t1=AB+t2=CD...``)."""
    return _STEP.findall(text)
