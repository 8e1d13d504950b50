"""The demo's report.html: results table, speedup histogram, one trajectory with its threads, its trie
attention mask and the loss curves, from a real multiplication trajectory and the tiny model's tokenizer."""

from __future__ import annotations

import json

from threadweaver_verl.cli.demo import DemoConfig
from threadweaver_verl.data.chat import PromptStyle, prompt_ids
from threadweaver_verl.eval.records import EvalSummary
from threadweaver_verl.eval.report import pick_trajectory, write_demo_report, write_eval_report
from threadweaver_verl.tasks import multiplication as mul


def _record(fmt, tok, sample, i, **over):
    prompt = prompt_ids(tok, PromptStyle().messages(sample.problem.question))
    response = fmt.encode_text(sample.parallel) + [tok.eos_token_id]
    st = fmt.stats(fmt.parse(response))
    rec = {
        "problem": f"p{i}",
        "sample": 0,
        "data_source": "test/mult",
        "index": i,
        "ground_truth": sample.problem.answer,
        "error": None,
        "valid": True,
        "correct": True,
        "prompt_ids": prompt,
        "response_ids": response,
        "stats": {"total_tokens": st.total_tokens, "critical_path": st.critical_path, "num_threads": st.num_threads},
    }
    return {**rec, **over}


def test_report_shows_table_histogram_threads_mask_and_loss(tiny_model_dir, tiny_tokenizer, tiny_fmt, tmp_path):
    samples = {
        name: mul.make_samples(mul.Difficulty.parse(name), 1, seed=0, split="test")[0] for name in ("3x2", "3x3")
    }
    out = tmp_path / "demo"
    (out / "eval_parallel").mkdir(parents=True)
    records = [
        _record(tiny_fmt, tiny_tokenizer, samples["3x3"], 0, correct=False),  # wrong: not preferred
        _record(tiny_fmt, tiny_tokenizer, samples["3x2"], 1),  # correct, 2 threads
        _record(tiny_fmt, tiny_tokenizer, samples["3x3"], 2),  # correct, 3 threads: the one to show
        _record(tiny_fmt, tiny_tokenizer, samples["3x3"], 3, valid=False),
    ]
    jsonl = out / "eval_parallel" / "trajectories.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert pick_trajectory(jsonl).problem == "p2"
    write_eval_report(out / "eval_parallel", EvalSummary(accuracy=1.0, token_speedup=1.29), {"p2": 1.29}, True)
    curves = {}
    for kind in ("parallel", "sequential"):
        path = tmp_path / f"{kind}.csv"
        path.write_text("step,epoch,elapsed_s,loss,learning_rate,grad_norm\n1,0,1,5.0,0.001,1\n10,0,9,1.0,0.001,1\n")
        curves[kind] = {"model_dir": str(tiny_model_dir), "loss_curve": str(path)}
    rows = [
        {"model": "sequential", "accuracy": 1.0, "mean_L": 212.8},
        {"model": "parallel (fork/join)", "accuracy": 1.0, "mean_L": 164.8},
    ]

    accuracy = {
        "sequential": {"600": 0.62, "1200": 1.0, "1800": 1.0},
        "parallel": {"600": 0.4, "1200": 0.995, "1800": 1.0},
    }
    page = write_demo_report(out, DemoConfig(), rows, curves, tmp_path, accuracy)

    html = page.read_text()
    assert "multiplication 3x3, 200 held-out problems" in html
    assert "<h2>Results</h2>" in html and "164.800" in html and "parallel (fork/join)" in html
    assert "report_assets/speedup_hist.png" in html
    assert "problem p2, correct" in html
    assert html.count("class='thread'") == 3  # the 3x3 trajectory, each thread in its own box
    assert samples["3x3"].problem.answer in html
    assert "report_assets/trie_mask.png" in html and "report_assets/loss.png" in html
    assert "Held-out accuracy vs training steps" in html and "report_assets/accuracy_curve.png" in html
    for png in ("speedup_hist.png", "trie_mask.png", "loss.png", "accuracy_curve.png"):
        assert (out / "report_assets" / png).stat().st_size > 1000, png

    def style(path):
        return path.read_text().split("<style>")[1].split("</style>")[0]

    assert style(page) == style(out / "eval_parallel" / "report.html")  # one page writer for both reports


def test_report_says_so_when_no_trajectory_is_valid(tiny_model_dir, tiny_tokenizer, tiny_fmt, tmp_path):
    sample = mul.make_samples(mul.Difficulty.parse("3x3"), 1, seed=0, split="test")[0]
    out = tmp_path / "demo"
    (out / "eval_parallel").mkdir(parents=True)
    (out / "eval_parallel" / "trajectories.jsonl").write_text(
        json.dumps(_record(tiny_fmt, tiny_tokenizer, sample, 0, valid=False)) + "\n"
    )
    page = write_demo_report(
        out,
        DemoConfig(),
        [{"model": "parallel (fork/join)", "accuracy": 0.0}],
        {"parallel": {"model_dir": str(tiny_model_dir)}},
        tmp_path,
    )
    html = page.read_text()
    assert "No format-valid trajectory to show." in html and "trie_mask.png" not in html
    assert "accuracy_curve.png" not in html  # no curve was measured
