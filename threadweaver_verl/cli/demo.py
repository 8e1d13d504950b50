"""``threadweaver demo``: the whole method in miniature on a CPU.

1. make-data: multiplication problems with parallel and sequential solutions (train / held-out test);
2. two tiny Qwen3-style models from one seed; trie SFT of one on the parallel solutions and of the
   other on the sequential ones, same optimiser, step budget and tokens per step, each at its own peak
   learning rate (both run at once, one core each). The step budget ends training, so every machine
   trains the same models; only the time differs. ``time_limit_minutes`` is a safety stop that fails
   the demo loudly, never its normal end;
3. one vLLM server (CPU build) at a time: it serves the sequential model, evaluated with plain decoding,
   then reloads the parallel model's weights, evaluated with fork/join inference, on the same held-out
   problems; intermediate checkpoints of both give the held-out accuracy against training steps;
   The same server then runs each model on the first ``latency_problems`` held-out problems one at a time:
   the latency a lone user waits;
4. a table (accuracy, format-valid rate, mean T, mean L, token speedup, latency at 1 in flight and
   throughput at ``eval_concurrency`` in flight, both against the sequential model, prefix-cache hits),
   the accuracy-vs-steps table, and ``report.html`` (table, accuracy curve, per-problem speedup
   histogram, one trajectory with its threads, its trie attention mask, the training loss curves).

Every artefact lives in ``out``; a rerun reuses a finished stage when its settings and inputs match the
stage's marker, and refuses with a message naming what changed otherwise (``force=true`` redoes every
stage). An interrupted evaluation resumes where it stopped.
``--quick`` finishes in a few minutes (smoke test: it does not train long enough to be accurate).
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from threadweaver_verl.config import ConfigError
from threadweaver_verl.models.tiny import TinyModelConfig
from threadweaver_verl.runs import Marker, OutputLock, UserError, atomic_write_text, output_dir


@dataclass
class DemoConfig:
    """Settings of the demo; every one can be overridden as key=value (e.g. ``train_steps=500``)."""

    out: str = "runs/demo"
    """Every artefact goes here."""
    preset: str = "3x3"
    """Task difficulty: a multiplication preset ("3x3": 3 threads, ideal seq T / par L 1.29)."""
    n_train: int = 20000
    """Training problems (each model sees the same problems, in the same order)."""
    n_test: int = 200
    """Held-out problems both models are evaluated on."""
    seed: int = 0
    """Seed of the problems, the initial weights (shared by both models) and the training order."""
    model: TinyModelConfig = field(
        default_factory=lambda: TinyModelConfig(
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=48,
        )
    )
    """Size of both models (they start from the same weights): ~1.7M parameters."""
    train_steps: int = 1500
    """Optimizer steps of each training: what ends it (the cosine LR schedule spans it). The README's accuracy-vs-steps
    table shows where both models pass 99% held-out accuracy; the rest of the budget is margin."""
    batch_tokens: int = 3840
    """Tokens per step: rows per step = 3840 // the longest trie (one trajectory per row): 10 parallel tries (~370
    tokens) or 15 sequential chains (~250): the same work per step for both models."""
    sequential_learning_rate: float = 1.4e-3
    """Peak learning rate of the sequential model's training (AdamW, cosine schedule over ``train_steps``).
    The two layouts learn best at different rates (measured at step 1000 of 1500, 200 held-out problems):
    the sequential model reached 97.5% at 2e-3 and 99.5% at 1.4e-3."""
    parallel_learning_rate: float = 2e-3
    """Peak learning rate of the parallel model's training: 100% at step 1000 of 1500 at 2e-3, 95% at 1.4e-3
    (see ``sequential_learning_rate``)."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine schedule."""
    bf16: bool = False
    """Train in bf16 autocast (fp32 weights and optimizer): ~1.3x faster steps on a CPU with native bf16, but off by
    default: in a measured run the parallel model learned more slowly in bf16 (27% held-out accuracy at step 1200 of
    1800, against 99.5% in fp32), which eats the budget's margin."""
    time_limit_minutes: float = 120.0
    """Safety stop of each training (not a budget): hitting it fails the demo."""
    curve_points: int = 2
    """Checkpoints evaluated for the accuracy-vs-steps curve, evenly spaced before the end."""
    curve_concurrency: int = 64
    """Problems in flight when evaluating those checkpoints (accuracy only)."""
    eval_concurrency: int = 16
    """Problems in flight for the final evaluation (its accuracy, and the table's throughput rows)."""
    latency_problems: int = 40
    """The table's latency rows: the first N held-out problems, one at a time, per model, on the same vLLM
    server as that model's final evaluation (about 1 s each on a CPU; 0 leaves the rows empty). The
    accuracy rows stay those of all ``n_test`` problems."""
    max_response_tokens: int = 2048
    """Response tokens of one trajectory in the evaluation (the tiny model's context is 4096)."""
    max_thread_tokens: int = 512
    """Tokens one thread may add in the evaluation (see ControllerConfig)."""
    kv_block_size: int = 16
    """vLLM KV block size: prefix-cache hits come in whole blocks."""
    temperature: float = 0.0
    """Greedy decoding for the evaluation."""
    quick: bool = False
    """A smoke run of a few minutes: few problems, 40 steps, one curve point."""
    force: bool = False
    """Redo every stage even if its results exist."""

    def __post_init__(self) -> None:
        from threadweaver_verl.tasks.multiplication import Difficulty, DifficultyError

        at_least_one = (
            "n_train",
            "n_test",
            "train_steps",
            "batch_tokens",
            "curve_concurrency",
            "eval_concurrency",
            "max_response_tokens",
            "max_thread_tokens",
            "kv_block_size",
        )
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in at_least_one if getattr(self, k) < 1]
        at_least_zero = ("warmup_steps", "curve_points", "latency_problems", "time_limit_minutes", "temperature")
        problems += [f"{k} must be >= 0, got {getattr(self, k)}" for k in at_least_zero if getattr(self, k) < 0]
        for k in ("sequential_learning_rate", "parallel_learning_rate"):
            if getattr(self, k) <= 0:
                problems.append(f"{k} must be > 0, got {getattr(self, k)}")
        try:
            Difficulty.parse(self.preset)
        except DifficultyError as e:
            problems.append(f"preset={self.preset!r}: {e}")
        if problems:
            raise ConfigError("demo settings: " + "; ".join(problems))

    def effective(self) -> DemoConfig:
        if not self.quick:
            return self
        return DemoConfig(
            **{
                **asdict(self),
                "model": self.model,
                "n_train": min(self.n_train, 200),
                "n_test": min(self.n_test, 12),
                "train_steps": min(self.train_steps, 40),
                "curve_points": min(self.curve_points, 1),
                "max_response_tokens": min(self.max_response_tokens, 512),
                "max_thread_tokens": min(self.max_thread_tokens, 256),
                "latency_problems": min(self.latency_problems, 4),
            }
        )

    def learning_rate(self, kind: str) -> float:
        """The peak learning rate of one model's training (``kind``: a :class:`ModelKind`)."""
        return self.parallel_learning_rate if kind == ModelKind.PARALLEL else self.sequential_learning_rate

    def curve_steps(self) -> list[int]:
        """Steps of the checkpoints evaluated for the accuracy curve (the final model is the last point)."""
        every = self.train_steps // (self.curve_points + 1)
        return [every * i for i in range(1, self.curve_points + 1)] if every > 0 else []


class DemoError(RuntimeError):
    """The demo cannot give its reference result (a stage failed, or the safety stop ended training)."""


class Stages:
    """Run-once stages that know what they were made from.

    A finished stage has a marker ``stages/<name>.json`` (:class:`threadweaver_verl.runs.Marker`, written
    last) recording the settings the stage depends on and the fingerprints of its input files. A rerun
    reuses the stage only if both match; if they differ it refuses, naming what changed (``force=true``
    redoes every stage). A stage that started but did not finish leaves ``<name>.started.json``: a rerun
    with the same settings and inputs lets the stage resume its own outputs (an eval's trajectories);
    otherwise the stage's outputs are removed before it runs again."""

    def __init__(self, out: Path, force: bool, finished: Sequence[Path] = ()):
        """``finished``: the files that mark the whole run finished; removed before any stage is redone."""
        self.dir = out / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.force = force
        self.finished = list(finished)

    def run(
        self,
        name: str,
        fn: Callable[[], dict],
        console,
        config: dict[str, Any],
        inputs: dict[str, Path] | None = None,
        outputs: Sequence[Path] = (),
    ) -> dict:
        inputs = inputs or {}
        done, started = Marker(self.dir / f"{name}.json"), Marker(self.dir / f"{name}.started.json")
        if done.exists() and not self.force:
            problem = done.mismatch(config, inputs)
            if problem is None:
                console.print(f"[dim]stage {name}: done earlier, reusing (same settings and inputs: {done.path})[/dim]")
                return done.read()["result"]
            raise UserError(
                f"stage {name} in {self.dir.parent} was made from other settings or inputs ({problem}). "
                "Pass force=true to redo the stages, or another out= folder to keep both"
            )
        if self.force or (started.exists() and started.mismatch(config, inputs) is not None):
            for path in outputs:
                shutil.rmtree(path, ignore_errors=True)
        for path in [*self.finished, done.path]:
            path.unlink(missing_ok=True)
        started.write(config, inputs)
        console.rule(f"stage: {name}")
        t0 = time.monotonic()
        result = fn()
        result["seconds"] = round(time.monotonic() - t0, 1)
        done.write(config, inputs, result)
        started.remove()
        return result


class ModelKind(enum.StrEnum):
    """The demo's two models (and their files' names): SFT on sequential or on parallel trajectories."""

    SEQUENTIAL = "sequential"
    PARALLEL = "parallel"


def _train_both(cfg: DemoConfig, out: Path, base: Path, data: Path, console) -> dict:
    """Both SFT runs at once, one core each (a tiny model gains little from a second thread)."""
    from threadweaver_verl.sft.train import StoppedBy, time_limit_message

    curve = cfg.curve_steps()
    procs = {}
    for kind in ModelKind:
        args = [
            sys.executable,
            "-m",
            "threadweaver_verl",
            "sft",
            f"model={base}",
            f"train_files=[{data / f'sft_{kind}.parquet'}]",
            f"output_dir={out / f'sft_{kind}'}",
            "layout=trie",
            "pack=false",
            "max_tokens=4096",
            f"batch_tokens={cfg.batch_tokens}",
            f"max_steps={cfg.train_steps}",
            f"time_limit_minutes={cfg.time_limit_minutes}",
            f"learning_rate={cfg.learning_rate(kind)}",
            f"warmup_steps={cfg.warmup_steps}",
            f"bf16={str(cfg.bf16).lower()}",
            f"seed={cfg.seed}",
            "logging_steps=10",
            f"save_steps={curve[0] if curve else 0}",
            "save_only_model=true",
            "save_total_limit=null",
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        log = open(out / f"sft_{kind}.log", "w")
        procs[kind] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    try:
        _wait_with_progress(procs, cfg.train_steps, out)
    finally:
        for p, log in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(30)
            log.close()
    results = {}
    for kind, (p, _) in procs.items():
        summary = out / f"sft_{kind}" / "sft_summary.json"
        result = json.loads(summary.read_text())["result"] if summary.exists() else None
        if result is not None and result["stopped_by"] == StoppedBy.TIME_LIMIT:
            raise DemoError(
                f"the {kind} model's training was "
                + time_limit_message(result["steps"], cfg.train_steps, cfg.time_limit_minutes)
                + f" (log: {out / f'sft_{kind}.log'})"
            )
        if p.returncode != 0 or result is None:
            tail = (out / f"sft_{kind}.log").read_text()[-3000:]
            raise DemoError(f"SFT of the {kind} model failed (exit {p.returncode}); log tail:\n{tail}")
        result["checkpoints"] = {
            str(step): str(out / f"sft_{kind}" / f"checkpoint-{step}") for step in curve if step < result["steps"]
        }
        results[kind] = result
    return results


def _wait_with_progress(procs: dict, steps: int, out: Path) -> None:
    """One bar over the step budget (the slower run's step), with each run's step and loss."""
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="training both models", unit="step")
    while any(p.poll() is None for p, _ in procs.values()):
        time.sleep(2)
        last = {k: _last_step(out / f"sft_{k}" / "loss_curve.csv") for k in procs}
        bar.n = min(step for step, _ in last.values())
        bar.set_postfix({k: f"step {step} loss {loss}" for k, (step, loss) in last.items()}, refresh=True)
    bar.close()


def _last_step(curve: Path) -> tuple[int, str]:
    """(step, loss) of the last logged line of a loss_curve.csv, (0, '-') before the first."""
    try:
        last = curve.read_text().strip().splitlines()[-1].split(",")
        return int(float(last[0])), f"{float(last[3]):.3f}"
    except (OSError, IndexError, ValueError):
        return 0, "-"


def _evaluate_both(cfg: DemoConfig, out: Path, data: Path, sft: dict, console) -> dict:
    """One vLLM server at a time: it serves the sequential model (plain decoding), then reloads the parallel
    model's weights (fork/join). Each final evaluation (``eval_concurrency`` in flight) is followed by the
    latency run of the same model (its first ``latency_problems`` problems, one at a time); then the server
    reloads that model's intermediate checkpoints for the accuracy-vs-steps curve."""
    from threadweaver_verl.eval.evaluate import EvalConfig, evaluate
    from threadweaver_verl.eval.records import EvalSummary
    from threadweaver_verl.rollout.controller import ControllerConfig
    from threadweaver_verl.rollout.vllm_server import VLLMServer, VLLMServerConfig

    budgets = dict(max_response_tokens=cfg.max_response_tokens, max_thread_tokens=cfg.max_thread_tokens)
    results: dict[str, Any] = {"curve": {k: {} for k in ModelKind}, "latency": {}}
    # Prefix caching works in whole KV blocks: the tiny task's shared contexts (~70 tokens) are
    # shorter than a default CPU block, so use small blocks to let thread requests hit the cache.
    server_cfg = VLLMServerConfig(
        model=sft[ModelKind.SEQUENTIAL]["model_dir"],
        work_dir=str(out / "vllm"),
        weight_reload=True,
        extra_args=["--block-size", str(cfg.kv_block_size)],
    )

    def run_eval(
        server: VLLMServer,
        kind: str,
        out_dir: Path,
        concurrency: int,
        baseline: str | None = None,
        max_problems: int | None = None,
    ) -> EvalSummary:
        return evaluate(
            EvalConfig(
                data=str(data / "test.parquet"),
                server_url=server.url,
                tokenizer=sft[kind]["model_dir"],
                out_dir=str(out_dir),
                n_samples=1,
                temperature=cfg.temperature,
                concurrency=concurrency,
                max_problems=max_problems,
                baseline=baseline,
                controller=ControllerConfig(fork=kind == ModelKind.PARALLEL, **budgets),
            )
        )

    with VLLMServer(server_cfg) as server:
        for kind in ModelKind:
            fork = kind == ModelKind.PARALLEL
            if fork:
                server.reload_weights(sft[kind]["model_dir"])
            console.print(f"evaluating the {kind} model ({'fork/join' if fork else 'plain decoding'})")
            baseline = str(out / "eval_sequential" / "trajectories.jsonl") if fork else None
            summary = run_eval(server, kind, out / f"eval_{kind}", cfg.eval_concurrency, baseline)
            results[kind] = summary.to_json()
            results["curve"][kind][str(sft[kind]["steps"])] = summary.accuracy
            if cfg.latency_problems:
                console.print(f"latency: the {kind} model on {cfg.latency_problems} held-out problems, one at a time")
                baseline = str(out / "latency_sequential" / "trajectories.jsonl") if fork else None
                summary = run_eval(server, kind, out / f"latency_{kind}", 1, baseline, cfg.latency_problems)
                results["latency"][kind] = summary.to_json()
            for step, checkpoint in sft[kind].get("checkpoints", {}).items():
                console.print(f"accuracy curve: the {kind} model at step {step}")
                server.reload_weights(checkpoint)
                summary = run_eval(server, kind, out / "curve" / f"{kind}_step{step}", cfg.curve_concurrency)
                results["curve"][kind][step] = summary.accuracy
    results["curve"] = {k: dict(sorted(v.items(), key=lambda kv: int(kv[0]))) for k, v in results["curve"].items()}
    return results


def curve_rows(curve: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """The accuracy-vs-steps table: one row per evaluated step."""
    steps = sorted({int(s) for points in curve.values() for s in points})
    return [{"step": s, **{k: curve[k].get(str(s)) for k in ModelKind}} for s in steps]


def results_table(evals: dict) -> list[dict[str, Any]]:
    """One row per model from the eval stage's summaries (definitions: :mod:`threadweaver_verl.eval.metrics`).

    - ``token_speedup``: the parallel evaluation's, against the sequential model's trajectories; the
      sequential model is that baseline itself (T = L), so its own is 1;
    - ``latency_s_at_1_in_flight``: mean wall time of one trajectory, one problem at a time (the latency
      run), and ``latency_speedup_at_1_in_flight`` the sequential model's over this one's;
    - ``latency_share_of_token_speedup``: that latency speedup over the token speedup on the same problems
      (the latency run's): how much of the shorter critical path reaches a user;
    - ``problems_per_s_at_N_in_flight``, ``response_tokens_per_s_at_N_in_flight``: throughput of the final
      evaluation with N = ``eval_concurrency`` problems in flight, and ``throughput_speedup_at_N_in_flight``
      this model's problems per second over the sequential model's.

    Rows the demo did not measure (``latency_problems=0``) are None."""
    from threadweaver_verl.eval.records import EvalSummary

    seq, par = (EvalSummary.from_json(evals[k], f"demo eval stage ({k})") for k in ModelKind)
    timed = evals.get("latency", {})
    lat_seq, lat_par = (
        EvalSummary.from_json(timed[k], f"demo eval stage (latency, {k})") if k in timed else None for k in ModelKind
    )
    n = seq.concurrency
    rows = []
    for name, s, lat in (("sequential", seq, lat_seq), ("parallel (fork/join)", par, lat_par)):
        itself = s is seq  # the sequential model is the baseline: its own ratios are 1
        if lat is None:
            lat_speedup = share = None
        elif itself:
            lat_speedup = share = 1.0
        else:
            lat_speedup, share = lat.latency_speedup, lat.latency_share_of_token_speedup
        rows.append(
            {
                "model": name,
                "accuracy": s.accuracy,
                "format_valid": s.format_valid_rate,
                "mean_T": s.mean_T,
                "mean_L": s.mean_L,
                "token_speedup": 1.0 if itself else s.token_speedup,
                "latency_s_at_1_in_flight": lat.latency_mean_s if lat else None,
                "latency_speedup_at_1_in_flight": lat_speedup,
                "latency_share_of_token_speedup": share,
                f"problems_per_s_at_{n}_in_flight": s.problems_per_s,
                f"throughput_speedup_at_{n}_in_flight": (
                    s.problems_per_s / seq.problems_per_s if s.problems_per_s and seq.problems_per_s else None
                ),
                f"response_tokens_per_s_at_{n}_in_flight": s.response_tokens_per_s,
                "thread_cache_hit_rate": s.thread_cache_hit_rate,
            }
        )
    return rows


def print_curve(curve: dict, console) -> None:
    from rich.table import Table

    from threadweaver_verl.eval.report import format_cell

    t = Table(title="held-out accuracy vs training steps")
    for name in ("step", *ModelKind):
        t.add_column(name, justify="right")
    for r in curve_rows(curve):
        t.add_row(str(r["step"]), *[format_cell(r[k]) for k in ModelKind])
    console.print(t)


def print_table(rows: list[dict], console, title: str) -> None:
    """Metrics down, models across (fits a narrow terminal)."""
    from rich.table import Table

    from threadweaver_verl.eval.report import format_cell

    t = Table(title=title)
    t.add_column("metric")
    for r in rows:
        t.add_column(str(r["model"]), justify="right")
    for key in rows[0]:
        if key != "model":
            t.add_row(key, *[format_cell(r[key]) for r in rows])
    console.print(t)


def run(cfg: DemoConfig, console=None) -> dict:
    """The demo in ``cfg.out`` (one run per folder at a time); see the module doc."""
    from rich.console import Console

    console = console or Console()
    cfg = cfg.effective()
    out = output_dir(cfg.out, "out")
    with OutputLock(out, "demo"):
        return _run(cfg, out, console)


def stage_settings(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """The settings each stage's result depends on (its marker records them)."""
    c = asdict(cfg)
    pick = lambda *keys: {k: c[k] for k in keys}  # noqa: E731
    return {
        "data": pick("preset", "n_train", "n_test", "seed"),
        "base_model": pick("model", "seed"),
        "sft": pick(
            "train_steps",
            "batch_tokens",
            "sequential_learning_rate",
            "parallel_learning_rate",
            "warmup_steps",
            "bf16",
            "seed",
            "curve_points",
        ),
        "eval": pick(
            "max_response_tokens",
            "max_thread_tokens",
            "kv_block_size",
            "temperature",
            "curve_points",
            "latency_problems",
        ),
    }


def _run(cfg: DemoConfig, out: Path, console) -> dict:
    from threadweaver_verl.models.tiny import build_tiny_model
    from threadweaver_verl.tasks.cli import MakeDataConfig, make_data

    stages = Stages(out, cfg.force, finished=[out / "results.json", out / "demo_config.json"])
    settings = stage_settings(cfg)
    t_start = time.monotonic()
    data = out / "data"
    stages.run(
        "data",
        lambda: make_data(
            MakeDataConfig(out=str(data), preset=cfg.preset, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed),
            console,
        ),
        console,
        settings["data"],
        outputs=[data],
    )
    sft_data = {kind: data / f"sft_{kind}.parquet" for kind in ModelKind}
    base = out / "base_model"

    def build() -> dict:
        from threadweaver_verl.data.schema import read_sft

        corpus = [r["response"] for r in read_sft(data / "sft_parallel.parquet")[:500]] + [
            r["response"] for r in read_sft(data / "sft_sequential.parquet")[:500]
        ]
        build_tiny_model(base, cfg.model, corpus=corpus)
        return {"model_dir": str(base)}

    stages.run("base_model", build, console, settings["base_model"], dict(sft_data), outputs=[base])
    sft = stages.run(
        "sft",
        lambda: _train_both(cfg, out, base, data, console),
        console,
        settings["sft"],
        {"base_model": base, **sft_data},
        outputs=[out / f"sft_{kind}" for kind in ModelKind],
    )
    evals = stages.run(
        "eval",
        lambda: _evaluate_both(cfg, out, data, sft, console),
        console,
        settings["eval"],
        {"test": data / "test.parquet", **{f"model_{kind}": Path(sft[kind]["model_dir"]) for kind in ModelKind}},
        outputs=[out / f"{stage}_{kind}" for stage in ("eval", "latency") for kind in ModelKind] + [out / "curve"],
    )
    rows = results_table(evals)
    from threadweaver_verl.eval.report import write_demo_report

    report = write_demo_report(out, cfg, rows, sft, data, evals["curve"])
    result = {
        "table": rows,
        "accuracy_curve": curve_rows(evals["curve"]),
        "sft": sft,
        "report": str(report),
        "minutes": round((time.monotonic() - t_start) / 60, 2),
    }
    atomic_write_text(out / "demo_config.json", json.dumps(asdict(cfg), indent=2))  # the settings of results.json
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    print_curve(evals["curve"], console)
    print_table(rows, console, f"ThreadWeaver demo: multiplication {cfg.preset}, {cfg.n_test} held-out problems")
    steps = ", ".join(f"{k} {sft[k]['steps']} steps in {sft[k]['seconds'] / 60:.1f} min" for k in ModelKind)
    console.print(f"report: {report}   ({result['minutes']} min this run; training: {steps})")
    return result


def main(argv: Sequence[str] = ()) -> int:
    from threadweaver_verl.config import run_command

    return run_command(DemoConfig, argv, run_and_report, command="demo")


def run_and_report(cfg: DemoConfig) -> int:
    """:func:`run`, with a failed stage printed and the exit code 1."""
    from rich.console import Console

    console = Console()
    try:
        run(cfg, console)
    except DemoError as e:
        console.print(f"[bold red]demo failed:[/bold red] {e}")
        return 1
    return 0
