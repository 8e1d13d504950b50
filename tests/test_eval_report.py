"""The eval report's speedup histogram (visible bars whatever the spread of speedups), the token speedup's one
definition, the trajectory records and the one log-prob setting."""

from __future__ import annotations

import json

import pytest

from threadweaver_verl.cli.demo import results_table
from threadweaver_verl.eval.evaluate import EvalConfig, sampling_of, summarize
from threadweaver_verl.eval.metrics import token_speedup
from threadweaver_verl.eval.records import (
    EvalSummary,
    RecordError,
    TrajectoryRecord,
    read_trajectories,
    write_trajectories,
)
from threadweaver_verl.eval.report import speedup_bins, write_eval_report


def test_near_equal_speedups_share_one_visible_bin():
    edges = speedup_bins([1.2913, 1.2914, 1.2913])
    assert len(edges) == 2 and edges[1] - edges[0] == pytest.approx(0.02)
    assert edges[0] <= 1.2913 <= 1.2914 <= edges[1]


def test_bins_cover_every_value_and_stay_few():
    values = [0.4, 0.97, 1.0, 1.31, 5.0]
    edges = speedup_bins(values)
    assert edges[0] <= min(values) and edges[-1] >= max(values)
    assert len(edges) - 1 <= 60
    assert all(b > a for a, b in zip(edges, edges[1:]))


def test_report_is_written_for_identical_speedups(tmp_path):
    summary = EvalSummary(accuracy=1.0, token_speedup=1.291)
    page = write_eval_report(tmp_path, summary, {f"p{i}": 1.291 for i in range(50)}, vs_baseline=True)
    assert page.exists() and (tmp_path / "speedup_hist.png").stat().st_size > 1000
    assert "speedup_hist.png" in page.read_text()


def _traj(problem: str, L: int, T: int | None = None, **over) -> TrajectoryRecord:
    T = T or L
    stats = {"total_tokens": T, "critical_path": L, "speedup": T / L, "num_blocks": 0, "num_threads": 0}
    fields = dict(problem=problem, sample=0, data_source="t", index=0, ground_truth="1", valid=True, correct=True)
    return TrajectoryRecord(**{**fields, "stats": stats, "num_engine_calls": 1, "wall_time_s": 0.5, **over})


def test_token_speedup_is_one_ratio_of_means_in_the_summary_and_the_demo_table():
    # per problem L_seq / L: a = 100 / 50 = 2, b = 10 / 10 = 1 (mean of ratios 1.5);
    # the token speedup is the ratio of the means: (100 + 10) / (50 + 10)
    baseline = [_traj("a", 100), _traj("b", 10)]
    run = [_traj("a", 50, T=100), _traj("b", 10), _traj("c", 7, error="engine down")]
    summary, per_problem = summarize(run, 3.0, baseline)
    assert per_problem == {"a": 2.0, "b": 1.0}
    assert summary.token_speedup == pytest.approx(110 / 60) and summary.baseline_mean_L == pytest.approx(55.0)
    assert summary.failed_trajectories == 1 and summary.mean_T_over_L == pytest.approx(1.5)
    assert summary.failed_by_cause == {"error": 1} and summary.to_json()["failed_by_cause"] == {"error": 1}
    sequential, _ = summarize(baseline, 3.0)
    rows = results_table({"sequential": sequential.to_json(), "parallel": summary.to_json()})
    assert [r["token_speedup"] for r in rows] == [1.0, summary.token_speedup]
    assert token_speedup({"a": [100, 100]}, {"a": [50]}) == 2.0 and token_speedup({"a": [1]}, {"b": [1]}) is None


def test_trajectory_records_round_trip_with_their_jsonl_keys(tmp_path):
    ok, failed = _traj("a", 5), _traj("b", 5, error="engine down")
    path = write_trajectories([ok, failed], tmp_path / "trajectories.jsonl")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert set(lines[1]) == {
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
    }
    assert lines[0]["id"] == "a/0" and lines[1]["id"] == "b/0"  # problem/sample: a resumed run's done-set key
    assert lines[0]["stats"]["critical_path"] == 5 and "response_ids" in lines[0]
    back = read_trajectories(path)
    assert back[0] == ok and back[1].error == "engine down" and not back[1].ok and back[1].stats == {}
    path.write_text(json.dumps({**lines[0], "speedup_of_the_past": 1.0}) + "\n")
    with pytest.raises(RecordError, match="speedup_of_the_past"):
        read_trajectories(path)
    with pytest.raises(RecordError, match="speedup_vs_baseline"):
        EvalSummary.from_json({"speedup_vs_baseline": 1.0})


def test_log_probs_have_one_setting():
    """``engine.logprobs`` alone decides whether the server is asked for log-probs (off for evaluating)."""
    from threadweaver_verl.config import ConfigError, load_config

    assert EvalConfig().engine.logprobs is False
    cfg = load_config(EvalConfig, ["engine.logprobs=true"])
    assert cfg.engine.logprobs is True and "logprobs" not in sampling_of(cfg)
    with pytest.raises(ConfigError, match="logprobs"):
        load_config(EvalConfig, ["logprobs=true"])
