"""The evaluation's numbers that have one definition across the package: the mean of what was measured,
the token speedup, latency and throughput (the eval summary, the demo table and ``benchmarks/`` all use
these functions).

**Token speedup** (``token_speedup`` in the eval summary, the demo table and the reports): on the
problems both runs solved without an engine error, the sequential baseline's mean critical path over
this run's mean critical path, each first averaged per problem, then over the problems. It is a ratio
of means: the tokens a sequential model spends on the whole set against the tokens on this model's
critical path, so a few problems with a tiny L cannot dominate it. A sequential run has T = L, so its
token speedup against itself is 1. The per-problem ratios (``L_seq / L``) are its distribution, drawn
in the report's histogram; their mean is not reported.

A trajectory's own ``T / L`` (``stats.speedup``, ``mean_T_over_L``) is a different number: what
fork/join inference of this same trajectory saves against decoding it token by token.

**Latency** (:func:`latency`): what a user waits for one answer, a trajectory's own wall time from its
first request to its last answer (``TrajectoryRecord.wall_time_s``), summarised as mean, p50 and p90
(:func:`percentile`). It depends on how many trajectories share the server, so it is always reported with
the concurrency it was measured at; one in flight is the latency of a lone user.

**Throughput** (:func:`throughput`): finished work over a run's wall time: problems per second and
response tokens (T, every thread's) per second. At one in flight it is about 1 / latency; at high
concurrency it is what a batch job or an RL rollout gets.

**Latency speedup** (:func:`latency_speedup`): the sequential baseline's mean latency over this run's, on
the problems both finished, at the same concurrency (a ratio of means, like the token speedup). Its
**share of the token speedup** (:func:`share_of_token_speedup`) says how much of the shorter critical
path reaches the user: 1 when wall time follows the tokens on the critical path exactly.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that were measured (``None`` ones are left out); ``None`` when none were."""
    measured = [v for v in values if v is not None]
    return statistics.fmean(measured) if measured else None


def token_speedup(baseline_L: Mapping[str, Sequence[float]], run_L: Mapping[str, Sequence[float]]) -> float | None:
    """The token speedup of a run against a sequential baseline (see the module docstring).

    ``baseline_L`` and ``run_L`` map a problem key to the critical paths of its trajectories. ``None``
    when the runs share no problem or this run's mean critical path is 0.
    """
    return _ratio_of_means(baseline_L, run_L)


def latency_speedup(baseline_s: Mapping[str, Sequence[float]], run_s: Mapping[str, Sequence[float]]) -> float | None:
    """The baseline's mean latency over this run's (see the module docstring). ``baseline_s`` and ``run_s``
    map a problem key to its trajectories' wall times in seconds, both measured at the same concurrency.
    ``None`` when the runs share no problem."""
    return _ratio_of_means(baseline_s, run_s)


def share_of_token_speedup(latency_speedup: float | None, token_speedup: float | None) -> float | None:
    """How much of the token speedup reaches the user's wait: latency speedup / token speedup (same
    problems); ``None`` when either is unknown."""
    if latency_speedup is None or not token_speedup:
        return None
    return latency_speedup / token_speedup


def _ratio_of_means(baseline: Mapping[str, Sequence[float]], run: Mapping[str, Sequence[float]]) -> float | None:
    """Over the problems both have values for: the mean over problems of the baseline's per-problem mean,
    over the same for ``run``; ``None`` when they share no problem or ``run``'s mean is 0."""
    common = [p for p in run if p in baseline and run[p] and baseline[p]]
    if not common:
        return None
    base = statistics.fmean(statistics.fmean(baseline[p]) for p in common)
    ours = statistics.fmean(statistics.fmean(run[p]) for p in common)
    return base / ours if ours else None


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, interpolated linearly between the two nearest ranks
    (numpy's default): the sorted values sit at 0, 1/(n-1), ..., 1. ``values`` must not be empty."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be within 0..100, got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    lo = math.floor(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


@dataclass(frozen=True)
class Latency:
    """Per-trajectory wall times in seconds: their mean, median and 90th percentile, and how many."""

    mean_s: float
    p50_s: float
    p90_s: float
    count: int


def latency(seconds: Iterable[float | None]) -> Latency | None:
    """The :class:`Latency` of the measured wall times (``None`` ones are left out); ``None`` when none were."""
    measured = [s for s in seconds if s is not None]
    if not measured:
        return None
    return Latency(statistics.fmean(measured), percentile(measured, 50), percentile(measured, 90), len(measured))


@dataclass(frozen=True)
class Throughput:
    """Finished work per second of a run's wall time."""

    problems_per_s: float
    response_tokens_per_s: float


def throughput(problems: int, response_tokens: int, wall_s: float) -> Throughput | None:
    """``problems`` answered and ``response_tokens`` (T) generated in ``wall_s`` seconds; ``None`` when no
    time was measured (``wall_s`` <= 0) or nothing finished."""
    if wall_s <= 0 or problems <= 0:
        return None
    return Throughput(problems / wall_s, response_tokens / wall_s)
