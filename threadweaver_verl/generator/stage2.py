"""Stage 2: self-training. The SFT model samples its own fork/join trajectories; the good ones
become the next round's SFT data.

Sampling is the ``eval`` command's (:mod:`threadweaver_verl.eval.evaluate`): the same
settings (:class:`Stage2Config` extends :class:`EvalConfig`), the same vLLM
launcher or server URL, the same controller, engine and answer check. On top of
it, per problem:

* each of the ``n_samples`` trajectories is judged: **format-valid** means the
  model itself wrote a valid trajectory (the validator passes, the controller
  did not have to intervene, the main line ended on EOS); **correct** means
  math-verify accepts its final answer;
* the trajectories that are format-valid, correct, have at least ``min_blocks``
  parallel blocks (:func:`parallel_blocks`, under the format's ``Limits``) and
  whose text re-encodes to exactly the sampled ids
  (``data.chat.response_ids(fmt, text) == ids``) are candidates; ``selection``
  picks the kept ones: ``shortest_critical_path`` (default), ``all_correct``
  (identical responses once) or ``random_one`` (seeded per problem);
* one durable record per problem (:class:`RecordStore`): a killed round resumes
  where it stopped; problems whose trajectories failed with an engine error are
  logged and retried by the next run.

Outputs of round ``r`` in ``out_dir/round_r/``: ``records.jsonl``, ``sft.parquet``
(the kept trajectories, SFT schema, the sampled ids in ``extra_info.response_ids``),
``rl_unsolved.parquet`` (the problems with nothing kept, RL schema),
``next_sft.parquet`` (``include_sft`` files + this round's rows, when
``include_sft`` is set) and ``summary.json``; ``out_dir/rounds.json`` lists every
round's report.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from threadweaver_verl.config import ConfigError
from threadweaver_verl.eval.evaluate import EvalConfig, check_problems, problem_key, run_problems
from threadweaver_verl.eval.metrics import mean
from threadweaver_verl.eval.records import TrajectoryRecord
from threadweaver_verl.generator.records import RecordStore
from threadweaver_verl.rollout.vllm_server import VLLMServer
from threadweaver_verl.runs import (
    OutputLock,
    atomic_write_text,
    output_dir,
    remove_stale_temporaries,
    require_model_dir,
    run_async,
)


class Selection(enum.StrEnum):
    """``Stage2Config.selection``: which correct candidates of a problem are kept."""

    SHORTEST_CRITICAL_PATH = "shortest_critical_path"  # the one with the shortest critical path
    ALL_CORRECT = "all_correct"  # every distinct one
    RANDOM_ONE = "random_one"  # one, picked by (seed, problem key)


# The per-round numbers kept in the generator's summary and shown in its table (one list for both).
ROUND_METRICS = (
    "prompts",
    "samples",
    "format_valid_rate",
    "accuracy",
    "valid_and_correct",
    "mean_speedup",
    "mean_speedup_kept",
    "kept",
)


@dataclass
class Stage2Config(EvalConfig):
    """Every ``eval`` setting (data, model or server_url, tokenizer, n_samples, sampling, controller, engine,
    vllm, correctness, ...) plus the self-training ones below. ``data`` is the RL-schema prompt parquet."""

    out_dir: str = "runs/generate_stage2"
    """Round folders ``round_<r>/`` and ``rounds.json`` go here."""
    n_samples: int = 8
    """Trajectories sampled per problem."""
    round: int = 1
    """Self-training round number (output folder ``round_<round>``); the model should be the SFT model
    trained on the previous rounds' data."""
    selection: str = Selection.SHORTEST_CRITICAL_PATH.value
    """Which candidates to keep per problem: shortest_critical_path | all_correct | random_one."""
    seed: int = 0
    """Seed of ``random_one`` (combined with the problem key, so a resumed run picks the same)."""
    min_blocks: int = 0
    """Candidates need at least this many parallel blocks (0: sequential-only answers count too). A block
    counts when the format accepts it as parallel: 2+ threads, or 1 with ``Limits.single_thread_blocks``."""
    chunk_size: int = 32
    """Problems sampled per batch (each problem's record is written as soon as its trajectories end)."""
    record_responses: bool = False
    """Also store every sample's response ids in records.jsonl (large; for audits and tests)."""
    include_sft: list[str] = field(default_factory=list)
    """SFT parquet files (e.g. stage 1's and earlier rounds') merged with this round's rows into
    ``next_sft.parquet``; duplicates (same prompt and response) once."""
    data_source: str = "threadweaver/stage2"
    """data_source of the written SFT rows."""
    split: str = "train"
    """``extra_info.split`` of the written SFT rows."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.selection not in tuple(Selection):
            raise ConfigError(f"selection={self.selection!r}; choose one of {[s.value for s in Selection]}")
        if self.baseline:
            raise ConfigError("baseline is an eval setting; stage 2 reports T/L of its own trajectories. Remove it.")
        if self.fail_on_error:
            raise ConfigError(
                "fail_on_error is an eval setting; stage 2 logs failed problems and retries them on the "
                "next run. Remove it."
            )
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")


# --------------------------------------------------------------------------- judging


def _judge(rec: TrajectoryRecord, fmt, record_response: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A sample's summary, and (when it is a candidate for keeping) its text and ids."""
    from threadweaver_verl.data.chat import response_ids
    from threadweaver_verl.format import NonCanonicalTrajectory

    ids = list(rec.response_ids)
    ended_on_eos = bool(ids) and ids[-1] in fmt.eos_ids
    format_valid = rec.valid and not rec.events and ended_on_eos
    stats = rec.stats
    s: dict[str, Any] = {
        "sample": rec.sample,
        "validator_pass": rec.valid,
        "format_valid": format_valid,
        "correct": rec.correct,
        "answer_status": rec.answer_status,
        "extracted": rec.extracted,
        "terminations": rec.terminations,
        "total_tokens": stats.get("total_tokens"),
        "critical_path": stats.get("critical_path"),
        "speedup": stats.get("speedup"),
        "num_blocks": stats.get("num_blocks"),
        "canonical": None,
    }
    if record_response:
        s["response_ids"] = ids
    if not (format_valid and s["correct"]):
        return s, None
    text = fmt.decode(ids[:-1])
    try:
        canonical = response_ids(fmt, text) == ids
    except NonCanonicalTrajectory:  # the text does not encode the way it was sampled
        canonical = False
    s["canonical"] = canonical
    if not canonical:
        return s, None
    return s, {"sample": rec.sample, "response": text, "response_ids": ids, "stats": stats}


def parallel_blocks(stats: dict[str, Any], limits) -> int:
    """The blocks of a trajectory that count towards ``min_blocks``: those the format accepts as parallel
    under ``limits`` (the validator's :class:`~threadweaver_verl.format.Limits`): two threads or more, or
    one where ``single_thread_blocks`` allows it. A block with no thread never counts."""
    least = 1 if limits.single_thread_blocks else 2
    return sum(1 for threads in stats.get("threads_per_block") or () if threads >= least)


def select(candidates: Sequence[dict[str, Any]], policy: str, seed: int, key: str) -> list[dict[str, Any]]:
    """The kept candidates of one problem under ``policy``."""
    if not candidates:
        return []
    if policy == Selection.SHORTEST_CRITICAL_PATH:
        return [min(candidates, key=lambda c: (c["stats"]["critical_path"], c["stats"]["total_tokens"], c["sample"]))]
    if policy == Selection.ALL_CORRECT:
        seen, out = set(), []
        for c in sorted(candidates, key=lambda c: c["sample"]):
            if tuple(c["response_ids"]) not in seen:
                seen.add(tuple(c["response_ids"]))
                out.append(c)
        return out
    if policy == Selection.RANDOM_ONE:
        digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        # Ordered by content, not sample number: concurrent sampling may give one response to a
        # different sample number on a rerun, and the pick must depend on the candidates only.
        return [rng.choice(sorted(candidates, key=lambda c: (list(c["response_ids"]), c["sample"])))]
    raise ConfigError(f"selection={policy!r}; choose one of {[s.value for s in Selection]}")


def problem_record(
    row: dict[str, Any], key: str, samples: Sequence[TrajectoryRecord], fmt, cfg: Stage2Config
) -> dict[str, Any]:
    judged = [_judge(r, fmt, cfg.record_responses) for r in sorted(samples, key=lambda r: r.sample)]
    candidates = [c for _, c in judged if c is not None and parallel_blocks(c["stats"], fmt.limits) >= cfg.min_blocks]
    return {
        "id": key,
        "index": row["extra_info"]["index"],
        "data_source": row["data_source"],
        "ground_truth": row["reward_model"]["ground_truth"],
        "samples": [s for s, _ in judged],
        "kept": select(candidates, cfg.selection, cfg.seed, key),
    }


# --------------------------------------------------------------------------- the round


def _check(cfg: Stage2Config) -> None:
    if not cfg.data:
        raise ConfigError("stage 2 needs data=PROMPTS.parquet (RL schema, e.g. stage 1's rl.parquet)")
    if bool(cfg.model) == bool(cfg.server_url):
        raise ConfigError(
            "stage 2 needs exactly one of model=FOLDER (a vLLM server is launched for the SFT model) "
            "or server_url=URL (a running OpenAI-compatible server; then also tokenizer=FOLDER)"
        )
    if cfg.server_url and not cfg.tokenizer:
        raise ConfigError("with server_url, also pass tokenizer=FOLDER (the served model's tokenizer)")
    if cfg.model:
        require_model_dir(cfg.model, "model")
    if cfg.tokenizer:
        require_model_dir(cfg.tokenizer, "tokenizer", what="tokenizer")
    for path in cfg.include_sft:
        if not Path(path).is_file():
            raise ConfigError(f"include_sft file {path!r} not found")


def run_stage2(cfg: Stage2Config) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from threadweaver_verl.data.schema import read_rl
    from threadweaver_verl.format import TokenFormat

    _check(cfg)
    rows = read_rl(cfg.data)
    check_problems(rows, cfg.data)
    if cfg.max_problems is not None:
        rows = rows[: cfg.max_problems]
    keys = [problem_key(r) for r in rows]
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    fmt = TokenFormat.from_tokenizer(tokenizer)
    with OutputLock(output_dir(cfg.out_dir, "out_dir"), f"generate stage=2 round={cfg.round}"):
        out = output_dir(Path(cfg.out_dir) / f"round_{cfg.round}", "out_dir")
        remove_stale_temporaries(out)
        (out / "summary.json").unlink(missing_ok=True)  # unfinished until the new summary is written
        return _run_round(cfg, rows, keys, tokenizer, fmt, out)


def _run_round(cfg: Stage2Config, rows: list[dict], keys: list[str], tokenizer, fmt, out: Path) -> dict[str, Any]:
    store = RecordStore(out / "records.jsonl", out / "errors.jsonl")
    todo = [(r, k) for r, k in zip(rows, keys) if k not in store]
    sampling_cfg = dataclasses.replace(cfg, progress=False)
    failed_problems = 0
    started = time.monotonic()
    bar = None
    if cfg.progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"stage 2 round {cfg.round}", unit="problem", file=sys.stderr)
    row_of = dict((k, r) for r, k in todo)
    pending: dict[str, list[TrajectoryRecord]] = {}
    finished: set[str] = set()

    def finish(key: str) -> None:
        """A problem's record (or its logged failure), written as soon as its last trajectory ends."""
        nonlocal failed_problems
        finished.add(key)
        recs = pending.pop(key, [])
        errors = [r.error for r in recs if r.error]
        if errors or len(recs) != cfg.n_samples:
            failed_problems += 1
            reason = errors[0] if errors else f"{len(recs)} of {cfg.n_samples} trajectories came back"
            store.log_error(key, "sampling", reason)
        else:
            store.append(problem_record(row_of[key], key, recs, fmt, cfg))
        if bar is not None:
            bar.update(1)

    def on_record(rec: TrajectoryRecord) -> None:
        pending.setdefault(rec.problem, []).append(rec)
        if len(pending[rec.problem]) == cfg.n_samples:
            finish(rec.problem)

    try:
        with contextlib.ExitStack() as stack:
            if todo and cfg.model:
                server = stack.enter_context(VLLMServer(dataclasses.replace(cfg.vllm, model=cfg.model)))
                base_url = server.url
            else:
                base_url = cfg.server_url or ""
            for start in range(0, len(todo), cfg.chunk_size):
                chunk = todo[start : start + cfg.chunk_size]
                run_async(run_problems(sampling_cfg, [r for r, _ in chunk], tokenizer, base_url, on_record))
                for _, key in chunk:  # a problem whose trajectories did not all come back
                    if key not in finished:
                        finish(key)
        summary = summarize_round(cfg, rows, keys, store, len(todo), failed_problems, time.monotonic() - started)
        _write_outputs(cfg, rows, keys, store, summary)
    finally:
        if bar is not None:
            bar.close()
        store.close()
    return summary


def summarize_round(
    cfg: Stage2Config,
    rows: Sequence[dict],
    keys: Sequence[str],
    store: RecordStore,
    attempted: int,
    failed: int,
    seconds: float,
) -> dict[str, Any]:
    recs = [store.get(k) for k in keys if k in store]
    samples = [s for r in recs for s in r["samples"]]
    valid = [s for s in samples if s["format_valid"]]
    kept = [k for r in recs for k in r["kept"]]
    return {
        "stage": 2,
        "round": cfg.round,
        "prompts": len(rows),
        "problems_done": len(recs),
        "attempted_this_run": attempted,
        "resumed_from_records": len(rows) - attempted,
        "failed_problems_to_retry": failed,
        "samples": len(samples),
        "format_valid_rate": mean([float(s["format_valid"]) for s in samples]),
        "validator_pass_rate": mean([float(s["validator_pass"]) for s in samples]),
        "accuracy": mean([float(s["correct"]) for s in samples]),
        "valid_and_correct": sum(1 for s in valid if s["correct"]),
        "non_canonical_dropped": sum(1 for s in samples if s["canonical"] is False),
        "mean_speedup": mean([s["speedup"] for s in valid]),
        "mean_speedup_kept": mean([k["stats"]["speedup"] for k in kept]),
        "kept": len(kept),
        "problems_with_kept": sum(1 for r in recs if r["kept"]),
        "selection": cfg.selection,
        "n_samples": cfg.n_samples,
        "model": cfg.model or cfg.server_url,
        "seconds": seconds,
        "outputs": {},
    }


def _sft_rows(cfg: Stage2Config, rows: Sequence[dict], keys: Sequence[str], store: RecordStore) -> list[dict]:
    from threadweaver_verl.data.schema import check_sft_row, sft_row

    out = []
    for row, key in zip(rows, keys):
        rec = store.get(key)
        for k in rec["kept"] if rec else []:
            r = sft_row(
                data_source=cfg.data_source,
                question=row["extra_info"]["question"],
                response=k["response"],
                index=row["extra_info"]["index"],
                split=cfg.split,
                extra={
                    "sample_id": key,
                    "ground_truth": row["reward_model"]["ground_truth"],
                    "stage": 2,
                    "round": cfg.round,
                    "num_blocks": int(k["stats"]["num_blocks"]),
                    "speedup": float(k["stats"]["speedup"]),
                    "response_ids": list(k["response_ids"]),
                },
            )
            r["prompt"] = row["prompt"]  # exactly the messages the trajectory was sampled from
            check_sft_row(r)
            out.append(r)
    return out


def _write_outputs(
    cfg: Stage2Config, rows: Sequence[dict], keys: Sequence[str], store: RecordStore, summary: dict[str, Any]
) -> None:
    from threadweaver_verl.data.schema import read_sft, write_rl, write_sft

    out = Path(cfg.out_dir) / f"round_{cfg.round}"
    sft = _sft_rows(cfg, rows, keys, store)
    if sft:
        summary["outputs"]["sft"] = str(write_sft(sft, out / "sft.parquet"))
    unsolved = [row for row, key in zip(rows, keys) if key in store and not store.get(key)["kept"]]
    if unsolved:
        summary["outputs"]["rl_unsolved"] = str(write_rl(unsolved, out / "rl_unsolved.parquet"))
    if cfg.include_sft:
        merged, seen = [], set()
        for r in [x for p in cfg.include_sft for x in read_sft(p)] + sft:
            ident = (json.dumps(r["prompt"], sort_keys=True), r["response"])
            if ident not in seen:
                seen.add(ident)
                merged.append(r)
        summary["outputs"]["next_sft"] = str(write_sft(merged, out / "next_sft.parquet"))
        summary["next_sft_rows"] = len(merged)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    rounds = []
    for p in sorted(Path(cfg.out_dir).glob("round_*/summary.json")):
        rounds.append(json.loads(p.read_text()))
    rounds.sort(key=lambda s: s["round"])
    atomic_write_text(Path(cfg.out_dir) / "rounds.json", json.dumps(rounds, indent=2))
    summary["rounds"] = [{k: s.get(k) for k in ("round", *ROUND_METRICS)} for s in rounds]
