"""The eval report's speedup histogram: visible bars whatever the spread of speedups."""

from __future__ import annotations

import pytest

from threadweaver_verl.eval.evaluate import EvalConfig, sampling_of, speedup_bins, write_report


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
    page = write_report(tmp_path, {"accuracy": 1.0}, {f"p{i}": 1.291 for i in range(50)}, vs_baseline=True)
    assert page.exists() and (tmp_path / "speedup_hist.png").stat().st_size > 1000
    assert "speedup_hist.png" in page.read_text()


def test_log_probs_have_one_setting():
    """``engine.logprobs`` alone decides whether the server is asked for log-probs (off for evaluating)."""
    from threadweaver_verl.config import ConfigError, load_config

    assert EvalConfig().engine.logprobs is False
    cfg = load_config(EvalConfig, ["engine.logprobs=true"])
    assert cfg.engine.logprobs is True and "logprobs" not in sampling_of(cfg)
    with pytest.raises(ConfigError, match="logprobs"):
        load_config(EvalConfig, ["logprobs=true"])
