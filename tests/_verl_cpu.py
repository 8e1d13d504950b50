"""Runs verl 0.9.1's own trainers on this machine through verl's CPU mode (integrations/verl/cpu).

``run_main_ppo`` runs ``python -m verl.trainer.main_ppo`` in a subprocess with the P-GRPO preset and
the CPU preset (``+platform=cpu``), exactly as the README's command, and returns the metrics verl's
file logger wrote (one dict per step) and the log.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CPU_ENV = {
    "VERL_PLATFORM": "cpu",
    "VERL_USE_EXTERNAL_MODULES": "threadweaver_verl.integrations.verl.cpu",
}


def cpu_env(work: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # always a fresh local Ray cluster
    env.update(CPU_ENV)
    env.update(
        {
            "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor"),
            "VLLM_CACHE_ROOT": str(work / "vllm-cache"),
            "RAY_DEDUP_LOGS": "0",
        }
    )
    env.update(extra)
    return env


def write_multiplication_data(path: Path, n: int, seed: int, split: str) -> Path:
    import pandas as pd

    from threadweaver_verl.tasks.multiplication import Difficulty, generate_problems

    problems = generate_problems(Difficulty.parse("2x2"), n=n, seed=seed, split=split)
    rows = [{"problem": p.question, "answer": p.answer, "data_source": "multiplication"} for p in problems]
    pd.DataFrame(rows).to_parquet(path)
    return path


def write_agent_loop_yaml(path: Path) -> Path:
    import yaml

    loops = yaml.safe_load((ROOT / "configs" / "agent_loop.yaml").read_text())
    loops[0]["controller"]["outline_numbers"] = "by_position"  # the format-following model numbers nothing
    path.write_text(yaml.safe_dump(loops))
    return path


@dataclass
class PPORun:
    returncode: int
    seconds: float
    metrics: list[dict]  # verl's file logger: {"step": k, "data": {...}} per step
    log: str
    checkpoint_dir: Path

    def by_step(self) -> dict[int, dict]:
        return {m["step"]: m["data"] for m in self.metrics}


def main_ppo_command(
    model: Path,
    train: Path,
    val: Path,
    agent_loop_yaml: Path,
    checkpoint_dir: Path,
    steps: int,
    overrides=(),
    prompts: int = 8,
    n: int = 4,
) -> list[str]:
    """The command line: ``prompts`` prompts per step (one PPO mini-batch), ``n`` trajectories each."""
    return [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        "--config-path",
        str(ROOT / "configs"),
        "--config-name",
        "threadweaver_pgrpo",
        "+platform=cpu",
        f"actor_rollout_ref.model.path={model}",
        f"data.train_files={train}",
        f"data.val_files={val}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={agent_loop_yaml}",
        f"data.train_batch_size={prompts}",
        "data.max_prompt_length=256",
        "data.max_response_length=192",
        "data.filter_overlong_prompts_workers=1",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.rollout.n={n}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts}",
        # the format-following model's outlines carry no numbers (format_ok is false)
        "reward.custom_reward_function.reward_kwargs.bonus_requires_format_ok=false",
        # fp32 in the actor and in vLLM: the log-prob comparison after each sync is then exact up to kernels
        "actor_rollout_ref.rollout.dtype=float32",
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision={param_dtype:fp32,reduce_dtype:fp32,buffer_dtype:fp32}",
        "trainer.logger=[console,file]",
        f"trainer.total_training_steps={steps}",
        f"trainer.default_local_dir={checkpoint_dir}",
        "trainer.project_name=threadweaver_cpu",
        "trainer.experiment_name=test",
        *overrides,
    ]


def run_main_ppo(work: Path, command: list[str], timeout_s: float, tag: str, **extra_env: str) -> PPORun:
    metrics_file = work / f"{tag}.metrics.jsonl"
    log_file = work / f"{tag}.log"
    env = cpu_env(work, VERL_FILE_LOGGER_PATH=str(metrics_file), **extra_env)
    start = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
            rc = -1
    seconds = time.monotonic() - start
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    checkpoint_dir = Path(next((c.split("=", 1)[1] for c in command if c.startswith("trainer.default_local_dir=")), ""))
    return PPORun(rc, seconds, metrics, log_file.read_text(errors="replace"), checkpoint_dir)
