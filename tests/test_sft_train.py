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
    rc = cli(
        [
            "sft",
            f"model={tiny_model_dir}",
            f"train_files=[{parquet}]",
            f"val_files=[{parquet}]",
            f"output_dir={out}",
            "max_steps=4",
            "batch_size=2",
            "max_tokens=1200",
            "logging_steps=1",
            "learning_rate=0.003",
        ]
    )
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


def test_time_limit_is_a_loud_safety_stop(tiny_model_dir, parquet, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli(
        [
            "sft",
            f"model={tiny_model_dir}",
            f"train_files=[{parquet}]",
            f"output_dir={out}",
            "max_steps=1000",
            "time_limit_minutes=0.0001",
            "layout=expanded",
            "max_tokens=800",
            "batch_size=2",
        ]
    )
    assert rc == 1
    assert "stopped by the time limit" in capsys.readouterr().err
    summary = json.loads((out / "sft_summary.json").read_text())["result"]
    assert summary["stopped_by"] == "time_limit" and 1 <= summary["steps"] < 1000
    assert (out / "model" / "config.json").exists()  # nothing is lost: the model so far is saved


def test_the_step_budget_not_the_clock_ends_training(tiny_model_dir, parquet, tmp_path):
    """Two runs whose time limits are far above what they need give identical weights: the step budget
    (and the learning-rate schedule over it) decides the model, not the machine's speed."""
    from safetensors.torch import load_file

    weights = []
    for limit in (30, 90):
        out = tmp_path / f"limit{limit}"
        rc = cli(
            [
                "sft",
                f"model={tiny_model_dir}",
                f"train_files=[{parquet}]",
                f"output_dir={out}",
                "max_steps=6",
                f"time_limit_minutes={limit}",
                "pack=false",
                "batch_tokens=1600",
                "max_tokens=1200",
                "learning_rate=0.003",
                "warmup_steps=2",
                "logging_steps=1",
            ]
        )
        assert rc == 0
        summary = json.loads((out / "sft_summary.json").read_text())["result"]
        assert summary["stopped_by"] == "steps" and summary["steps"] == 6
        assert summary["batch_size"] == max(1, 1600 // summary["longest_row"])
        weights.append(load_file(out / "model" / "model.safetensors"))
        with (out / "loss_curve.csv").open() as f:
            lrs = [float(r["learning_rate"]) for r in csv.DictReader(f)]
        assert lrs[-1] < lrs[2]  # the cosine anneals over the step budget
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name


def test_bad_settings_say_what_to_fix(tmp_path):
    from threadweaver_verl.sft.train import SFTConfig, check_config

    with pytest.raises(ValueError, match="model=DIR"):
        check_config(SFTConfig(train_files=["x.parquet"], output_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="layout must be one of"):
        check_config(SFTConfig(model="m", train_files=["x"], output_dir="o", layout="dense"))
    with pytest.raises(ValueError, match="time_limit_minutes must be >= 0"):
        check_config(SFTConfig(model="m", train_files=["x"], output_dir="o", time_limit_minutes=-3))
    with pytest.raises(ValueError, match="batch_tokens must be >= 0"):
        check_config(SFTConfig(model="m", train_files=["x"], output_dir="o", batch_tokens=-1))
    # a setting error is the dispatcher's exit-2 kind (ConfigError), not a bug
    from threadweaver_verl.config import ConfigError

    with pytest.raises(ConfigError, match="batch_size must be positive"):
        SFTConfig(model="m", train_files=["x"], output_dir="o", batch_size=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="flex attention trains on a GPU")
def test_flex_on_a_cpu_is_refused_before_any_work(tiny_model_dir, parquet, tmp_path):
    from threadweaver_verl.config import ConfigError
    from threadweaver_verl.sft.train import SFTConfig, train

    out = tmp_path / "out"
    cfg = SFTConfig(model=str(tiny_model_dir), train_files=[str(parquet)], output_dir=str(out), attention="flex")
    with pytest.raises(ConfigError, match="attention=flex cannot train on a CPU"):
        train(cfg)
    assert not out.exists()


def test_attention_choice_respects_that_cpu_flex_has_no_backward():
    from threadweaver_verl.sft.batch import choose_attention

    assert choose_attention("auto", 100, 4096) == "sdpa"
    assert choose_attention("auto", 8192, 4096, "cpu", needs_grad=False) == "flex"
    assert choose_attention("auto", 8192, 4096, "cpu", needs_grad=True) == "sdpa"
    assert choose_attention("auto", 8192, 4096, "cuda", needs_grad=True) == "flex"
    with pytest.raises(ValueError, match="no CPU backward"):
        choose_attention("flex", 100, 4096, "cpu", needs_grad=True)


@pytest.mark.slow
def test_vllm_serves_the_checkpoints_and_agrees_with_transformers(tiny_model_dir, parquet, tmp_path):
    """The checkpoints the SFT path writes are what vLLM (CPU build) serves: same greedy tokens, both when a
    server starts on the final model and when a running server reloads a ``checkpoint-N`` in place."""
    import httpx
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from threadweaver_verl.data.chat import PromptStyle, prompt_ids
    from threadweaver_verl.rollout.vllm_server import VLLMServer, VLLMServerConfig
    from threadweaver_verl.sft.train import SFTConfig, train

    res = train(
        SFTConfig(
            model=str(tiny_model_dir),
            train_files=[str(parquet)],
            output_dir=str(tmp_path / "run"),
            max_steps=3,
            batch_size=2,
            max_tokens=1200,
            learning_rate=0.003,
            save_steps=3,
            save_only_model=True,
        )
    )
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").exists() and not (checkpoint / "optimizer.pt").exists()
    tok = AutoTokenizer.from_pretrained(res.model_dir)
    prompt = prompt_ids(tok, PromptStyle().messages("What is 12 * 34?"))

    def hf_greedy(folder) -> list[int]:
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            return hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()

    def served(server) -> list[int]:
        reply = httpx.post(
            f"{server.url}/v1/completions",
            timeout=120,
            json={"prompt": prompt, "max_tokens": 12, "temperature": 0.0, "return_token_ids": True},
        ).json()
        return reply["choices"][0]["token_ids"]

    trained, base = hf_greedy(res.model_dir), hf_greedy(tiny_model_dir)
    assert trained != base  # otherwise the reload below would prove nothing
    cfg = VLLMServerConfig(model=res.model_dir, dtype="float32", work_dir=str(tmp_path / "vllm"))
    with VLLMServer(cfg) as server:
        got = served(server)
    assert len(got) >= 1 and got == trained[: len(got)]
    cfg = VLLMServerConfig(
        model=str(tiny_model_dir), dtype="float32", work_dir=str(tmp_path / "vllm2"), weight_reload=True
    )
    with VLLMServer(cfg) as server:
        before = served(server)
        server.reload_weights(checkpoint)
        after = served(server)
    assert before == base[: len(before)]
    assert len(after) >= 1 and after == trained[: len(after)]
