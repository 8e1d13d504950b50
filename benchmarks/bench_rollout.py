"""Fork/join rollout speed on a real vLLM CPU server with the tiny model, one trajectory at a time:
the latency of a k-thread fork/join (through the controller and the OpenAI adapter) against ONE
sequential request with the same total generated tokens, fixed lengths (ignore_eos, digits only),
k = 2, 4, 8. Reports the latency speedup, the token speedup (T_seq / L) and the share of it that the
latency speedup reaches, the share of the ideal (k), and the prefix-cache hit rate of the thread
requests. Latency, its speedup and that share have the eval's definitions
(:mod:`threadweaver_verl.eval.metrics`, whose functions compute them here).

The controller's own CPU time per request: ``benchmarks/bench_controller.py``.

    python benchmarks/bench_rollout.py [thread_tokens=128] [repeats=3] [separate=false]

``separate=false`` leaves vLLM's engine core where the kernel puts it (``VLLMServerConfig.separate_engine_core``).
"""

from __future__ import annotations

import asyncio
import os
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


def bench_vllm(
    fmt, tokenizer, model_dir, thread_tokens: int, repeats: int, console, separate: bool = True
) -> list[tuple]:
    from rich.table import Table
    from tqdm import tqdm

    from threadweaver_verl.data.chat import PromptStyle, prompt_ids
    from threadweaver_verl.eval.metrics import latency, latency_speedup, share_of_token_speedup, token_speedup
    from threadweaver_verl.format import RequestKind
    from threadweaver_verl.rollout.vllm_server import VLLMServer

    prompt = prompt_ids(tokenizer, PromptStyle().messages("Multiply 4821 by 37, digit by digit. " * 8))
    digits = sorted({*fmt.encode("0123456789 ")})
    sampling = {"temperature": 1.0, "ignore_eos": True, "allowed_token_ids": digits, "logprobs": False}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as work:
        t0 = time.perf_counter()
        with VLLMServer(str(model_dir), work_dir=work, max_model_len=4096, separate_engine_core=separate) as server:
            console.print(f"vLLM CPU server up in {time.perf_counter() - t0:.0f} s at {server.url}")
            for k in (2, 4, 8):
                block_ids = fmt.fragment_ids(outline_block(k))
                context = list(prompt) + block_ids
                total = k * thread_tokens
                asyncio.run(_sequential(fmt, server.url, context, 8, sampling, "warm"))  # warm the shared prefix
                asyncio.run(_fork_join(fmt, server.url, prompt, k, thread_tokens, sampling, f"warm-{k}"))
                seq, fj, raw, fj_L, hits = [], [], [], [], []
                for r in tqdm(range(repeats), desc=f"k={k}"):
                    seq.append(asyncio.run(_sequential(fmt, server.url, context, total, sampling, f"s{k}{r}")))
                    raw.append(
                        asyncio.run(_concurrent(fmt, server.url, context, k, thread_tokens, sampling, f"c{k}{r}"))
                    )
                    res = asyncio.run(_fork_join(fmt, server.url, prompt, k, thread_tokens, sampling, f"f{k}{r}"))
                    threads = [c for c in res.calls if c.kind == RequestKind.THREAD]
                    assert len(threads) == k and all(c.completion_tokens == thread_tokens for c in threads), threads
                    fj.append(res.wall_time_s)
                    fj_L.append(res.stats.critical_path)
                    hits.append(sum(c.cached_tokens or 0 for c in threads) / sum(c.prompt_tokens for c in threads))
                s, f, c = latency(seq), latency(fj), latency(raw)
                achieved = latency_speedup({"trajectory": seq}, {"trajectory": fj})  # ratio of the means
                tokens = token_speedup({"trajectory": [total]}, {"trajectory": fj_L})  # T_seq / L
                rows.append(
                    (
                        k,
                        thread_tokens,
                        total,
                        s.p50_s,
                        c.p50_s,
                        f.p50_s,
                        f.p90_s,
                        latency_speedup({"trajectory": seq}, {"trajectory": raw}),
                        achieved,
                        tokens,
                        share_of_token_speedup(achieved, tokens),
                        achieved / k,
                        latency_speedup({"trajectory": raw}, {"trajectory": fj}),
                        statistics.median(hits),
                    )
                )
    table = Table(
        title=f"vLLM CPU (tiny model), one trajectory at a time: k-thread fork/join vs one sequential request, "
        f"same generated tokens ({repeats} repeats; ratios of mean latencies)"
    )
    for col in (
        "k",
        "tokens/thread",
        "total tokens",
        "sequential s (p50)",
        "k plain requests s (p50)",
        "fork/join s (p50)",
        "fork/join s (p90)",
        "server speedup (seq / plain)",
        "latency speedup (seq / fork-join)",
        "token speedup (T_seq / L)",
        "share of token speedup",
        "share of ideal (k)",
        "controller efficiency (plain / fork-join)",
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

    from threadweaver_verl.format import TokenFormat
    from threadweaver_verl.models.tiny import build_tiny_model

    args = dict(a.split("=", 1) for a in argv)
    thread_tokens = int(args.get("thread_tokens", 128))
    repeats = int(args.get("repeats", 3))
    if args.get("separate", "true").lower() not in ("true", "false", "1", "0"):
        sys.exit(f"separate={args['separate']!r}: use true or false")
    separate = args.get("separate", "true").lower() in ("true", "1")
    console = Console(width=200)
    console.print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="bench-tiny-") as tmp:
        model_dir = build_tiny_model(Path(tmp) / "model")
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        fmt = TokenFormat.from_tokenizer(tokenizer)
        bench_vllm(fmt, tokenizer, model_dir, thread_tokens, repeats, console, separate)
    console.print(f"load average at end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
