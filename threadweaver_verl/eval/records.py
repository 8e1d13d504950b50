"""The records of an evaluation: one :class:`TrajectoryRecord` per sampled trajectory (a line of
``trajectories.jsonl``) and the :class:`EvalSummary` (``summary.json``).

The eval command writes them, stage 2 of the data generator judges the trajectory records, and the
reports draw both; each is read back with its ``from_json``, which refuses a key it does not know.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from threadweaver_verl.data.schema import read_records
from threadweaver_verl.runs import UserError


def trajectory_id(problem: str, sample: int) -> str:
    """The id of a problem's ``sample``-th trajectory: ``data_source#index/sample``."""
    return f"{problem}/{sample}"


class RecordError(UserError, ValueError):
    """A trajectory or summary record that does not have the layout this version writes."""


def _from_json(cls: type, data: Mapping[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordError(f"{what}: unknown key(s) {unknown}; it was written by another version, rerun it")
    try:
        return cls(**data)
    except TypeError as e:  # a required key is missing
        raise RecordError(f"{what}: {e}") from e


@dataclass
class TrajectoryRecord:
    """One evaluated trajectory. A failed one (``error`` set) carries only its identity, the error, and
    ``correct = valid = False``; its rollout fields stay empty and are not written."""

    problem: str
    """``data_source#index`` (:func:`threadweaver_verl.eval.evaluate.problem_key`)."""
    sample: int
    """Which of the problem's ``n_samples`` trajectories."""
    data_source: str
    index: int
    ground_truth: str
    id: str = ""
    """``problem/sample`` (:func:`trajectory_id`): the key of a resumed run's done-set; set from those two
    when left empty."""
    error: str | None = None
    """The rollout error of a failed trajectory."""
    failure_cause: str | None = None
    """Why a failed trajectory failed, in one word (``connection_error``, ``timeout``, ``http_400``, ...;
    :func:`threadweaver_verl.eval.evaluate.failure_cause`): an infrastructure failure, not a wrong answer."""
    correct: bool = False
    """math-verify accepted the final answer."""
    valid: bool = False
    """The response passes the format validator."""
    response_text: str | None = None
    """The response decoded with its tags."""
    extracted: str | None = None
    """The final answer the check extracted."""
    answer_status: str | None = None
    """How the answer check ended (``ok``, ``no_answer``, ...)."""
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    """``TrajectoryStats.as_dict()``: ``total_tokens`` (T), ``critical_path`` (L), ``num_threads``, ..."""
    format_errors: list[str] = field(default_factory=list)
    terminations: list[str] = field(default_factory=list)
    """Why the controller intervened (distinct reasons, in order)."""
    events: list[dict[str, Any]] = field(default_factory=list)
    num_requests: int = 0
    num_engine_calls: int = 0
    prompt_tokens: int = 0
    """Prompt tokens over all engine calls."""
    cached_tokens: int | None = None
    """Of those, served from the prefix cache (None: the engine did not report it)."""
    cache_hit_rate: float | None = None
    thread_requests: list[dict[str, Any]] = field(default_factory=list)
    """``prompt_tokens`` and ``cached_tokens`` of each thread request."""
    wall_time_s: float | None = None

    _IDENTITY = (
        "problem",
        "sample",
        "data_source",
        "index",
        "ground_truth",
        "id",
        "error",
        "failure_cause",
        "correct",
        "valid",
    )

    def __post_init__(self) -> None:
        if not self.id:
            self.id = trajectory_id(self.problem, self.sample)

    @property
    def ok(self) -> bool:
        """The rollout finished (no engine or controller error)."""
        return not self.error

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: data[k] for k in self._IDENTITY} if self.error else data

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "trajectory record") -> TrajectoryRecord:
        return _from_json(cls, data, where)


@dataclass
class EvalSummary:
    """The summary table of an evaluation (``summary.json``); a metric nothing measured is None."""

    problems: int = 0
    trajectories: int = 0
    failed_trajectories: int = 0
    """Trajectories that did not run to the end (server or controller errors), not wrong answers."""
    failed_by_cause: dict[str, int] = field(default_factory=dict)
    """The failed trajectories by :attr:`TrajectoryRecord.failure_cause`, most common first."""
    accuracy: float | None = None
    """Correct over the trajectories that ran (failed ones are not counted as wrong)."""
    format_valid_rate: float | None = None
    """Format-valid over the trajectories that ran."""
    mean_T: float | None = None
    """Mean response tokens (T) of the trajectories that finished."""
    mean_L: float | None = None
    """Mean critical path (L)."""
    mean_T_over_L: float | None = None
    """Mean of each trajectory's own T / L (not the token speedup)."""
    mean_blocks: float | None = None
    mean_engine_calls: float | None = None
    wall_s: float | None = None
    """Sampling wall-clock seconds, added up over every run on the ``out_dir`` (``run_times.json``): a
    resumed eval counts its interrupted runs too, with the work the interruption lost. None when unknown (the
    summary covers only part of the folder's trajectories, or a run's time was not recorded)."""
    runs: int = 0
    """How many runs sampled these trajectories (more than 1: resumed, or failed trajectories retried)."""
    wall_s_per_problem: float | None = None
    """``wall_s`` over ``problems``: the throughput at the run's ``concurrency``, not a latency."""
    mean_trajectory_wall_s: float | None = None
    prefix_cache_hit_rate: float | None = None
    """Cached over prompt tokens, over the calls that report it."""
    thread_cache_hit_rate: float | None = None
    """The same over thread requests only."""
    token_speedup: float | None = None
    """Against the sequential ``baseline`` (:mod:`threadweaver_verl.eval.metrics`); None without one."""
    baseline_mean_L: float | None = None
    """The baseline's mean L over the problems both runs share."""
    terminations: dict[str, int] = field(default_factory=dict)
    """How often each controller intervention happened."""
    mode: str = ""
    """``fork/join`` or ``sequential``."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "eval summary") -> EvalSummary:
        return _from_json(cls, data, where)


def write_trajectories(records: Iterable[TrajectoryRecord], path: str | Path) -> Path:
    """``trajectories.jsonl``: one record per line."""
    out = Path(path)
    with open(out, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    return out


def read_trajectories(path: str | Path) -> list[TrajectoryRecord]:
    """The records of a ``trajectories.jsonl``."""
    return [TrajectoryRecord.from_json(r, f"{path}, record {i}") for i, r in enumerate(read_records(path), start=1)]
