"""The demo's quick mode end to end (real data generation, trie SFT, vLLM CPU servers, fork/join
evaluation, report). Accuracy is not asserted: the quick mode trains for seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_and_reuses_finished_stages(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "threadweaver_verl", "demo", "--quick", f"out={out}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ThreadWeaver demo" in proc.stdout and "token_speedup" in proc.stdout
    assert "latency_speedup_at_1_in_flight" in proc.stdout and "throughput_speedup_at_16_in_flight" in proc.stdout
    res = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in res["table"]}
    assert set(rows) == {"sequential", "parallel (fork/join)"}
    for r in rows.values():
        for key in ("accuracy", "format_valid"):
            assert 0.0 <= r[key] <= 1.0
        assert r["mean_T"] >= r["mean_L"] > 0
        assert r["token_speedup"] > 0
        # latency one problem at a time (the first latency_problems), throughput at eval_concurrency
        assert r["latency_s_at_1_in_flight"] > 0 and r["latency_speedup_at_1_in_flight"] > 0
        assert r["latency_share_of_token_speedup"] > 0
        assert r["problems_per_s_at_16_in_flight"] > 0 and r["throughput_speedup_at_16_in_flight"] > 0
        assert r["response_tokens_per_s_at_16_in_flight"] > 0
        assert "wall_speedup" not in r
    assert rows["sequential"]["mean_T"] == pytest.approx(rows["sequential"]["mean_L"])  # no forks
    for artefact in (
        "data/train.parquet",
        "data/test.parquet",
        "sft_parallel/model/config.json",
        "sft_sequential/model/config.json",
        "eval_parallel/trajectories.jsonl",
        "eval_sequential/trajectories.jsonl",
        "latency_parallel/summary.json",
        "latency_sequential/summary.json",
        "curve/parallel_step20/summary.json",
        "curve/sequential_step20/summary.json",
        "report.html",
        "report_assets/loss.png",
        "report_assets/accuracy_curve.png",
    ):
        assert (out / artefact).exists(), artefact
    # the step budget ended both trainings; the curve has the checkpoint and the final model
    for kind in ("parallel", "sequential"):
        assert res["sft"][kind]["steps"] == 40 and res["sft"][kind]["stopped_by"] == "steps"
    assert [r["step"] for r in res["accuracy_curve"]] == [20, 40]
    assert res["accuracy_curve"][-1]["parallel"] == rows["parallel (fork/join)"]["accuracy"]
    assert "held-out accuracy vs training steps" in " ".join(proc.stdout.split())  # rich may wrap the title
    html = (out / "report.html").read_text()
    assert "Training loss" in html and "Results" in html and "Held-out accuracy vs training steps" in html
    # a rerun reuses every finished stage
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier, reusing") == 4
    # other settings over a finished run: refused before any work, naming what changed (issue 13, case 1)
    results = (out / "results.json").read_text()
    changed = subprocess.run(cmd + ["preset=4x3", "n_test=5"], capture_output=True, text=True, timeout=600)
    assert changed.returncode == 2, changed.stdout[-3000:] + changed.stderr[-3000:]
    assert "stage data" in changed.stderr and "preset: '3x3' then, '4x3' now" in changed.stderr
    assert "force=true" in changed.stderr and "Traceback" not in changed.stderr
    assert (out / "results.json").read_text() == results


def test_quick_switch_and_curve_steps():
    from pathlib import Path

    from threadweaver_verl.cli.demo import DemoConfig
    from threadweaver_verl.config import load_config

    yaml = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    quick = load_config(DemoConfig, ["--config", str(yaml), "--quick", "preset=4x3", "train_steps=500"])
    assert quick.quick and quick.preset == "4x3" and quick.effective().train_steps == 40
    assert DemoConfig().curve_steps() == [500, 1000] and quick.effective().curve_steps() == [20]


@pytest.mark.slow
def test_the_safety_stop_fails_the_demo_loudly(tmp_path):
    """A training that the time limit ends is not the reference result: the demo says so and exits 1."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "threadweaver_verl", "demo", "--quick", f"out={out}", "time_limit_minutes=0.0005"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = " ".join(proc.stdout.split())
    assert "demo failed" in text and "stopped by the time limit" in text and "of 40" in text
    assert "not the reference result" in text
    assert not (out / "stages" / "sft.json").exists()  # a rerun trains again instead of reusing it
