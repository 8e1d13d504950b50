"""The eval report's speedup histogram (visible bars whatever the spread of speedups), the token speedup's one
definition, the trajectory records and the one log-prob setting."""

from __future__ import annotations

import json

import pytest

from threadweaver_verl.cli.demo import results_table
from threadweaver_verl.eval.evaluate import EvalConfig, sampling_of, summarize
from threadweaver_verl.eval.metrics import (
    Latency,
    Throughput,
    latency,
    latency_speedup,
    percentile,
    share_of_token_speedup,
    throughput,
    token_speedup,
)
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


def test_percentiles_latency_and_throughput_on_known_inputs():
    import numpy as np

    one_to_ten = [float(v) for v in range(10, 0, -1)]  # order does not matter
    assert percentile(one_to_ten, 50) == pytest.approx(5.5) and percentile(one_to_ten, 90) == pytest.approx(9.1)
    assert percentile([3.0], 90) == 3.0 and percentile([4.0, 2.0], 0) == 2.0 and percentile([4.0, 2.0], 100) == 4.0
    values = [0.3, 1.7, 0.2, 9.0, 1.1, 1.1, 0.05]
    for q in (0, 10, 50, 90, 99, 100):  # numpy's default (linear) method
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="0..100"):
        percentile([1.0], 101)
    assert latency([*one_to_ten, None]) == Latency(5.5, 5.5, pytest.approx(9.1), 10)  # None: not measured
    assert latency([None]) is None and latency([]) is None
    assert throughput(problems=4, response_tokens=1000, wall_s=2.0) == Throughput(2.0, 500.0)
    assert throughput(0, 0, 2.0) is None and throughput(4, 1000, 0.0) is None
    # latency speedup: a ratio of the mean wall times over the shared problems, like the token speedup
    assert latency_speedup({"a": [2.0, 4.0], "b": [1.0]}, {"a": [1.0], "b": [1.0], "c": [9.0]}) == 2.0
    assert latency_speedup({"a": [1.0]}, {"b": [1.0]}) is None
    assert share_of_token_speedup(1.2, 1.5) == pytest.approx(0.8) and share_of_token_speedup(None, 1.5) is None


def test_summary_times_the_trajectories_this_invocation_ran():
    earlier = _traj("a", 10, wall_time_s=9.0)  # finished by an earlier invocation (a resumed run)
    now = [_traj("b", 10, T=20, wall_time_s=1.0), _traj("c", 10, T=30, wall_time_s=3.0), _traj("d", 5, error="down")]
    summary, _ = summarize([earlier, *now], 4.0, timed=now)
    assert summary.timed_trajectories == 2 and summary.timed_wall_s == 4.0
    assert summary.latency_mean_s == pytest.approx(2.0) and summary.latency_p50_s == pytest.approx(2.0)
    assert summary.latency_p90_s == pytest.approx(2.8)
    assert summary.problems_per_s == pytest.approx(2 / 4.0) and summary.response_tokens_per_s == pytest.approx(50 / 4.0)
    assert summary.mean_T == pytest.approx(20.0)  # the other metrics are over every finished trajectory
    everything, _ = summarize([earlier, *now], 4.0)  # default: every record ran in the wall time
    assert everything.timed_trajectories == 3 and everything.latency_p50_s == pytest.approx(3.0)
    nothing, _ = summarize([earlier], 0.0, timed=[])  # a rerun with nothing left to run times nothing
    assert nothing.timed_trajectories == 0 and nothing.latency_mean_s is None and nothing.problems_per_s is None
    assert nothing.timed_wall_s is None and nothing.accuracy == 1.0


def test_latency_speedup_and_its_share_of_the_token_speedup_against_the_baseline():
    baseline = [_traj("a", 100, wall_time_s=2.0), _traj("b", 10, wall_time_s=1.0)]
    run = [_traj("a", 50, T=100, wall_time_s=1.0), _traj("b", 10, wall_time_s=1.0)]
    summary, _ = summarize(run, 2.0, baseline)
    assert summary.latency_speedup == pytest.approx(1.5)  # (2 + 1) / (1 + 1)
    assert summary.token_speedup == pytest.approx(110 / 60)
    assert summary.latency_share_of_token_speedup == pytest.approx(1.5 / (110 / 60))
    alone, _ = summarize(run, 2.0)
    assert alone.latency_speedup is None and alone.latency_share_of_token_speedup is None


def test_demo_table_names_latency_at_one_in_flight_and_throughput_at_its_concurrency():
    seq_runs = [_traj("a", 100, wall_time_s=2.0), _traj("b", 100, wall_time_s=2.0)]
    par_runs = [_traj("a", 50, T=120, wall_time_s=1.6), _traj("b", 50, T=120, wall_time_s=1.6)]
    seq, _ = summarize(seq_runs, 2.0)  # at 16 in flight: 1 problem/s
    par, _ = summarize(par_runs, 4.0, seq_runs)  # 0.5 problem/s
    seq_alone, _ = summarize(seq_runs[:1], 2.0)  # the latency run: one at a time
    par_alone, _ = summarize(par_runs[:1], 1.6, seq_runs[:1])
    seq.concurrency = par.concurrency = 16
    seq_alone.concurrency = par_alone.concurrency = 1
    evals = {
        "sequential": seq.to_json(),
        "parallel": par.to_json(),
        "latency": {"sequential": seq_alone.to_json(), "parallel": par_alone.to_json()},
    }
    rows = results_table(evals)
    assert list(rows[0]) == [
        "model",
        "accuracy",
        "format_valid",
        "mean_T",
        "mean_L",
        "token_speedup",
        "latency_s_at_1_in_flight",
        "latency_speedup_at_1_in_flight",
        "latency_share_of_token_speedup",
        "problems_per_s_at_16_in_flight",
        "throughput_speedup_at_16_in_flight",
        "response_tokens_per_s_at_16_in_flight",
        "thread_cache_hit_rate",
    ]
    assert list(rows[1]) == list(rows[0])
    s, p = rows
    assert s["latency_s_at_1_in_flight"] == pytest.approx(2.0) and p["latency_s_at_1_in_flight"] == pytest.approx(1.6)
    assert s["latency_speedup_at_1_in_flight"] == 1.0 and p["latency_speedup_at_1_in_flight"] == pytest.approx(1.25)
    assert p["latency_share_of_token_speedup"] == pytest.approx(1.25 / 2.0)  # token speedup 100 / 50
    assert s["problems_per_s_at_16_in_flight"] == pytest.approx(1.0) and p["problems_per_s_at_16_in_flight"] == 0.5
    assert s["throughput_speedup_at_16_in_flight"] == 1.0 and p["throughput_speedup_at_16_in_flight"] == 0.5
    assert p["response_tokens_per_s_at_16_in_flight"] == pytest.approx(240 / 4.0)
    without = results_table({k: evals[k] for k in ("sequential", "parallel")})  # latency_problems=0
    assert list(without[1]) == list(rows[0]) and without[1]["latency_speedup_at_1_in_flight"] is None


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
