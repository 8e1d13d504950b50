"""The evaluation's numbers that have one definition across the package: the mean of what was measured,
and the token speedup.

**Token speedup** (``token_speedup`` in the eval summary, the demo table and the reports): on the
problems both runs solved without an engine error, the sequential baseline's mean critical path over
this run's mean critical path, each first averaged per problem, then over the problems. It is a ratio
of means: the tokens a sequential model spends on the whole set against the tokens on this model's
critical path, so a few problems with a tiny L cannot dominate it. A sequential run has T = L, so its
token speedup against itself is 1. The per-problem ratios (``L_seq / L``) are its distribution, drawn
in the report's histogram; their mean is not reported.

A trajectory's own ``T / L`` (``stats.speedup``, ``mean_T_over_L``) is a different number: what
fork/join inference of this same trajectory saves against decoding it token by token.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence


def mean(values: Iterable[float | None]) -> float | None:
    """The mean of the values that were measured (``None`` ones are left out); ``None`` when none were."""
    measured = [v for v in values if v is not None]
    return statistics.fmean(measured) if measured else None


def token_speedup(baseline_L: Mapping[str, Sequence[float]], run_L: Mapping[str, Sequence[float]]) -> float | None:
    """The token speedup of a run against a sequential baseline (see the module docstring).

    ``baseline_L`` and ``run_L`` map a problem key to the critical paths of its trajectories. ``None``
    when the runs share no problem or this run's mean critical path is 0.
    """
    common = [p for p in run_L if p in baseline_L and run_L[p] and baseline_L[p]]
    if not common:
        return None
    base = statistics.fmean(statistics.fmean(baseline_L[p]) for p in common)
    ours = statistics.fmean(statistics.fmean(run_L[p]) for p in common)
    return base / ours if ours else None
