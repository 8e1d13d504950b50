"""The run-anywhere SFT path: ``python -m threadweaver_verl sft`` (HF Trainer + trie collator + loss)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from _sft_common import NESTED, multiplication_texts, three_threads, write_sft_parquet
from threadweaver_verl.__main__ import main as cli


@pytest.fixture(scope="module")
def parquet(tmp_path_factory):
    items = [("What is 12 * 34?", NESTED), ("57?", three_threads())] + multiplication_texts(2, "3x3")
    return write_sft_parquet(tmp_path_factory.mktemp("sft_train") / "sft.parquet", items)


def test_cli_trains_and_writes_a_loadable_checkpoint_and_a_loss_curve(tiny_model_dir, parquet, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from threadweaver_verl.format import TokenFormat

    out = tmp_path / "run"
    rc = cli(["sft", f"model={tiny_model_dir}", f"train_files=[{parquet}]", f"val_files=[{parquet}]",
              f"output_dir={out}", "max_steps=4", "batch_size=2", "max_tokens=1200", "logging_steps=1",
              "learning_rate=0.003"])
    assert rc == 0
    summary = json.loads((out / "sft_summary.json").read_text())["result"]
    assert summary["steps"] == 4 and summary["stopped_by"] == "steps" and summary["rows"] >= 2
    with (out / "loss_curve.csv").open() as f:
        curve = list(csv.DictReader(f))
    assert [int(r["step"]) for r in curve] == [1, 2, 3, 4]
    losses = [float(r["loss"]) for r in curve]
    assert losses[-1] < losses[0]  # it learns
    assert summary["val_loss"] is not None and summary["val_loss"] < losses[0]
    # the final checkpoint: HF folder with its tokenizer; loads and keeps the tags as single tokens
    model_dir = out / "model"
    m = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    TokenFormat.from_tokenizer(tok)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    moved = any(not torch.equal(a, b) for a, b in zip(m.state_dict().values(), base.state_dict().values()))
    assert moved
    assert (model_dir / "generation_config.json").exists() and (out / "sft.yaml").exists()


def test_time_budget_stops_training(tiny_model_dir, parquet, tmp_path):
    from threadweaver_verl.config import load_config
    from threadweaver_verl.sft.train import SFTConfig, train

    cfg = load_config(SFTConfig, [f"model={tiny_model_dir}", f"train_files=[{parquet}]", f"output_dir={tmp_path}",
                                  "max_steps=1000", "minutes=0.0001", "layout=expanded", "max_tokens=800",
                                  "batch_size=2"])
    res = train(cfg)
    assert res.stopped_by == "time" and 1 <= res.steps < 1000
    assert (tmp_path / "model" / "config.json").exists()


def test_time_budget_anneals_the_learning_rate_to_its_end(tiny_model_dir, parquet, tmp_path):
    # max_steps is far away: a step-based cosine would still be near its peak when the budget ends.
    from threadweaver_verl.config import load_config
    from threadweaver_verl.sft.train import SFTConfig, train

    cfg = load_config(SFTConfig, [f"model={tiny_model_dir}", f"train_files=[{parquet}]", f"output_dir={tmp_path}",
                                  "max_steps=100000", "minutes=0.04", "layout=expanded", "max_tokens=800",
                                  "batch_size=2", "logging_steps=1", "learning_rate=0.001"])
    res = train(cfg)
    assert res.stopped_by == "time"
    with (tmp_path / "loss_curve.csv").open() as f:
        lrs = [float(r["learning_rate"]) for r in csv.DictReader(f)]
    assert lrs[-1] < 0.05 * 0.001, lrs
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), lrs


def test_lr_factor_shapes():
    from threadweaver_verl.sft.train import lr_factor

    assert lr_factor("cosine", 0, 10, 0.0) == pytest.approx(0.1)  # warm-up
    assert lr_factor("cosine", 50, 10, 0.0) == 1.0
    assert lr_factor("cosine", 50, 10, 0.5) == pytest.approx(0.5)
    assert lr_factor("cosine", 50, 10, 1.7) == pytest.approx(0.0)  # clamped
    assert lr_factor("linear", 50, 0, 0.25) == pytest.approx(0.75)
    assert lr_factor("constant", 0, 10, 0.9) == 1.0


def test_bad_settings_say_what_to_fix(tmp_path):
    from threadweaver_verl.sft.train import SFTConfig, check_config

    with pytest.raises(ValueError, match="model=DIR"):
        check_config(SFTConfig(train_files=["x.parquet"], output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="layout must be one of"):
        check_config(SFTConfig(model="m", train_files=["x"], output_dir="o", layout="dense"))
    with pytest.raises(ValueError, match="schedule_by=time needs minutes"):
        check_config(SFTConfig(model="m", train_files=["x"], output_dir="o", schedule_by="time"))
    with pytest.raises(ValueError, match="set schedule_by=steps"):
        check_config(SFTConfig(model="m", train_files=["x"], output_dir="o", minutes=5, lr_scheduler="polynomial"))


def test_attention_choice_respects_that_cpu_flex_has_no_backward():
    from threadweaver_verl.sft.batch import choose_attention

    assert choose_attention("auto", 100, 4096) == "sdpa"
    assert choose_attention("auto", 8192, 4096, "cpu", needs_grad=False) == "flex"
    assert choose_attention("auto", 8192, 4096, "cpu", needs_grad=True) == "sdpa"
    assert choose_attention("auto", 8192, 4096, "cuda", needs_grad=True) == "flex"
    with pytest.raises(ValueError, match="no CPU backward"):
        choose_attention("flex", 100, 4096, "cpu", needs_grad=True)


@pytest.mark.slow
def test_vllm_serves_the_final_checkpoint_and_agrees_with_transformers(tiny_model_dir, parquet, tmp_path):
    """The checkpoint the SFT path writes is what vLLM (CPU build) serves: same greedy tokens."""
    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from threadweaver_verl.data.chat import PromptStyle, prompt_ids
    from threadweaver_verl.serving import VLLMServer, VLLMServerConfig
    from threadweaver_verl.sft.train import SFTConfig, train

    res = train(SFTConfig(model=str(tiny_model_dir), train_files=[str(parquet)], output_dir=str(tmp_path / "run"),
                          max_steps=3, batch_size=2, max_tokens=1200, learning_rate=0.003))
    tok = AutoTokenizer.from_pretrained(res.model_dir)
    prompt = prompt_ids(tok, PromptStyle().messages("What is 12 * 34?"))
    hf = AutoModelForCausalLM.from_pretrained(res.model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):].tolist()
    cfg = VLLMServerConfig(model=res.model_dir, dtype="float32", work_dir=str(tmp_path / "vllm"))
    with VLLMServer(cfg) as server:
        reply = httpx.post(f"{server.url}/v1/completions", timeout=120, json={
            "model": res.model_dir, "prompt": prompt, "max_tokens": 6, "temperature": 0.0,
            "return_token_ids": True}).json()
    got = reply["choices"][0]["token_ids"]
    assert got[:len(greedy)] == greedy[:len(got)] and len(got) >= 1


def test_the_yaml_config_mirrors_the_dataclass_defaults():
    from pathlib import Path

    from threadweaver_verl.config import load_config
    from threadweaver_verl.sft.train import SFTConfig

    yaml = Path(__file__).resolve().parent.parent / "configs" / "sft.yaml"
    assert load_config(SFTConfig, ["--config", str(yaml)]) == SFTConfig()
