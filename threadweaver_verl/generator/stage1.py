"""Stage 1: rewrite correct sequential traces into parallel trajectories with an LLM.

Per sample (samples run concurrently; the steps of one sample run in order):

0. input   the trace is cut into units; it must hold no format tags and reach the ground truth;
1. structure  the LLM groups units into steps and names each step's dependencies;
2. blocks     the LLM picks runs of steps to run in parallel and cuts them into threads
              (checked here against step 1's dependencies: no thread may rely on a sibling);
3. edits      the LLM edits each thread minimally so it reads without its siblings;
4. outlines   the LLM writes one outline per thread;
5. validate   the trajectory is assembled with the format module's nodes, re-parsed, validated,
              optionally encoded to the exact training ids, and its final answer re-checked.

Each LLM answer must be one JSON object meeting its step's contract; a faulty
answer is sent back once (``repair_attempts``) with the problem named, then the
sample is rejected with the step and the reason. Every finished sample, accepted
or rejected, is one durable record (:class:`RecordStore`), so a killed run resumes
where it stopped. A sample whose API calls fail for good (after the transport's
retries) is logged as an error and retried by the next run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from threadweaver_verl.config import ConfigError
from threadweaver_verl.data.chat import DEFAULT_INSTRUCTION, PromptStyle
from threadweaver_verl.eval.metrics import mean
from threadweaver_verl.format import Limits, TokenFormat
from threadweaver_verl.generator import prompts
from threadweaver_verl.generator.inputs import InputError, SourceSample, load_samples, split_trace
from threadweaver_verl.generator.llm import ChatLLM, LLMConfig, LLMError, Usage
from threadweaver_verl.generator.prompts import Step
from threadweaver_verl.generator.records import RecordStore
from threadweaver_verl.generator.rewrite import (
    PlanError,
    assemble,
    check_blocks,
    check_edits,
    check_outlines,
    check_structure,
    check_trajectory,
    parse_json_object,
    text_before_blocks,
    thread_texts,
)
from threadweaver_verl.rl.correctness import CorrectnessConfig, check_answer
from threadweaver_verl.rollout.engine import EngineError
from threadweaver_verl.runs import (
    OutputLock,
    atomic_write_text,
    output_dir,
    remove_stale_temporaries,
    require_model_dir,
    run_async,
)


class SampleStatus(enum.StrEnum):
    """A record's ``status``."""

    ACCEPTED = "accepted"  # the sample became a parallel trajectory
    REJECTED = "rejected"  # a step refused it; the record names the step and the reason


@dataclass
class Stage1Config:
    """``python -m threadweaver_verl generate stage=1 input=traces.jsonl llm.model=... key=value ...``"""

    input: str = ""
    """Correct sequential traces: a .parquet or .jsonl file with one (question, trace, answer) row each."""
    question_field: str = "question"
    """Column holding the question."""
    trace_field: str = "trace"
    """The reasoning; text after a ``</think>`` is kept verbatim as the final answer section."""
    answer_field: str = "answer"
    """The ground truth, checked with math-verify against the trace and the rewrite."""
    id_field: str | None = None
    """Column holding a unique sample id; None: a hash of question and trace."""
    limit: int | None = None
    """Use only the first N samples of the input (None: all; 0: none; negative is an error)."""
    out_dir: str = "runs/generate_stage1"
    """records.jsonl (one record per sample, resumable), errors.jsonl, sft.parquet, rl.parquet, summary.json."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """The rewriting LLM and how it is called."""
    tokenizer: str | None = None
    """HF tokenizer folder with the format tags: stats in tokens and a check that each accepted text
    encodes to training ids (data.chat.response_ids). None: stats in characters, no encoding check."""
    max_threads: int = 4
    """Most threads per block."""
    min_units: int = 6
    """A trace with fewer paragraphs than this is cut into lines instead."""
    max_units: int = 150
    """Traces with more units are rejected at the input step (the prompt would be too long)."""
    min_edit_similarity: float = 0.6
    """Step 3 keeps edits minimal: an edited thread must keep at least this word-level similarity."""
    max_outline_chars: int = 300
    """Longest outline the LLM may write (characters)."""
    repair_attempts: int = 1
    """How often a faulty LLM answer is sent back with the problem named before the sample is rejected."""
    check_input_answer: bool = True
    """Reject traces whose own final answer does not match the ground truth (before paying for the LLM)."""
    final_template: str = "The final answer is $\\boxed{{{answer}}}$."
    """Final answer section for traces without ``</think>`` (``{answer}`` is the ground truth)."""
    correctness: CorrectnessConfig = field(default_factory=CorrectnessConfig)
    """How the final answers of the trace and the rewrite are found and judged."""
    samples_in_flight: int = 16
    """Samples processed at once (LLM calls are further bounded by llm.http.max_concurrency)."""
    data_source: str = "threadweaver/stage1"
    """data_source of the written SFT and RL rows."""
    split: str = "train"
    """``extra_info.split`` of the written rows."""
    instruction: str = "default"
    """Instruction appended to each question of the written prompts: "none", "default"
    (data.chat.DEFAULT_INSTRUCTION) or the instruction text itself."""
    system: str | None = None
    """System message of the written prompts (None: none)."""
    progress: bool = True
    """Show a progress bar."""


class StepRejected(Exception):
    def __init__(self, step: Step, reason: str):
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.reason = reason


@dataclass
class _Run:
    cfg: Stage1Config
    llm: ChatLLM
    store: RecordStore
    fmt: TokenFormat | None
    limits: Limits
    errors: int = 0


async def _ask(
    run: _Run, step: Step, messages: list[dict[str, str]], check: Callable[[dict], Any], usage: Usage
) -> Any:
    """One LLM step: answer -> strict JSON check; a faulty answer is sent back ``repair_attempts`` times."""
    for attempt in range(run.cfg.repair_attempts + 1):
        reply = await run.llm.chat(messages)
        usage.add(reply)
        try:
            obj = parse_json_object(reply.content)
            return check(obj)
        except PlanError as e:
            problem = str(e)
            if reply.finish_reason == "length":
                problem += " (the answer was cut off at the token limit)"
            if attempt == run.cfg.repair_attempts:
                raise StepRejected(step, problem) from None
            messages = prompts.repair_messages(messages, reply.content, problem)
    raise AssertionError("unreachable")


async def _check_answer(text: str, answer: str, cfg: CorrectnessConfig):
    return await asyncio.to_thread(check_answer, text, answer, cfg)


async def _rewrite(run: _Run, s: SourceSample, usage: Usage, rec: dict[str, Any]) -> None:
    cfg = run.cfg
    try:
        split = split_trace(s.trace, cfg.min_units)
    except InputError as e:
        raise StepRejected(Step.INPUT, str(e)) from None
    n = len(split.units)
    rec["units"] = n
    if n < 2:
        raise StepRejected(Step.INPUT, "the trace is a single paragraph; there is nothing to run in parallel")
    if n > cfg.max_units:
        raise StepRejected(Step.INPUT, f"the trace has {n} units > max_units={cfg.max_units}")
    final = split.final if split.final is not None else cfg.final_template.format(answer=s.answer)
    if cfg.check_input_answer:
        # Judge the trace as a whole response: with </think> by the configured rule, else its last box.
        rule_cfg = (
            cfg.correctness
            if split.final is not None
            else dataclasses.replace(cfg.correctness, answer_rule="last_boxed_anywhere")
        )
        chk = await _check_answer(s.trace, s.answer, rule_cfg)
        if not chk.correct:
            detail = f": {chk.detail}" if chk.detail else ""
            raise StepRejected(
                Step.INPUT,
                f"the trace's own answer is not the ground truth {s.answer!r} "
                f"(found {chk.extracted!r}, {chk.status}{detail})",
            )

    steps = await _ask(
        run,
        Step.STRUCTURE,
        prompts.structure_messages(s.question, split.units),
        lambda obj: check_structure(obj, n),
        usage,
    )
    rec["steps"] = len(steps)
    step_texts = [split.join(st.first_unit, st.last_unit) for st in steps]
    plans = await _ask(
        run,
        Step.BLOCKS,
        prompts.blocks_messages(
            s.question,
            [{"step": st.number, "purpose": st.purpose, "relies_on": st.relies_on} for st in steps],
            step_texts,
            cfg.max_threads,
        ),
        lambda obj: check_blocks(obj, steps, cfg.max_threads),
        usage,
    )
    if not plans:
        raise StepRejected(Step.BLOCKS, "the LLM found no independent spans (no block)")
    rec["blocks"] = [[list(t) for t in p.threads] for p in plans]
    originals = thread_texts(split, steps, plans)
    edited = await _ask(
        run,
        Step.EDITS,
        prompts.edits_messages(s.question, text_before_blocks(split, steps, plans), originals),
        lambda obj: check_edits(obj, originals, cfg.min_edit_similarity),
        usage,
    )
    outlines = await _ask(
        run,
        Step.OUTLINES,
        prompts.outlines_messages(s.question, edited),
        lambda obj: check_outlines(obj, [len(b) for b in edited], cfg.max_outline_chars),
        usage,
    )

    traj = assemble(split, steps, plans, edited, outlines, final, run.fmt.layout if run.fmt is not None else None)
    try:
        checked = check_trajectory(traj, run.limits, run.fmt)
    except PlanError as e:
        raise StepRejected(Step.VALIDATE, str(e)) from None
    chk = await _check_answer(checked.text, s.answer, cfg.correctness)
    if not chk.correct:
        raise StepRejected(Step.VALIDATE, f"the rewrite lost the final answer (found {chk.extracted!r}, {chk.status})")
    rec.update(response=checked.text, stats=checked.stats, stats_unit=checked.stats_unit)


async def _process(run: _Run, s: SourceSample) -> dict[str, Any] | None:
    """The sample's record (already stored), or None after a transient API failure (logged)."""
    usage = Usage()
    rec: dict[str, Any] = {"id": s.id, "index": s.index, "question": s.question, "answer": s.answer}
    try:
        await _rewrite(run, s, usage, rec)
        rec.update(status=SampleStatus.ACCEPTED, step=None, reason=None)
    except StepRejected as r:
        rec.update(status=SampleStatus.REJECTED, step=r.step, reason=r.reason)
    except (LLMError, EngineError) as e:  # the API failed for good (OpenAIHTTPError is an EngineError)
        run.errors += 1
        run.store.log_error(s.id, "llm", f"{type(e).__name__}: {e}")
        return None
    rec["llm"] = {
        "calls": usage.calls,
        "cache_hits": usage.cache_hits,
        "prompt_tokens": usage.prompt_tokens + usage.saved_prompt_tokens,
        "completion_tokens": usage.completion_tokens + usage.saved_completion_tokens,
    }
    run.store.append(rec)
    return rec


def _load_format(path: str | None, max_threads: int) -> tuple[TokenFormat | None, Limits]:
    limits = Limits(max_threads_per_block=max_threads, max_depth=1)
    if not path:
        return None, limits
    from transformers import AutoTokenizer

    return TokenFormat.from_tokenizer(AutoTokenizer.from_pretrained(path), limits=limits), limits


async def run_stage1_async(cfg: Stage1Config) -> dict[str, Any]:
    if not cfg.input:
        raise ConfigError("stage 1 needs input=FILE (.parquet or .jsonl with question/trace/answer columns)")
    if not cfg.llm.model:
        raise ConfigError("stage 1 needs the rewriting model: llm.model=NAME (and llm.http.base_url=URL)")
    if cfg.tokenizer:
        require_model_dir(cfg.tokenizer, "tokenizer", what="tokenizer")
    samples, duplicates = load_samples(
        cfg.input, cfg.question_field, cfg.trace_field, cfg.answer_field, cfg.id_field, cfg.limit
    )
    out = output_dir(cfg.out_dir, "out_dir")
    with OutputLock(out, "generate stage=1"):
        remove_stale_temporaries(out)
        (out / "summary.json").unlink(missing_ok=True)  # unfinished until the new summary is written
        return await _run_locked(cfg, samples, duplicates, out)


async def _run_locked(cfg: Stage1Config, samples: list[SourceSample], duplicates: int, out: Path) -> dict[str, Any]:
    fmt, limits = _load_format(cfg.tokenizer, cfg.max_threads)
    store = RecordStore(out / "records.jsonl", out / "errors.jsonl")
    todo = [s for s in samples if s.id not in store]
    try:
        llm = ChatLLM(cfg.llm, cfg.llm.cache_path or out / "llm_cache.sqlite")
    except ConfigError:  # e.g. the API-key variable is not set
        store.close()
        raise
    run = _Run(cfg, llm, store, fmt, limits)
    started = time.monotonic()
    gate = asyncio.Semaphore(max(1, cfg.samples_in_flight))

    async def one(s: SourceSample):
        async with gate:
            return await _process(run, s)

    bar = _progress(len(todo), cfg.progress)
    tasks = [asyncio.create_task(one(s)) for s in todo]
    try:
        for t in asyncio.as_completed(tasks):
            rec = await t
            if bar is not None:
                bar.update(1)
                if rec is not None:
                    bar.set_postfix_str(f"{rec['status']}{'' if rec['step'] is None else ' @' + rec['step']}")
    finally:
        # Interrupted (or a bug): stop the samples still in flight before the client closes under them, so
        # that none is logged as an API error, and none calls the API or writes after the lock is released.
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if bar is not None:
            bar.close()
        await llm.aclose()
    summary = _summarise(
        cfg, samples, store, len(todo), run.errors, duplicates, llm.usage, time.monotonic() - started, store.torn_bytes
    )
    _write_outputs(cfg, samples, store, summary)
    store.close()
    return summary


def run_stage1(cfg: Stage1Config) -> dict[str, Any]:
    return run_async(run_stage1_async(cfg))


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="stage 1 rewrite", unit="sample", file=sys.stderr)


def _summarise(
    cfg: Stage1Config,
    samples: Sequence[SourceSample],
    store: RecordStore,
    attempted: int,
    errors: int,
    duplicates: int,
    usage: Usage,
    seconds: float,
    torn_bytes: int,
) -> dict[str, Any]:
    ids = {s.id for s in samples}
    recs = [r for r in store if r["id"] in ids]
    accepted = [r for r in recs if r["status"] == SampleStatus.ACCEPTED]
    rejected = Counter(r["step"] for r in recs if r["status"] == SampleStatus.REJECTED)
    return {
        "stage": 1,
        "samples": len(samples),
        "duplicate_rows_dropped": duplicates,
        "attempted_this_run": attempted,
        "resumed_from_records": len(samples) - attempted,
        "records": len(recs),
        "accepted": len(accepted),
        "rejected": sum(rejected.values()),
        "rejected_by_step": {step: rejected.get(step, 0) for step in Step},
        "errors_to_retry": errors,
        "missing": len(samples) - len(recs),
        "mean_speedup": mean([r["stats"]["speedup"] for r in accepted]),
        "mean_blocks": mean([r["stats"]["num_blocks"] for r in accepted]),
        "stats_unit": accepted[0]["stats_unit"] if accepted else None,
        "llm_usage": usage.as_dict(),
        "torn_record_bytes_repaired": torn_bytes,
        "seconds": seconds,
        "outputs": {},
    }


def _write_outputs(
    cfg: Stage1Config, samples: Sequence[SourceSample], store: RecordStore, summary: dict[str, Any]
) -> None:
    """sft.parquet (accepted rewrites) and rl.parquet (every input problem), both in the project's schemas."""
    from threadweaver_verl.data.schema import rl_row, sft_row, write_rl, write_sft

    out = Path(cfg.out_dir)
    instruction = {"none": None, "default": DEFAULT_INSTRUCTION}.get(cfg.instruction, cfg.instruction)
    style = PromptStyle(instruction=instruction, system=cfg.system)
    sft, rl = [], []
    for s in samples:
        rl.append(
            rl_row(
                data_source=cfg.data_source,
                question=s.question,
                ground_truth=s.answer,
                index=s.index,
                split=cfg.split,
                style=style,
                extra={"sample_id": s.id},
            )
        )
        rec = store.get(s.id)
        if rec is not None and rec["status"] == SampleStatus.ACCEPTED:
            sft.append(
                sft_row(
                    data_source=cfg.data_source,
                    question=s.question,
                    response=rec["response"],
                    index=s.index,
                    split=cfg.split,
                    style=style,
                    extra={
                        "sample_id": s.id,
                        "ground_truth": s.answer,
                        "stage": 1,
                        "round": 0,
                        "num_blocks": int(rec["stats"]["num_blocks"]),
                        "speedup": float(rec["stats"]["speedup"]),
                    },
                )
            )
    if sft:
        summary["outputs"]["sft"] = str(write_sft(sft, out / "sft.parquet"))
    if rl:
        summary["outputs"]["rl"] = str(write_rl(rl, out / "rl.parquet"))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))  # last
