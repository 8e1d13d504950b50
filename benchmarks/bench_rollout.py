"""Fork/join rollout speed.

1. Controller overhead per request with a zero-latency engine (the controller parses the
   request's context after every completion, so its cost grows with the response length):
   per-request time against the same trajectory's total (engine time is zero).
2. On a real vLLM CPU server with the tiny model: wall clock of a k-thread fork/join
   (through the controller and the OpenAI adapter) against ONE sequential request with
   the same total generated tokens, fixed lengths (ignore_eos, digits only), k = 2, 4, 8.
   Reports the achieved speedup, its share of the ideal T/L (= k) and the prefix-cache hit
   rate of the thread requests.

    python benchmarks/bench_rollout.py [thread_tokens=128] [repeats=3] [vllm=1]
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the engine tests steer too

from _steered_engine import SteeredEngine  # noqa: E402


def outline_block(k: int) -> str:
    from threadweaver_verl.format import BlockLayout
    from threadweaver_verl.format.tree import atoms_text

    return atoms_text(BlockLayout.outline_atoms([f"part {i}" for i in range(1, k + 1)]))


class ZeroLatencyEngine:
    """Answers at once from precomputed ids: a main line that opens `blocks` blocks of k threads."""

    def __init__(self, fmt, prompt_len: int, k: int, blocks: int, thread_len: int):
        from threadweaver_verl.format import Tag

        self.fmt, self.prompt_len, self.blocks = fmt, prompt_len, blocks
        self.block = fmt.fragment_ids("\nstep " + outline_block(k))
        self.thread = fmt.encode(" 7" * (thread_len // 2)) + [fmt.tag_id(Tag.THREAD_CLOSE)]
        self.end = fmt.encode(" done") + [fmt.eos_ids[0]]
        self.close_id = fmt.tag_id(Tag.PARALLEL_CLOSE)
        self.thread_open = fmt.tag_id(Tag.THREAD_OPEN)

    async def complete(self, prompt_ids, *, max_tokens, stop_token_ids, routing_key, sampling=None):
        from threadweaver_verl.rollout.engine import Completion, Finish

        tail = prompt_ids[-4:]
        if self.thread_open in tail:
            return Completion(self.thread, Finish.STOP)
        done = sum(1 for i in prompt_ids[self.prompt_len :] if i == self.close_id)
        return Completion(self.block if done < self.blocks else self.end, Finish.STOP)


def bench_overhead(fmt, prompt, console) -> list[tuple]:
    from rich.table import Table

    from threadweaver_verl.rollout.controller import ControllerConfig, ForkJoinController

    rows = []
    for k, blocks, thread_len in ((2, 1, 32), (4, 4, 64), (8, 4, 96), (8, 8, 32)):
        engine = ZeroLatencyEngine(fmt, len(prompt), k, blocks, thread_len)
        ctrl = ForkJoinController(
            fmt, ControllerConfig(max_response_tokens=16384, max_blocks=blocks + 1, max_requests=256)
        )
        asyncio.run(ctrl.run(engine, prompt, routing_key="warm"))
        times, calls, total = [], 0, 0
        for r in range(5):
            t0 = time.perf_counter()
            res = asyncio.run(ctrl.run(engine, prompt, routing_key=f"o{r}"))
            times.append(time.perf_counter() - t0)
            calls, total = res.num_engine_calls, res.stats.total_tokens
            assert res.valid, res.format_errors
        t = statistics.median(times)
        # baseline from the same run: reading the finished trajectory once (parse + validate + stats)
        base = []
        for _ in range(5):
            t0 = time.perf_counter()
            traj = fmt.parse(res.response_ids)
            fmt.validate(traj)
            fmt.stats(traj)
            base.append(time.perf_counter() - t0)
        b = statistics.median(base)
        rows.append((k, blocks, total, calls, t * 1e3, t / calls * 1e6, t / total * 1e6, b * 1e3, t / b))
    table = Table(title="controller overhead, zero-latency engine (median of 5)")
    for col in (
        "threads/block",
        "blocks",
        "T (tokens)",
        "requests",
        "ms / trajectory",
        "us / request",
        "us / response token",
        "ms to read it once",
        "overhead / one read",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(f"{x:.1f}" if isinstance(x, float) else str(x) for x in r))
    console.print(table)
    return rows


async def _fork_join(fmt, url, prompt, k, thread_tokens, sampling, key):
    from threadweaver_verl.format import Tag
    from threadweaver_verl.rollout.controller import ControllerConfig, ForkJoinController
    from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine

    block_ids = fmt.fragment_ids(outline_block(k))
    cfg = ControllerConfig(
        max_response_tokens=k * (thread_tokens + 16) + 256,
        max_thread_tokens=thread_tokens + 1,
        close_reserve_tokens=0,
        max_threads_per_block=8,
    )
    async with OpenAICompletionsEngine(base_url=url) as real:
        # the main line: the outline block (the sequential baseline's context holds the same block, and
        # both find it in the prefix cache, warmed before the timing), then EOS after the join; so both
        # sides time the same generated tokens
        main = [block_ids, [fmt.eos_ids[0]]]
        engine = SteeredEngine(real, main, thread_close_id=fmt.tag_id(Tag.THREAD_CLOSE), prefill=False)
        return await ForkJoinController(fmt, cfg).run(engine, prompt, routing_key=key, sampling=sampling)


async def _sequential(fmt, url, context, tokens, sampling, key):
    from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine

    async with OpenAICompletionsEngine(base_url=url) as engine:
        t0 = time.perf_counter()
        comp = await engine.complete(context, max_tokens=tokens, stop_token_ids=[], routing_key=key, sampling=sampling)
        wall = time.perf_counter() - t0
    assert len(comp.token_ids) == tokens, (len(comp.token_ids), tokens)
    return wall


async def _concurrent(fmt, url, context, k, tokens, sampling, key):
    """k plain requests at once (the thread prompts, no controller): what the server itself gives."""
    from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine

    async with OpenAICompletionsEngine(base_url=url) as engine:
        t0 = time.perf_counter()
        comps = await asyncio.gather(
            *(
                engine.complete(
                    fmt.fork_context(context, n),
                    max_tokens=tokens,
                    stop_token_ids=[],
                    routing_key=key,
                    sampling=sampling,
                )
                for n in range(1, k + 1)
            )
        )
        wall = time.perf_counter() - t0
    assert all(len(c.token_ids) == tokens for c in comps)
    return wall


def bench_vllm(fmt, tokenizer, model_dir, thread_tokens: int, repeats: int, console) -> list[tuple]:
    from rich.table import Table
    from tqdm import tqdm

    from threadweaver_verl.data.chat import PromptStyle, prompt_ids
    from threadweaver_verl.format import RequestKind
    from threadweaver_verl.rollout.vllm_server import VLLMServer

    prompt = prompt_ids(tokenizer, PromptStyle().messages("Multiply 4821 by 37, digit by digit. " * 8))
    digits = sorted({*fmt.encode("0123456789 ")})
    sampling = {"temperature": 1.0, "ignore_eos": True, "allowed_token_ids": digits, "logprobs": False}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as work:
        t0 = time.perf_counter()
        with VLLMServer(str(model_dir), work_dir=work, max_model_len=4096) as server:
            console.print(f"vLLM CPU server up in {time.perf_counter() - t0:.0f} s at {server.url}")
            for k in (2, 4, 8):
                block_ids = fmt.fragment_ids(outline_block(k))
                context = list(prompt) + block_ids
                total = k * thread_tokens
                asyncio.run(_sequential(fmt, server.url, context, 8, sampling, "warm"))  # warm the shared prefix
                asyncio.run(_fork_join(fmt, server.url, prompt, k, thread_tokens, sampling, f"warm-{k}"))
                seq, fj, raw, ratio_tl, hits = [], [], [], [], []
                for r in tqdm(range(repeats), desc=f"k={k}"):
                    seq.append(asyncio.run(_sequential(fmt, server.url, context, total, sampling, f"s{k}{r}")))
                    raw.append(
                        asyncio.run(_concurrent(fmt, server.url, context, k, thread_tokens, sampling, f"c{k}{r}"))
                    )
                    res = asyncio.run(_fork_join(fmt, server.url, prompt, k, thread_tokens, sampling, f"f{k}{r}"))
                    threads = [c for c in res.calls if c.kind == RequestKind.THREAD]
                    assert len(threads) == k and all(c.completion_tokens == thread_tokens for c in threads), threads
                    fj.append(res.wall_time_s)
                    ratio_tl.append(res.stats.speedup)
                    hits.append(sum(c.cached_tokens or 0 for c in threads) / sum(c.prompt_tokens for c in threads))
                s, f, c = statistics.median(seq), statistics.median(fj), statistics.median(raw)
                achieved = s / f
                rows.append(
                    (
                        k,
                        thread_tokens,
                        total,
                        s,
                        c,
                        f,
                        s / c,
                        achieved,
                        float(k),
                        achieved / k,
                        c / f,
                        statistics.median(ratio_tl),
                        statistics.median(hits),
                    )
                )
    table = Table(
        title=f"vLLM CPU (tiny model): k-thread fork/join vs one sequential request, "
        f"same generated tokens (median of {repeats})"
    )
    for col in (
        "k",
        "tokens/thread",
        "total tokens",
        "sequential s",
        "k plain requests s",
        "fork/join s",
        "server speedup (seq / plain)",
        "achieved speedup (seq / fork-join)",
        "ideal (k)",
        "share of ideal",
        "controller efficiency (plain / fork-join)",
        "trajectory T/L",
        "thread prefix-cache hit",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*(f"{x:.3g}" if isinstance(x, float) else str(x) for x in r))
    console.print(table)
    return rows


def main(argv: list[str]) -> int:
    from rich.console import Console
    from transformers import AutoTokenizer

    from threadweaver_verl.data.chat import PromptStyle, prompt_ids
    from threadweaver_verl.format import TokenFormat
    from threadweaver_verl.models.tiny import build_tiny_model

    args = dict(a.split("=", 1) for a in argv)
    thread_tokens = int(args.get("thread_tokens", 128))
    repeats = int(args.get("repeats", 3))
    console = Console(width=200)
    import os

    console.print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        fmt = TokenFormat.from_tokenizer(tokenizer)
        prompt = prompt_ids(tokenizer, PromptStyle().messages("What is 12 * 34?"))
        bench_overhead(fmt, prompt, console)
        if args.get("vllm", "1") != "0":
            bench_vllm(fmt, tokenizer, model_dir, thread_tokens, repeats, console)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
