"""``threadweaver demo``: the whole method in miniature on a CPU.

1. make-data: multiplication problems with parallel and sequential solutions (train / held-out test);
2. two tiny Qwen3-style models from one seed; trie SFT of one on the parallel solutions and of the
   other on the sequential ones, same optimiser, steps and time budget (both run at once, one core each);
3. each served by vLLM (CPU build); the parallel model evaluated with fork/join inference, the
   sequential one with plain decoding, on the same held-out problems;
4. a table (accuracy, format-valid rate, mean T, mean L, token speedup, wall clock, prefix-cache hits)
   and ``report.html`` (table, per-problem speedup histogram, one trajectory with its threads, its trie
   attention mask, the training loss curves).

Every artefact lives in ``out``; a rerun reuses finished stages (``force=true`` redoes them).
``--quick`` finishes in about 3 minutes (smoke test: it does not train long enough to be accurate).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .tiny import TinyModelConfig


@dataclass
class DemoConfig:
    """Settings of the demo; every one can be overridden as key=value (e.g. ``train_minutes=5``)."""

    out: str = "runs/demo"  # every artefact goes here
    preset: str = "3x3"  # task difficulty: a multiplication preset ("3x3": 3 threads, ideal seq T / par L 1.29)
    n_train: int = 20000  # training problems (each model sees the same problems, in the same order)
    n_test: int = 200  # held-out problems both models are evaluated on
    seed: int = 0
    model: TinyModelConfig = field(default_factory=lambda: TinyModelConfig(
        hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=48))  # ~1.7M parameters
    train_minutes: float = 18.0  # wall-clock budget of EACH training (both run at the same time; the
    # learning-rate schedule anneals over this budget, so a longer one trains better, not just longer)
    max_steps: int = 3000  # optimizer steps of each training (the time budget may stop it first)
    batch_size: int = 5  # packed rows per optimizer step
    row_tokens: int = 768  # token budget of one packed trie row: fits 2 parallel tries (~370 tokens) or 3 sequential chains (~250)
    learning_rate: float = 2e-3
    warmup_steps: int = 50
    eval_concurrency: int = 16
    max_response_tokens: int = 2048  # fork/join budgets of the evaluation (the tiny model's context is 4096)
    max_thread_tokens: int = 512
    kv_block_size: int = 16  # vLLM KV block size: prefix-cache hits come in whole blocks
    temperature: float = 0.0  # greedy decoding for the evaluation
    quick: bool = False  # a ~3 minute smoke run: few problems, seconds of training
    force: bool = False  # redo every stage even if its results exist

    def effective(self) -> "DemoConfig":
        if not self.quick:
            return self
        return DemoConfig(**{**asdict(self), "model": self.model, "n_train": min(self.n_train, 200),
                             "n_test": min(self.n_test, 12), "train_minutes": min(self.train_minutes, 0.4),
                             "max_steps": min(self.max_steps, 40)})


class Stages:
    """Run-once stages: a stage's result JSON marks it done."""

    def __init__(self, out: Path, force: bool):
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.force = force

    def run(self, name: str, fn: Callable[[], dict], console) -> dict:
        marker = self.dir / f"{name}.json"
        if marker.exists() and not self.force:
            console.print(f"[dim]stage {name}: done earlier, reusing ({marker})[/dim]")
            return json.loads(marker.read_text())
        console.rule(f"stage: {name}")
        t0 = time.monotonic()
        result = fn()
        result["seconds"] = round(time.monotonic() - t0, 1)
        marker.write_text(json.dumps(result, indent=2))
        return result


def _train_both(cfg: DemoConfig, out: Path, base: Path, data: Path, console) -> dict:
    """Both SFT runs at once, one core each (a tiny model gains little from a second thread)."""
    procs = {}
    for kind in ("parallel", "sequential"):
        args = [sys.executable, "-m", "threadweaver_verl", "sft", f"model={base}",
                f"train_files=[{data / f'sft_{kind}.parquet'}]", f"output_dir={out / f'sft_{kind}'}",
                "layout=trie", f"minutes={cfg.train_minutes}", f"max_steps={cfg.max_steps}",
                f"batch_size={cfg.batch_size}", f"max_tokens={cfg.row_tokens}", f"learning_rate={cfg.learning_rate}",
                f"warmup_steps={cfg.warmup_steps}", f"seed={cfg.seed}", "logging_steps=10"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = open(out / f"sft_{kind}.log", "w")
        procs[kind] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    _wait_with_progress(procs, cfg.train_minutes, out)
    results = {}
    for kind, (p, log) in procs.items():
        log.close()
        if p.returncode != 0:
            tail = (out / f"sft_{kind}.log").read_text()[-3000:]
            raise RuntimeError(f"SFT of the {kind} model failed (exit {p.returncode}); log tail:\n{tail}")
        results[kind] = json.loads((out / f"sft_{kind}" / "sft_summary.json").read_text())["result"]
    return results


def _wait_with_progress(procs: dict, minutes: float, out: Path) -> None:
    """One bar over the time budget (what usually ends training), with each run's step and loss."""
    from tqdm.auto import tqdm

    total = max(1, round(minutes * 60))
    bar = tqdm(total=total, desc="training both models", unit="s",
               bar_format="{l_bar}{bar}| {n}/{total} s [{elapsed}<{remaining}{postfix}]")
    start = time.monotonic()
    while any(p.poll() is None for p, _ in procs.values()):
        time.sleep(2)
        last = {k: _last_step(out / f"sft_{k}" / "loss_curve.csv") for k in procs}
        bar.n = min(total, round(time.monotonic() - start))
        bar.set_postfix({k: f"step {step} loss {loss}" for k, (step, loss) in last.items()}, refresh=True)
    bar.close()


def _last_step(curve: Path) -> tuple[int, str]:
    """(step, loss) of the last logged line of a loss_curve.csv, (0, '-') before the first."""
    try:
        last = curve.read_text().strip().splitlines()[-1].split(",")
        return int(float(last[0])), f"{float(last[3]):.3f}"
    except (OSError, IndexError, ValueError):
        return 0, "-"


def _evaluate_both(cfg: DemoConfig, out: Path, data: Path, models: dict[str, str]) -> dict:
    """Serve both models with vLLM (started side by side: start-up dominates a short run), then
    evaluate the sequential model with plain decoding and the parallel one with fork/join."""
    from concurrent.futures import ThreadPoolExecutor

    from .evaluate import EvalConfig, evaluate
    from .rollout.controller import ControllerConfig
    from .serving import VLLMServer, VLLMServerConfig

    # Prefix caching works in whole KV blocks: the tiny task's shared contexts (~70 tokens) are
    # shorter than a default CPU block, so use small blocks to let thread requests hit the cache.
    servers = {k: VLLMServer(VLLMServerConfig(model=m, work_dir=str(out / f"vllm_{k}"),
                                              extra_args=["--block-size", str(cfg.kv_block_size)]))
               for k, m in models.items()}
    try:
        with ThreadPoolExecutor(2) as pool:
            for f in [pool.submit(s.start) for s in servers.values()]:
                f.result()
        common = dict(data=str(data / "test.parquet"), n_samples=1, temperature=cfg.temperature,
                      concurrency=cfg.eval_concurrency)
        budgets = dict(max_response_tokens=cfg.max_response_tokens, max_thread_tokens=cfg.max_thread_tokens)
        seq = evaluate(EvalConfig(server_url=servers["sequential"].url, tokenizer=models["sequential"],
                                  out_dir=str(out / "eval_sequential"),
                                  controller=ControllerConfig(fork=False, **budgets), **common))
        par = evaluate(EvalConfig(server_url=servers["parallel"].url, tokenizer=models["parallel"],
                                  out_dir=str(out / "eval_parallel"),
                                  baseline=str(out / "eval_sequential" / "trajectories.jsonl"),
                                  controller=ControllerConfig(fork=True, **budgets), **common))
    finally:
        for s in servers.values():
            s.stop()
    return {"sequential": seq, "parallel": par}


def results_table(evals: dict) -> list[dict[str, Any]]:
    seq, par = evals["sequential"], evals["parallel"]
    seq_T = seq["mean_T"]
    rows = []
    for name, s in (("sequential", seq), ("parallel (fork/join)", par)):
        rows.append({
            "model": name,
            "accuracy": s["accuracy"],
            "format_valid": s["format_valid_rate"],
            "mean_T": s["mean_T"],
            "mean_L": s["mean_L"],
            "token_speedup": (seq_T / s["mean_L"]) if s["mean_L"] else None,
            "wall_s_per_problem": s["wall_s_per_problem"],
            "wall_speedup": seq["wall_s_per_problem"] / s["wall_s_per_problem"] if s["wall_s_per_problem"] else None,
            "thread_cache_hit_rate": s.get("thread_cache_hit_rate"),
        })
    return rows


def print_table(rows: list[dict], console, title: str) -> None:
    """Metrics down, models across (fits a narrow terminal)."""
    from rich.table import Table

    from .report import format_cell

    t = Table(title=title)
    t.add_column("metric")
    for r in rows:
        t.add_column(str(r["model"]), justify="right")
    for key in rows[0]:
        if key != "model":
            t.add_row(key, *[format_cell(r[key]) for r in rows])
    console.print(t)



def run(cfg: DemoConfig, console=None) -> dict:
    from rich.console import Console

    from .tasks.cli import MakeDataConfig, make_data
    from .tiny import build_tiny_model

    console = console or Console()
    cfg = cfg.effective()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    stages = Stages(out, cfg.force)
    t_start = time.monotonic()
    data = out / "data"
    stages.run("data", lambda: make_data(MakeDataConfig(out=str(data), preset=cfg.preset, n_train=cfg.n_train,
                                                        n_test=cfg.n_test, seed=cfg.seed), console), console)
    base = out / "base_model"

    def build() -> dict:
        from .data.schema import read_sft

        corpus = [r["response"] for r in read_sft(data / "sft_parallel.parquet")[:500]] + \
                 [r["response"] for r in read_sft(data / "sft_sequential.parquet")[:500]]
        build_tiny_model(base, cfg.model, corpus=corpus)
        return {"model_dir": str(base)}

    stages.run("base_model", build, console)
    sft = stages.run("sft", lambda: _train_both(cfg, out, base, data, console), console)
    models = {k: sft[k]["model_dir"] for k in ("parallel", "sequential")}
    evals = stages.run("eval", lambda: _evaluate_both(cfg, out, data, models), console)
    rows = results_table(evals)
    from .report import write_demo_report

    report = write_demo_report(out, cfg, rows, sft, data)
    result = {"table": rows, "sft": sft, "report": str(report), "minutes": round((time.monotonic() - t_start) / 60, 2)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print_table(rows, console, f"ThreadWeaver demo: multiplication {cfg.preset}, {cfg.n_test} held-out problems")
    console.print(f"report: {report}   ({result['minutes']} min this run)")
    return result


def main(argv: Sequence[str] = ()) -> int:
    from .config import load_config

    run(load_config(DemoConfig, list(argv)))
    return 0
