"""``tiny-model``: builds a HF folder that loads offline in transformers (and, slow, in vLLM's CPU build),
byte-identical for a seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from threadweaver_verl.__main__ import main as cli
from threadweaver_verl.format import ALL_TAGS, TokenFormat
from threadweaver_verl.tokenizer import check_tags

REPO = Path(__file__).resolve().parents[1]
SMALL = ["hidden_size=64", "intermediate_size=128", "num_attention_heads=2", "num_key_value_heads=1", "head_dim=32"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert cli(["tiny-model", "--config", str(REPO / "configs" / "tiny_model.yaml"), f"out={root / name}",
                    f"seed={seed}", *SMALL]) == 0
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
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 * 34?"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()
    # Digits are one token each (the task's steps rely on it).
    assert [tok.decode([i]) for i in tok.encode("4821", add_special_tokens=False)] == ["4", "8", "2", "1"]


def test_missing_out_is_an_error(capsys):
    assert cli(["tiny-model", "seed=1"]) == 2
    assert "out=DIR" in capsys.readouterr().err


VLLM_SCRIPT = textwrap.dedent("""
    import json, sys
    from vllm import LLM, SamplingParams

    if __name__ == "__main__":
        path, prompt = sys.argv[1], json.loads(sys.argv[2])
        llm = LLM(model=path, dtype="float32", enforce_eager=True, max_model_len=512, seed=0,
                  enable_prefix_caching=True)
        out = llm.generate([{"prompt_token_ids": prompt}],
                           SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, ignore_eos=True))
        o = out[0].outputs[0]
        print("RESULT " + json.dumps({"ids": list(o.token_ids),
                                      "logprobs": [lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)]}))
""")


@pytest.mark.slow
def test_loads_in_vllm_cpu(built, tmp_path):
    """One offline vLLM start-up: its greedy tokens and logprobs agree with transformers on the same folder."""
    pytest.importorskip("vllm")
    path = built / "a"
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12 * 34?"}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False)
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="2", TORCHINDUCTOR_VEC_ISA_OK="1",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"), VLLM_CACHE_ROOT=str(tmp_path / "vllm"))
    proc = subprocess.run([sys.executable, str(script), str(path), json.dumps(prompt)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    got = json.loads(lines[-1][len("RESULT "):])
    assert len(got["ids"]) == 8

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = list(prompt)
    with torch.no_grad():
        for token, logprob in zip(got["ids"], got["logprobs"]):
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
            assert lp.max().item() - lp[token].item() < 1e-3  # vLLM's pick is (one of) transformers' argmax
            assert abs(lp[token].item() - logprob) < 1e-2
            ids.append(token)
