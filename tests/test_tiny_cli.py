"""``tiny-model``: builds a HF folder that loads offline in transformers (and, slow, in vLLM's CPU build
through the session's shared server), byte-identical for a seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from threadweaver_verl.__main__ import main as cli
from threadweaver_verl.format import ALL_TAGS, TokenFormat
from threadweaver_verl.models.tags import check_tags

REPO = Path(__file__).resolve().parents[1]
SMALL = ["hidden_size=64", "intermediate_size=128", "num_attention_heads=2", "num_key_value_heads=1", "head_dim=32"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert (
            cli(
                [
                    "tiny-model",
                    "--config",
                    str(REPO / "configs" / "tiny_model.yaml"),
                    f"out={root / name}",
                    f"seed={seed}",
                    *SMALL,
                ]
            )
            == 0
        )
    return root


def test_same_seed_same_files(built):
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (built / "a" / f).read_bytes() == (built / "b" / f).read_bytes(), f
    assert (built / "a" / "tokenizer.json").read_bytes() == (built / "c" / "tokenizer.json").read_bytes()
    assert (built / "a" / "model.safetensors").read_bytes() != (built / "c" / "model.safetensors").read_bytes()


def test_loads_offline_in_transformers(built, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = built / "a"
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    assert model.config.hidden_size == 64 and model.config.model_type == "qwen3"
    assert json.loads((path / "threadweaver_tiny.json").read_text())["seed"] == 1
    check_tags(tok)
    fmt = TokenFormat.from_tokenizer(tok)
    assert tok.eos_token == "<|im_end|>" and fmt.eos_ids == (tok.eos_token_id,)
    assert len({check_tags(tok).id(t) for t in ALL_TAGS}) == len(ALL_TAGS)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 * 34?"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()
    # Digits are one token each (the task's steps rely on it).
    assert [tok.decode([i]) for i in tok.encode("4821", add_special_tokens=False)] == ["4", "8", "2", "1"]


def test_missing_out_is_an_error(capsys):
    assert cli(["tiny-model", "seed=1"]) == 2
    assert "out=DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_folder_serves_on_vllm_cpu(tmp_path, tiny_model_dir, vllm_server):
    """The CLI's default folder is the one the session's vLLM server serves (byte for byte), and that
    server's greedy tokens and log-probs agree with transformers on it: it loads in vLLM's CPU build."""
    import asyncio

    from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine

    assert cli(["tiny-model", f"out={tmp_path / 'default'}"]) == 0
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (tmp_path / "default" / f).read_bytes() == (tiny_model_dir / f).read_bytes(), f
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 * 34?"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )

    async def go():
        async with OpenAICompletionsEngine(base_url=vllm_server.url) as engine:
            return await engine.complete(
                prompt,
                max_tokens=8,
                stop_token_ids=[],
                routing_key="tiny-cli",
                sampling={"temperature": 0.0, "logprobs": True, "ignore_eos": True},
            )

    got = asyncio.run(go())
    assert len(got.token_ids) == 8 and got.logprobs is not None
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = list(prompt)
    with torch.no_grad():
        for token, logprob in zip(got.token_ids, got.logprobs):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            # The served pick is transformers' argmax (up to bf16-level ties) with the same log-prob.
            assert lp.max().item() - lp[token].item() < 2e-2
            assert abs(lp[token].item() - logprob) < 3e-2
            ids.append(token)
