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

- ``trajectories.jsonl``: one :class:`~threadweaver_verl.eval.records.TrajectoryRecord` per finished
  trajectory (ids, text, answer check, stats, reasons), appended (and fsynced) as each one finishes;
- ``failed.jsonl``: one line per attempt that failed for an infrastructure reason (the failed record, its
  ``failure_cause``: ``connection_error``, ``timeout``, ``http_400``, ...); a rerun retries those trajectories;
- ``eval_run.json``: the settings and data fingerprint of the run (a rerun with other settings into the
  same ``out_dir`` is refused instead of mixing results);
- ``run_times.json``: the sampling time of each run on this ``out_dir``, so the wall-clock numbers of a
  resumed eval add up all its runs;
- ``summary.json``: the :class:`~threadweaver_verl.eval.records.EvalSummary` below (written last, atomically);
- ``report.html`` + ``speedup_hist.png``: the summary and the per-problem speedup histogram.

A rerun with the same ``out_dir`` resumes: trajectories already in ``trajectories.jsonl`` are kept and
only the missing or failed ones run. SIGINT/SIGTERM stop the run cleanly (finished trajectories kept,
a launched server stopped with its temporary folder). One run at a time per ``out_dir`` (a lock file).

Summary: accuracy (math-verify via :func:`threadweaver_verl.rl.correctness.check_answer`) over the
trajectories that ran (failed ones are counted apart, by cause, in ``failed_by_cause``), format-valid
rate, mean T (response tokens), mean L (critical path), mean T/L, the token speedup against ``baseline``
(a sequential run's JSONL; the one definition is in :mod:`threadweaver_verl.eval.metrics`), wall-clock
per problem (the sampling time of every run on ``out_dir``, added up), prefix-cache hit rate (cached / prompt
tokens over the calls that report it).

:func:`run_problems` is the sampling itself (stage 2 of the data generator uses it too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Container, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai

from threadweaver_verl.config import run_command
from threadweaver_verl.eval.metrics import mean, token_speedup
from threadweaver_verl.eval.records import EvalSummary, TrajectoryRecord, read_trajectories, trajectory_id
from threadweaver_verl.eval.report import format_cell, write_eval_report
from threadweaver_verl.generator.records import RecordStore
from threadweaver_verl.rl.correctness import CorrectnessConfig, check_answer
from threadweaver_verl.rollout.controller import ControllerConfig, ForkJoinController, RolloutError, RolloutResult
from threadweaver_verl.rollout.http import OpenAIHTTPError
from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine, OpenAIEngineConfig
from threadweaver_verl.rollout.vllm_server import VLLMServer, VLLMServerConfig
from threadweaver_verl.runs import (
    Marker,
    OutputLock,
    RunTimes,
    UserError,
    atomic_write_text,
    output_dir,
    remove_stale_temporaries,
    require_count,
    require_model_dir,
    run_async,
)


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
    """Evaluate only the first N problems (None: all; 0: none; negative is an error)."""
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
    """Stop at the first failed trajectory; otherwise failures are counted by cause, reported, make the exit
    code 1 and are retried by a rerun."""
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
        require_count(self.max_problems, "max_problems")


class EvalError(UserError, ValueError):
    """A setting or input of an evaluation is wrong (the message names the fix)."""


def _check(cfg: EvalConfig) -> None:
    """The inputs a run needs (the values themselves are checked by ``EvalConfig.__post_init__``), before
    any work or write."""
    if not cfg.data:
        raise EvalError("eval needs data=PATH.parquet (an RL-schema dataset)")
    if bool(cfg.model) == bool(cfg.server_url):
        raise EvalError("eval needs exactly one of model=FOLDER (launch vLLM) or server_url=URL (use a running server)")
    if cfg.server_url and not cfg.tokenizer:
        raise EvalError("with server_url, also pass tokenizer=FOLDER (the served model's tokenizer)")
    if cfg.baseline and not Path(cfg.baseline).is_file():
        raise EvalError(f"baseline {cfg.baseline!r} not found: pass the trajectories.jsonl of a sequential run")
    if cfg.model:
        require_model_dir(cfg.model, "model")
    if cfg.tokenizer:
        require_model_dir(cfg.tokenizer, "tokenizer", what="tokenizer")


def check_problems(rows: list[dict[str, Any]], path: str) -> list[str]:
    """The problem keys of ``rows``; two rows with one key is an error naming the keys."""
    keys = [problem_key(r) for r in rows]
    seen: set[str] = set()
    repeated = sorted({k for k in keys if k in seen or seen.add(k)})
    if repeated:
        shown = ", ".join(repeated[:5]) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        raise EvalError(
            f"{path}: {len(repeated)} problem id(s) (data_source#extra_info.index) appear on more than one row: "
            f"{shown}. Give every problem its own index."
        )
    return keys


def failure_cause(exc: BaseException) -> str:
    """Why a trajectory failed, in one word: ``http_<status>``, ``connection_error``, ``timeout``,
    ``bad_response`` (a reply that is not a completion), ``aborted``, or the exception's type."""
    e: BaseException | None = exc
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OpenAIHTTPError):
            if e.status is not None:
                return f"http_{e.status}" if e.status >= 400 else "bad_response"
            if isinstance(e.__cause__, openai.APITimeoutError):  # before its base class, APIConnectionError
                return "timeout"
            if isinstance(e.__cause__, openai.APIConnectionError):
                return "connection_error"
            return "bad_response"
        if isinstance(e, (asyncio.TimeoutError, TimeoutError, openai.APITimeoutError)):
            return "timeout"
        if isinstance(e, openai.APIConnectionError):
            return "connection_error"
        e = e.__cause__ or e.__context__
    if "aborted" in str(exc):
        return "aborted"
    return type(exc).__name__


def problem_key(row: dict[str, Any]) -> str:
    return f"{row['data_source']}#{row['extra_info']['index']}"


def sampling_of(cfg: EvalConfig) -> dict[str, Any]:
    s: dict[str, Any] = {"temperature": cfg.temperature, "top_p": cfg.top_p}
    if cfg.top_k and cfg.top_k > 0:
        s["top_k"] = cfg.top_k
    return s


def trajectory_record(
    row: dict, key: str, sample: int, fmt, result: RolloutResult | None, check, error: BaseException | None
) -> TrajectoryRecord:
    """The record of one trajectory: a finished rollout with its answer check, or a failed one with its error
    and :func:`failure_cause`."""
    identity = dict(
        problem=key,
        sample=sample,
        data_source=row["data_source"],
        index=row["extra_info"]["index"],
        ground_truth=row["reward_model"]["ground_truth"],
    )
    if result is None:
        assert error is not None
        return TrajectoryRecord(**identity, error=str(error), failure_cause=failure_cause(error))
    return TrajectoryRecord(
        **identity,
        response_text=fmt.decode(result.response_ids),
        correct=bool(check.correct),
        extracted=check.extracted,
        answer_status=check.status,
        **result.summary(),
    )


async def run_problems(
    cfg: EvalConfig,
    rows: list[dict],
    tokenizer,
    base_url: str,
    on_record: Callable[[TrajectoryRecord], None] | None = None,
    skip: Container[str] = frozenset(),
) -> tuple[list[TrajectoryRecord], float]:
    """Sample ``cfg.n_samples`` trajectories of each RL-schema row on the server at ``base_url``, check their
    answers, and return their records (in row, then sample order; failed ones with ``error`` and
    ``failure_cause``) and the wall-clock seconds it took. Trajectories whose :func:`trajectory_id` is in
    ``skip`` are not run. ``on_record`` gets each record as soon as its trajectory finishes (to write it
    before the next one ends)."""
    from threadweaver_verl.data.chat import prompt_ids
    from threadweaver_verl.format import TokenFormat

    fmt = TokenFormat.from_tokenizer(tokenizer)
    controller = ForkJoinController(fmt, cfg.controller)
    sampling = sampling_of(cfg)
    jobs = [(row, problem_key(row), j) for row in rows for j in range(cfg.n_samples)]
    jobs = [job for job in jobs if trajectory_id(job[1], job[2]) not in skip]
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
                    rec = trajectory_record(row, key, j, fmt, None, None, e)
                else:
                    text = fmt.decode(result.response_ids)
                    check = await asyncio.to_thread(
                        check_answer, text, row["reward_model"]["ground_truth"], cfg.correctness
                    )
                    rec = trajectory_record(row, key, j, fmt, result, check, None)
                if on_record is not None:
                    on_record(rec)
                records[i] = rec
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
    records: list[TrajectoryRecord], wall_s: float | None, baseline: list[TrajectoryRecord] | None = None
) -> tuple[EvalSummary, dict[str, float]]:
    """The summary and the per-problem speedups: ``L_seq / L`` against the baseline if given, else T / L.
    ``wall_s``: the sampling time that made ``records`` (None: unknown)."""
    ok = [r for r in records if r.ok]
    failed_by_cause: dict[str, int] = {}
    for r in records:
        if not r.ok:
            cause = r.failure_cause or "error"
            failed_by_cause[cause] = failed_by_cause.get(cause, 0) + 1
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
        failed_by_cause=dict(sorted(failed_by_cause.items(), key=lambda kv: -kv[1])),
        accuracy=mean(float(r.correct) for r in ok),  # over the trajectories that ran
        format_valid_rate=mean(float(r.valid) for r in ok),
        mean_T=mean(r.stats["total_tokens"] for r in ok),
        mean_L=mean(r.stats["critical_path"] for r in ok),
        mean_T_over_L=mean(r.stats["speedup"] for r in ok),
        mean_blocks=mean(r.stats["num_blocks"] for r in ok),
        mean_engine_calls=mean(r.num_engine_calls for r in ok),
        wall_s=wall_s,
        wall_s_per_problem=wall_s / len(problems) if problems and wall_s is not None else None,
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


def served_max_model_len(base_url: str, timeout_s: float = 30.0) -> int | None:
    """The context length the server at ``base_url`` reports in ``/v1/models`` (vLLM: ``max_model_len``);
    None if it does not report one. An unreachable server is an :class:`EvalError`."""
    import httpx

    url = base_url.rstrip("/").removesuffix("/v1") + "/v1/models"
    try:
        reply = httpx.get(url, timeout=timeout_s)
        reply.raise_for_status()
        models = reply.json().get("data") or []
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise EvalError(
            f"the server does not answer {url} ({type(e).__name__}: {e}); start it, or fix server_url"
        ) from e
    lengths = [m.get("max_model_len") for m in models if isinstance(m, dict)]
    return min((n for n in lengths if isinstance(n, int)), default=None)


def fit_budget(controller: ControllerConfig, max_model_len: int | None, longest_prompt: int) -> ControllerConfig:
    """``controller`` with ``max_response_tokens`` (and ``max_thread_tokens``) clamped so that the longest
    prompt plus a full response fits the server's context, with a warning; an error if nothing fits."""
    if max_model_len is None or longest_prompt + controller.max_response_tokens <= max_model_len:
        return controller
    room = max_model_len - longest_prompt
    if room < 1:
        raise EvalError(
            f"the longest prompt has {longest_prompt} tokens but the server's context (max_model_len) is "
            f"{max_model_len}: no room for a response. Serve the model with a longer context or shorten the prompts"
        )
    print(
        f"eval: warning: controller.max_response_tokens={controller.max_response_tokens} plus the longest prompt "
        f"({longest_prompt} tokens) exceeds the server's max_model_len {max_model_len}; using "
        f"max_response_tokens={room} (set it yourself to silence this)",
        file=sys.stderr,
    )
    return dataclasses.replace(
        controller, max_response_tokens=room, max_thread_tokens=min(controller.max_thread_tokens, room)
    )


def run_settings(cfg: EvalConfig) -> dict[str, Any]:
    """The settings that shape an eval's trajectories: a rerun into the same ``out_dir`` must match them
    to resume (server address, concurrency, progress and report settings may change)."""
    keep = ("model", "tokenizer", "n_samples", "temperature", "top_p", "top_k", "controller", "correctness")
    return {k: v for k, v in asdict(cfg).items() if k in keep}


def keep_in(store: RecordStore) -> Callable[[TrajectoryRecord], None]:
    """Write a finished trajectory to ``store`` at once: its record, or (failed) a line of the error log."""

    def keep(rec: TrajectoryRecord) -> None:
        if rec.ok:
            store.append(rec.to_json())
        else:
            store.log_error(rec.id, rec.failure_cause or "error", rec.error or "", extra=rec.to_json())

    return keep


def stored_records(store: RecordStore) -> list[TrajectoryRecord]:
    """The finished trajectories in ``store``."""
    return [TrajectoryRecord.from_json(r, f"{store.path}, record {r['id']!r}") for r in store]


def failures_to_retry(store: RecordStore) -> list[TrajectoryRecord]:
    """The latest failed attempt of each trajectory that has no record yet (from the store's error log)."""
    from threadweaver_verl.data.schema import read_records

    latest: dict[str, TrajectoryRecord] = {}
    if store.error_path.is_file() and store.error_path.stat().st_size:
        for n, entry in enumerate(read_records(store.error_path, "failed trajectories"), start=1):
            if entry.get("id") not in store and "problem" in entry:
                fields = {k: v for k, v in entry.items() if k not in ("step", "time")}  # the log's own keys
                latest[entry["id"]] = TrajectoryRecord.from_json(fields, f"{store.error_path}, line {n}")
    return list(latest.values())


def evaluate(cfg: EvalConfig) -> EvalSummary:
    """Run the evaluation; return the summary (also written to ``out_dir``). Every setting and input is
    checked before any work; a rerun with the same ``out_dir`` resumes (see the module doc)."""
    from transformers import AutoTokenizer

    from threadweaver_verl.data.chat import prompt_ids
    from threadweaver_verl.data.schema import read_rl

    _check(cfg)
    rows = read_rl(cfg.data)
    check_problems(rows, cfg.data)
    if cfg.max_problems is not None:
        rows = rows[: cfg.max_problems]
    baseline = read_trajectories(cfg.baseline) if cfg.baseline else None
    out = output_dir(cfg.out_dir, "out_dir")
    with OutputLock(out, "eval"):
        remove_stale_temporaries(out)
        started = Marker(out / "eval_run.json")
        other_run = started.mismatch(run_settings(cfg), {"data": cfg.data})
        if other_run and (out / "trajectories.jsonl").is_file() and (out / "trajectories.jsonl").stat().st_size:
            raise EvalError(
                f"out_dir {str(out)!r} holds trajectories of another run ({other_run}); pass another out_dir, "
                "or delete that folder to start over"
            )
        for name in ("summary.json", "report.html"):  # the folder is unfinished until they are rewritten
            (out / name).unlink(missing_ok=True)
        started.write(run_settings(cfg), {"data": cfg.data}, {"status": "running"})
        store = RecordStore(out / "trajectories.jsonl", out / "failed.jsonl")
        try:
            run_times = RunTimes(out / "run_times.json", fresh=other_run is not None, done_before=len(store))
            tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
            todo = [r for r in rows if any(trajectory_id(problem_key(r), j) not in store for j in range(cfg.n_samples))]
            if todo and len(store):
                print(
                    f"eval: resuming: {len(store)} trajectories done earlier, {len(todo)} problems to run",
                    file=sys.stderr,
                )
            with contextlib.ExitStack() as stack:
                if todo and cfg.model:
                    server = stack.enter_context(VLLMServer(dataclasses.replace(cfg.vllm, model=cfg.model)))
                    base_url = server.url
                else:
                    base_url = cfg.server_url
                if todo:
                    longest = max(len(prompt_ids(tokenizer, r["prompt"])) for r in todo)
                    controller = fit_budget(cfg.controller, served_max_model_len(base_url), longest)
                    run_cfg = dataclasses.replace(cfg, controller=controller)
                    keep = keep_in(store)

                    def keep_and_count(rec: TrajectoryRecord) -> None:
                        keep(rec)
                        run_times.count()

                    run_times.start()
                    try:
                        run_async(run_problems(run_cfg, todo, tokenizer, base_url, keep_and_count, skip=store))
                    finally:
                        run_times.stop()
            order = {problem_key(r): i for i, r in enumerate(rows)}  # the data's order, whatever finished first
            in_out_dir = stored_records(store) + failures_to_retry(store)
            records = [r for r in in_out_dir if r.problem in order]
            records.sort(key=lambda r: (order[r.problem], r.sample))
        finally:
            store.close()
        # the sampling time of every run on out_dir; unknown when this summary covers only part of its trajectories
        wall = run_times.total_s if len(records) == len(in_out_dir) else None
        summary, per_problem = summarize(records, wall, baseline)
        summary.runs = len(run_times.runs)
        summary.mode = "fork/join" if cfg.controller.fork else "sequential"
        write_eval_report(out, summary, per_problem, baseline is not None)
        atomic_write_text(out / "summary.json", json.dumps(summary.to_json(), indent=2))  # last: marks it finished
        started.write(run_settings(cfg), {"data": cfg.data}, {"status": "finished"})
    return summary


def main(argv: Sequence[str] = ()) -> int:
    return run_command(EvalConfig, argv, run, command="eval")


def run(cfg: EvalConfig) -> int:
    summary = evaluate(cfg)
    print_summary(summary, f"eval: {cfg.data} ({summary.mode}, n={cfg.n_samples})")
    print(f"wrote {Path(cfg.out_dir) / 'trajectories.jsonl'}, summary.json, report.html")
    if summary.failed_trajectories:
        cause, count = next(iter(summary.failed_by_cause.items()))
        print(
            f"eval: {summary.failed_trajectories} of {summary.trajectories} trajectories FAILED to run "
            f"(most often {cause}: {count}; details in {Path(cfg.out_dir) / 'failed.jsonl'}). Accuracy counts only "
            "the trajectories that ran. Rerun the same command to retry the failed ones.",
            file=sys.stderr,
        )
        return 1
    return 0
