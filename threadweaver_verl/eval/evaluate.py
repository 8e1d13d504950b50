"""``python -m threadweaver_verl eval key=value ...``: run an RL-schema parquet through the
fork/join controller and report accuracy, format validity and speed.

    python -m threadweaver_verl eval data=data/test.parquet model=runs/sft n_samples=4
    python -m threadweaver_verl eval data=data/test.parquet model=runs/sft controller.fork=false \\
        out_dir=runs/eval-seq                                       # the sequential baseline
    python -m threadweaver_verl eval data=data/test.parquet server_url=http://host:8000 \\
        tokenizer=runs/sft baseline=runs/eval-seq/trajectories.jsonl

Either ``server_url`` (any OpenAI-compatible server with token-id prompts, see
:mod:`threadweaver_verl.rollout.openai_engine`) or ``model`` (a local folder: a vLLM
server is launched for it) is required. Outputs in ``out_dir``:

- ``trajectories.jsonl``: one :class:`~threadweaver_verl.eval.records.TrajectoryRecord` per line
  (ids, text, answer check, stats, reasons);
- ``summary.json``: the :class:`~threadweaver_verl.eval.records.EvalSummary` below;
- ``report.html`` + ``speedup_hist.png``: the summary and the per-problem speedup histogram.

Summary: accuracy (math-verify via :func:`threadweaver_verl.rl.correctness.check_answer`),
format-valid rate, mean T (response tokens), mean L (critical path), mean T/L, the token
speedup against ``baseline`` (a sequential run's JSONL; the one definition is in
:mod:`threadweaver_verl.eval.metrics`), wall-clock per problem, prefix-cache hit rate
(cached / prompt tokens over the calls that report it).

:func:`run_problems` is the sampling itself (stage 2 of the data generator uses it too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from threadweaver_verl.config import run_command
from threadweaver_verl.eval.metrics import mean, token_speedup
from threadweaver_verl.eval.records import EvalSummary, TrajectoryRecord, read_trajectories, write_trajectories
from threadweaver_verl.eval.report import format_cell, write_eval_report
from threadweaver_verl.rl.correctness import CorrectnessConfig, check_answer
from threadweaver_verl.rollout.controller import ControllerConfig, ForkJoinController, RolloutError, RolloutResult
from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine, OpenAIEngineConfig
from threadweaver_verl.rollout.vllm_server import VLLMServer, VLLMServerConfig


@dataclass
class EvalConfig:
    """Settings of the ``eval`` command (YAML: ``configs/eval.yaml``)."""

    data: str = ""
    """RL-schema parquet (data_source, prompt, ability, reward_model.ground_truth, extra_info, agent_name)."""
    model: str | None = None
    """Local model folder: a vLLM server is launched for it (settings in ``vllm``). Also the tokenizer."""
    server_url: str | None = None
    """An already running OpenAI-compatible server instead of ``model``."""
    tokenizer: str | None = None
    """Tokenizer folder; None: ``model``. Required with ``server_url``."""
    out_dir: str = "runs/eval"
    """Where the JSONL, summary and report go."""
    n_samples: int = 1
    """Trajectories per problem."""
    max_problems: int | None = None
    """Evaluate only the first N problems."""
    concurrency: int = 16
    """Trajectories in flight at once."""
    temperature: float = 1.0
    """Sampling temperature (0 = greedy)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    top_k: int = -1
    """Top-k sampling (-1 = off)."""
    baseline: str | None = None
    """``trajectories.jsonl`` of a sequential run (``controller.fork=false``) of the same data, for token speedup."""
    fail_on_error: bool = False
    """Stop at the first failed trajectory; otherwise failures are counted, reported and make the exit code 1."""
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    """Budgets and policies of the fork/join controller; ``controller.fork=false`` gives the sequential baseline."""
    engine: OpenAIEngineConfig = field(default_factory=lambda: OpenAIEngineConfig(logprobs=False))
    """HTTP client settings (``engine.base_url`` is set from ``server_url`` or the launched server).
    ``engine.logprobs`` is off here: evaluating needs no log-probs."""
    vllm: VLLMServerConfig = field(default_factory=VLLMServerConfig)
    """Launch settings when ``model`` is given (``vllm.model`` is set from ``model``)."""
    correctness: CorrectnessConfig = field(default_factory=CorrectnessConfig)
    """How the final answer is extracted and judged."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.concurrency < 1:
            raise EvalError("n_samples and concurrency must be >= 1")


class EvalError(ValueError):
    pass


def _check(cfg: EvalConfig) -> None:
    """The inputs a run needs (the values themselves are checked by ``EvalConfig.__post_init__``)."""
    if not cfg.data:
        raise EvalError("eval needs data=PATH.parquet (an RL-schema dataset)")
    if bool(cfg.model) == bool(cfg.server_url):
        raise EvalError("eval needs exactly one of model=FOLDER (launch vLLM) or server_url=URL (use a running server)")
    if cfg.server_url and not cfg.tokenizer:
        raise EvalError("with server_url, also pass tokenizer=FOLDER (the served model's tokenizer)")
    if cfg.baseline and not Path(cfg.baseline).is_file():
        raise EvalError(f"baseline {cfg.baseline!r} not found: pass the trajectories.jsonl of a sequential run")


def problem_key(row: dict[str, Any]) -> str:
    return f"{row['data_source']}#{row['extra_info']['index']}"


def sampling_of(cfg: EvalConfig) -> dict[str, Any]:
    s: dict[str, Any] = {"temperature": cfg.temperature, "top_p": cfg.top_p}
    if cfg.top_k and cfg.top_k > 0:
        s["top_k"] = cfg.top_k
    return s


def trajectory_record(
    row: dict, key: str, sample: int, fmt, result: RolloutResult | None, check, error: str | None
) -> TrajectoryRecord:
    """The record of one trajectory: a finished rollout with its answer check, or a failed one with its error."""
    identity = dict(
        problem=key,
        sample=sample,
        data_source=row["data_source"],
        index=row["extra_info"]["index"],
        ground_truth=row["reward_model"]["ground_truth"],
    )
    if result is None:
        return TrajectoryRecord(**identity, error=error)
    return TrajectoryRecord(
        **identity,
        error=error,
        response_text=fmt.decode(result.response_ids),
        correct=bool(check.correct),
        extracted=check.extracted,
        answer_status=check.status,
        **result.summary(),
    )


async def run_problems(
    cfg: EvalConfig, rows: list[dict], tokenizer, base_url: str
) -> tuple[list[TrajectoryRecord], float]:
    """Sample ``cfg.n_samples`` trajectories of each RL-schema row on the server at ``base_url``, check their
    answers, and return their records (in row, then sample order) and the wall-clock seconds it took."""
    from threadweaver_verl.data.chat import prompt_ids
    from threadweaver_verl.format import TokenFormat

    fmt = TokenFormat.from_tokenizer(tokenizer)
    controller = ForkJoinController(fmt, cfg.controller)
    sampling = sampling_of(cfg)
    jobs = [(row, problem_key(row), j) for row in rows for j in range(cfg.n_samples)]
    records: list[TrajectoryRecord | None] = [None] * len(jobs)
    gate = asyncio.Semaphore(cfg.concurrency)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="eval trajectories", unit="traj")
    t0 = time.perf_counter()
    async with OpenAICompletionsEngine(cfg.engine, base_url=base_url) as engine:

        async def one(i: int, row: dict, key: str, j: int) -> None:
            async with gate:
                ids = prompt_ids(tokenizer, row["prompt"])
                try:
                    result = await controller.run(engine, ids, routing_key=f"eval-{key}-{j}", sampling=sampling)
                except RolloutError as e:
                    if cfg.fail_on_error:
                        raise
                    records[i] = trajectory_record(row, key, j, fmt, None, None, str(e))
                else:
                    text = fmt.decode(result.response_ids)
                    check = await asyncio.to_thread(
                        check_answer, text, row["reward_model"]["ground_truth"], cfg.correctness
                    )
                    records[i] = trajectory_record(row, key, j, fmt, result, check, None)
                if bar is not None:
                    bar.update(1)

        await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))
    if bar is not None:
        bar.close()
    return [r for r in records if r is not None], time.perf_counter() - t0


def _thread_cache_hit_rate(records: list[TrajectoryRecord]) -> float | None:
    """Share of thread requests' prompt tokens served from the prefix cache (None: not reported)."""
    calls = [c for r in records for c in r.thread_requests if c.get("cached_tokens") is not None]
    prompt = sum(c["prompt_tokens"] for c in calls)
    return sum(c["cached_tokens"] for c in calls) / prompt if prompt else None


def summarize(
    records: list[TrajectoryRecord], wall_s: float, baseline: list[TrajectoryRecord] | None = None
) -> tuple[EvalSummary, dict[str, float]]:
    """The summary and the per-problem speedups: ``L_seq / L`` against the baseline if given, else T / L."""
    ok = [r for r in records if r.ok]
    problems = sorted({r.problem for r in records})
    by_problem: dict[str, list[TrajectoryRecord]] = {}
    for r in ok:
        by_problem.setdefault(r.problem, []).append(r)
    reported = [r for r in ok if r.cached_tokens is not None]
    prompt_reported = sum(r.prompt_tokens for r in reported)
    terminations: dict[str, int] = {}
    for r in ok:
        for t in r.terminations:
            terminations[t] = terminations.get(t, 0) + 1
    summary = EvalSummary(
        problems=len(problems),
        trajectories=len(records),
        failed_trajectories=len(records) - len(ok),
        accuracy=mean(float(r.correct) for r in records),
        format_valid_rate=mean(float(r.valid) for r in records),
        mean_T=mean(r.stats["total_tokens"] for r in ok),
        mean_L=mean(r.stats["critical_path"] for r in ok),
        mean_T_over_L=mean(r.stats["speedup"] for r in ok),
        mean_blocks=mean(r.stats["num_blocks"] for r in ok),
        mean_engine_calls=mean(r.num_engine_calls for r in ok),
        wall_s_per_problem=wall_s / len(problems) if problems else None,
        mean_trajectory_wall_s=mean(r.wall_time_s for r in ok),
        prefix_cache_hit_rate=sum(r.cached_tokens for r in reported) / prompt_reported if prompt_reported else None,
        thread_cache_hit_rate=_thread_cache_hit_rate(ok),
        terminations=terminations,
    )
    if baseline is None:
        return summary, {p: statistics.fmean(r.stats["speedup"] for r in rs) for p, rs in by_problem.items()}
    run_L = {p: [r.stats["critical_path"] for r in rs] for p, rs in by_problem.items()}
    base_L: dict[str, list[float]] = {}
    for r in baseline:
        if r.ok:
            base_L.setdefault(r.problem, []).append(r.stats["critical_path"])
    common = [p for p in run_L if p in base_L]
    if not common and run_L and base_L:
        raise EvalError("the baseline JSONL shares no problem with this run (keys are data_source#index)")
    per_problem = {}
    for p in common:
        ours = statistics.fmean(run_L[p])
        per_problem[p] = statistics.fmean(base_L[p]) / ours if ours else float("nan")
    summary.token_speedup = token_speedup(base_L, run_L)
    summary.baseline_mean_L = mean(statistics.fmean(base_L[p]) for p in common)
    return summary, per_problem


def print_summary(summary: EvalSummary, title: str = "eval summary") -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in summary.to_json().items():
        table.add_row(k, format_cell(v))
    Console().print(table)


def evaluate(cfg: EvalConfig) -> EvalSummary:
    """Run the evaluation; return the summary (also written to ``out_dir``)."""
    from transformers import AutoTokenizer

    from threadweaver_verl.data.schema import read_rl

    _check(cfg)
    rows = read_rl(cfg.data)
    if cfg.max_problems:
        rows = rows[: cfg.max_problems]
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    baseline = read_trajectories(cfg.baseline) if cfg.baseline else None
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if cfg.model:
            server = stack.enter_context(VLLMServer(dataclasses.replace(cfg.vllm, model=cfg.model)))
            base_url = server.url
        else:
            base_url = cfg.server_url
        records, wall = asyncio.run(run_problems(cfg, rows, tokenizer, base_url))
    write_trajectories(records, out / "trajectories.jsonl")
    summary, per_problem = summarize(records, wall, baseline)
    summary.mode = "fork/join" if cfg.controller.fork else "sequential"
    (out / "summary.json").write_text(json.dumps(summary.to_json(), indent=2))
    write_eval_report(out, summary, per_problem, baseline is not None)
    return summary


def main(argv: Sequence[str] = ()) -> int:
    return run_command(EvalConfig, argv, run, command="eval")


def run(cfg: EvalConfig) -> int:
    summary = evaluate(cfg)
    print_summary(summary, f"eval: {cfg.data} ({summary.mode}, n={cfg.n_samples})")
    print(f"wrote {Path(cfg.out_dir) / 'trajectories.jsonl'}, summary.json, report.html")
    return 1 if summary.failed_trajectories else 0
