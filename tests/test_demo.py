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
    res = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in res["table"]}
    assert set(rows) == {"sequential", "parallel (fork/join)"}
    for r in rows.values():
        for key in ("accuracy", "format_valid"):
            assert 0.0 <= r[key] <= 1.0
        assert r["mean_T"] >= r["mean_L"] > 0
        assert r["token_speedup"] > 0 and r["wall_s_per_problem"] > 0
    assert rows["sequential"]["mean_T"] == pytest.approx(rows["sequential"]["mean_L"])  # no forks
    for artefact in ("data/train.parquet", "data/test.parquet", "sft_parallel/model/config.json",
                     "sft_sequential/model/config.json", "eval_parallel/trajectories.jsonl",
                     "eval_sequential/trajectories.jsonl", "report.html", "report_assets/loss.png"):
        assert (out / artefact).exists(), artefact
    html = (out / "report.html").read_text()
    assert "Training loss" in html and "Results" in html
    # a rerun reuses every finished stage
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier, reusing") == 4


def test_the_yaml_config_mirrors_the_demo_defaults():
    from pathlib import Path

    from threadweaver_verl.config import load_config
    from threadweaver_verl.demo import DemoConfig

    yaml = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    assert load_config(DemoConfig, ["--config", str(yaml)]) == DemoConfig()
    quick = load_config(DemoConfig, ["--config", str(yaml), "--quick", "preset=4x3", "train_minutes=2"])
    assert quick.quick and quick.preset == "4x3" and quick.effective().train_minutes == 0.4
