"""Trie SFT through verl 0.9.1's own SFT trainer (``verl/trainer/sft_trainer.py``) on this CPU machine.

``torchrun -m verl.trainer.sft_trainer`` in a subprocess, in verl's CPU mode (FSDP2 over gloo), with our
``TrieSFTDataset`` and trie engine (``VERL_ENGINE_VENDOR=threadweaver_trie``). One global batch holds every
row, so verl's first-step loss is the HF-Trainer path's loss (``TrieTrainer.compute_loss``: the token mean
over one batch) on the initial model; the next steps lower it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from _sft_common import NESTED, multiplication_texts, three_threads, write_sft_parquet
from _verl_cpu import cpu_env

pytestmark = pytest.mark.slow

STEPS = 4
MAX_LENGTH = 700
FP32 = "{param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}"


@pytest.fixture(scope="module")
def sft_run(tiny_model_dir, tmp_path_factory):
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from threadweaver_verl.integrations.verl.sft_dataset import TrieSFTDataset

    work = tmp_path_factory.mktemp("verl-cpu-sft")
    items = [("What is 12 * 34?", NESTED), ("57?", three_threads())] + multiplication_texts(3, "3x3")
    parquet = write_sft_parquet(work / "sft.parquet", items)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    data_config = OmegaConf.create({"max_length": MAX_LENGTH, "pad_mode": "no_padding", "truncation": "error"})
    env = cpu_env(work, VERL_ENGINE_VENDOR="threadweaver_trie", VERL_FILE_LOGGER_PATH=str(work / "metrics.jsonl"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VERL_ENGINE_VENDOR", "threadweaver_trie")
        rows = TrieSFTDataset(str(parquet), tokenizer, data_config).rows
    assert len(rows) >= 2
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=1",
        "-m",
        "verl.trainer.sft_trainer",
        f"model.path={tiny_model_dir}",
        "+model.override_config.attn_implementation=sdpa",
        "model.enable_gradient_checkpointing=false",
        f"data.train_files={parquet}",
        "data.val_files=null",
        "data.custom_cls.path=pkg://threadweaver_verl.integrations.verl.sft_dataset",
        "data.custom_cls.name=TrieSFTDataset",
        f"data.max_length={MAX_LENGTH}",
        f"data.train_batch_size={len(rows)}",
        f"data.micro_batch_size_per_gpu={len(rows)}",
        "data.use_dynamic_bsz=false",
        "data.num_workers=0",
        "engine.strategy=fsdp2",
        "engine.use_torch_compile=false",
        f"+engine.mixed_precision={FP32}",
        "optim.lr=1e-3",
        "trainer.device=cpu",
        "trainer.logger=[console,file]",
        f"trainer.total_training_steps={STEPS}",
        f"trainer.total_epochs={STEPS}",
        f"trainer.default_local_dir={work / 'ckpt'}",
        "checkpoint.save_contents=[model]",
    ]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    metrics = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    return rows, tokenizer, {m["step"]: m["data"] for m in metrics}


def test_first_step_loss_equals_the_hf_trainer_path(sft_run, tiny_model_dir):
    from _sft_common import load_model

    from threadweaver_verl.sft.train import mean_loss

    rows, tokenizer, steps = sft_run
    hf_loss = mean_loss(
        load_model(tiny_model_dir), rows, tokenizer.pad_token_id, batch_size=len(rows), attention="sdpa"
    )
    assert steps[1]["train/loss"] == pytest.approx(hf_loss, abs=1e-5)


def test_a_few_steps_lower_the_loss(sft_run):
    _, _, steps = sft_run
    losses = [steps[s]["train/loss"] for s in sorted(steps) if "train/loss" in steps[s]]
    assert len(losses) == STEPS
    assert losses[-1] < losses[0] - 0.05, losses
