"""Where a fork/join trajectory's time goes: the demo's two models on a real vLLM CPU server (one server busy
at a time, as the demo evaluates), at 1 problem in flight and at 16, repeated and alternated: each repeat
starts a fresh server per model, both stay up, and the two models take turns over slices of the problems
(``slice`` problems, or the concurrency if larger; ABBA order; ``pause_s`` between turns, longer than
vLLM's 1 s busy-wait after a step, so only one server is awake at a time). A server's speed on a shared
CPU differs from one start to the next and drifts with the machine by more than the effects measured
here, so the two models are measured side by side, and each ratio is the median of the repeats' ratios.
Requests are the evaluation's (greedy, no log-probs).

    python benchmarks/profile_forkjoin.py runs/demo [problems=48] [concurrency=1,16] [repeats=3] \\
        [pyspy=PATH_TO_PY_SPY] [json=out.json] [server_args=...] [separate=false] [slice=4] [pause_s=1.5]

``runs/demo`` is a finished ``make demo`` output folder (its ``sft_sequential/model``, ``sft_parallel/model``
and ``data/test.parquet`` are used). For each model, concurrency and repeat it reports:

- the user's view: latency per problem (mean, p50), throughput, **ms of wall time per generated token**
  (the run's wall time over all generated tokens: the issue's "time per generated token");
- the client's view, from the controller's own per-call timings (``RolloutResult.calls``): time in main-line
  calls, in thread blocks (fork to join), the **straggler wait** (per block: its span minus the mean thread
  call's duration: how long the average thread sat finished, waiting for the slowest), and the time outside
  any engine call (controller CPU and event-loop delays);
- the server's view, from vLLM's ``/metrics`` (deltas over the run, per request): queue, prefill and decode
  time, end-to-end; the client's mean call time minus vLLM's end-to-end is HTTP + the API server's own
  work (request parsing, detokenization, JSON); prompt tokens computed vs served from the prefix cache;
  engine steps and tokens per step;
- CPU seconds per process (vLLM's API server, its engine core, this client) per 1,000 generated tokens.

With ``pyspy=`` (py-spy is not a dependency: ``pip install py-spy`` anywhere and pass its path) the first
repeat's first slice at the highest concurrency is also sampled, and each process's top functions (own
time) are printed.
``separate=false`` leaves vLLM's engine core where the kernel puts it (``VLLMServerConfig.separate_engine_core``,
on by default: :mod:`threadweaver_verl.rollout.cpu_affinity`). The load average is printed at the start and
the end: the machine is shared; run it idle, read medians.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def parse_args(argv):
    args = {
        "separate": "true",
        "problems": "48",
        "concurrency": "1,16",
        "repeats": "3",
        "pyspy": "",
        "json": "",
        "server_args": "",
        "slice": "4",
        "pause_s": "1.5",
    }
    rest = []
    for a in argv:
        if "=" in a:
            k, v = a.split("=", 1)
            if k not in args:
                sys.exit(f"unknown setting {k!r}; settings: {sorted(args)}")
            args[k] = v
        else:
            rest.append(a)
    if len(rest) != 1:
        sys.exit(__doc__)
    if args["separate"].lower() not in ("true", "false", "1", "0"):
        sys.exit(f"separate={args['separate']!r}: use true or false")
    return Path(rest[0]), args


# ----------------------------------------------------------------------------- vLLM metrics
_SAMPLE = re.compile(r"^(vllm:[a-zA-Z0-9_]+)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$")


def scrape(url: str) -> dict[str, float]:
    """vLLM's Prometheus metrics summed over labels (histograms as their _sum and _count)."""
    text = urllib.request.urlopen(url.rstrip("/").removesuffix("/v1") + "/metrics", timeout=30).read().decode()
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m.group(3) != "NaN" and "_bucket" not in m.group(1):
            out[m.group(1)] += float(m.group(3))
    return out


def delta(after: dict, before: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


# ----------------------------------------------------------------------------- processes
def server_processes(root_pid: int) -> dict[str, list]:
    """vLLM's API server (the launched process) and its children by role (EngineCore, ...)."""
    import psutil

    from threadweaver_verl.rollout.cpu_affinity import ENGINE_CORE_TITLE

    root = psutil.Process(root_pid)
    roles: dict[str, list] = {"api_server": [root]}
    for child in root.children(recursive=True):
        try:
            title = child.name()
        except psutil.Error:
            continue
        role = "engine_core" if title.startswith(ENGINE_CORE_TITLE) else f"other:{title}"
        roles.setdefault(role, []).append(child)
    return roles


def cpu_seconds(procs) -> float:
    import psutil

    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


# ----------------------------------------------------------------------------- the client
async def run_batch(fmt, controller, url, prompts, concurrency, sampling):
    from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine

    gate = asyncio.Semaphore(concurrency)
    results = []

    async with OpenAICompletionsEngine(base_url=url) as engine:

        async def one(i, ids):
            async with gate:
                results.append(await controller.run(engine, ids, routing_key=f"prof-{i}", sampling=sampling))

        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
        return results, time.perf_counter() - t0


def union_length(intervals) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def client_breakdown(results) -> dict[str, float]:
    """Mean seconds per trajectory, from the controller's per-call timings."""
    from threadweaver_verl.format.requests import RequestKind

    rows = collections.defaultdict(list)
    for r in results:
        calls = r.calls
        main = [c for c in calls if c.kind == RequestKind.SEQUENTIAL]
        threads = [c for c in calls if c.kind != RequestKind.SEQUENTIAL]
        blocks = collections.defaultdict(list)
        for c in threads:
            blocks[c.path[:-1]].append(c)
        span = sum(max(c.ended_s for c in cs) - min(c.started_s for c in cs) for cs in blocks.values())
        straggler = sum(
            (max(c.ended_s for c in cs) - min(c.started_s for c in cs))
            - statistics.fmean(c.ended_s - c.started_s for c in cs)
            for cs in blocks.values()
        )
        rows["wall_s"].append(r.wall_time_s)
        rows["main_calls_s"].append(sum(c.ended_s - c.started_s for c in main))
        rows["thread_blocks_s"].append(span)
        rows["straggler_wait_s"].append(straggler)
        rows["outside_calls_s"].append(r.wall_time_s - union_length([(c.started_s, c.ended_s) for c in calls]))
        rows["calls"].append(len(calls))
        rows["mean_call_s"].append(statistics.fmean(c.ended_s - c.started_s for c in calls))
    return {k: statistics.fmean(v) for k, v in rows.items()}


def pyspy_start(pyspy: str, pid: int, out: Path):
    return subprocess.Popen(
        [pyspy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200", "--nonblocking", "-o", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def pyspy_top(path: Path, n: int = 8) -> list[tuple[str, float]]:
    """The functions with the most own (leaf) samples, as shares of all samples."""
    own: collections.Counter = collections.Counter()
    total = 0
    if not path.exists():
        return []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():  # py-spy splits a frame name holding a newline over two lines
            continue
        leaf = stack.split(";")[-1]
        own[re.sub(r" \(.*/", " (", leaf)] += int(count)
        total += int(count)
    return [(f, c / total) for f, c in own.most_common(n)] if total else []


def measure(fmt, controller, url, prompts, concurrency, sampling, roles) -> dict[str, float]:
    """One pass over ``prompts`` at ``concurrency``: the user's, the client's and the server's view."""
    m0 = scrape(url)
    cpu0 = {role: cpu_seconds(p) for role, p in roles.items()}
    own0 = time.process_time()
    results, wall = asyncio.run(run_batch(fmt, controller, url, prompts, concurrency, sampling))
    own = time.process_time() - own0
    cpu = {role: cpu_seconds(p) - cpu0[role] for role, p in roles.items()}
    m1 = scrape(url)
    tokens = sum(len(r.response_ids) for r in results)
    reqs = delta(m1, m0, "vllm:request_success_total") or 1.0
    steps = delta(m1, m0, "vllm:iteration_tokens_total_count")
    lat = [r.wall_time_s for r in results]
    meas = {
        "load": os.getloadavg()[0],
        "wall_s": wall,
        "problems": len(results),
        "latencies": lat,
        "tokens": tokens,
        "problems_per_s": len(results) / wall,
        "ms_per_token": 1000 * wall / tokens,
        "latency_mean_s": statistics.fmean(lat),
        "latency_p50_s": statistics.median(lat),
        "mean_T": tokens / len(results),
        "mean_L": statistics.fmean(r.stats.critical_path for r in results),
        **{f"client_{k}": v for k, v in client_breakdown(results).items()},
        "server_requests": reqs,
        "server_queue_s": delta(m1, m0, "vllm:request_queue_time_seconds_sum") / reqs,
        "server_prefill_s": delta(m1, m0, "vllm:request_prefill_time_seconds_sum") / reqs,
        "server_decode_s": delta(m1, m0, "vllm:request_decode_time_seconds_sum") / reqs,
        "server_e2e_s": delta(m1, m0, "vllm:e2e_request_latency_seconds_sum") / reqs,
        "prompt_tokens": delta(m1, m0, "vllm:prompt_tokens_total"),
        "prefix_cache_hit_share": delta(m1, m0, "vllm:prefix_cache_hits_total")
        / max(1.0, delta(m1, m0, "vllm:prefix_cache_queries_total")),
        "engine_steps": steps,
        "tokens_per_step": delta(m1, m0, "vllm:iteration_tokens_total_sum") / max(1.0, steps),
        "ms_per_engine_step": 1000 * wall / max(1.0, steps),
        **{f"cpu_s_per_1k_tokens_{role}": 1000 * s / tokens for role, s in cpu.items()},
        "cpu_s_per_1k_tokens_client": 1000 * own / tokens,
    }
    meas["http_and_api_server_s_per_call"] = meas["client_mean_call_s"] - meas["server_e2e_s"]
    return meas


_SUMMED = ("wall_s", "problems", "tokens", "server_requests", "prompt_tokens", "engine_steps")


def combine(parts: list[dict]) -> dict[str, float]:
    """One measurement from :func:`measure`'s passes over slices of the problems: counts and times summed, rates
    and the median latency recomputed from them, the other means weighted by each slice's problems (a model
    sends the same requests per problem, so per-request means are weighted alike)."""
    weights = [p["problems"] for p in parts]
    out = {
        k: statistics.fmean([p[k] for p in parts], weights=weights)
        for k in parts[0]
        if k not in _SUMMED and k != "latencies"
    }
    out.update({k: sum(p[k] for p in parts) for k in _SUMMED})
    out["latency_p50_s"] = statistics.median(t for p in parts for t in p["latencies"])
    out["problems_per_s"] = out["problems"] / out["wall_s"]
    out["ms_per_token"] = 1000 * out["wall_s"] / out["tokens"]
    out["ms_per_engine_step"] = 1000 * out["wall_s"] / max(1.0, out["engine_steps"])
    out["http_and_api_server_s_per_call"] = out["client_mean_call_s"] - out["server_e2e_s"]
    out["load"] = max(p["load"] for p in parts)
    return out


# ----------------------------------------------------------------------------- main
KINDS = ("sequential", "parallel")


def main(argv) -> int:
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoTokenizer

    from threadweaver_verl.data.chat import prompt_ids
    from threadweaver_verl.data.schema import read_rl
    from threadweaver_verl.eval.metrics import share_of_token_speedup
    from threadweaver_verl.format import TokenFormat
    from threadweaver_verl.rollout.controller import ControllerConfig, ForkJoinController
    from threadweaver_verl.rollout.vllm_server import VLLMServer, VLLMServerConfig

    run, args = parse_args(argv)
    console = Console()
    concurrencies = [int(c) for c in args["concurrency"].split(",")]
    n, repeats = int(args["problems"]), int(args["repeats"])
    rows = read_rl(str(run / "data" / "test.parquet"))[:n]
    console.print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    measurements = []
    spy = {}
    work = Path(tempfile.mkdtemp(prefix="profile-forkjoin-"))
    setups = {}
    for kind in KINDS:
        model = run / f"sft_{kind}" / "model"
        tok = AutoTokenizer.from_pretrained(str(model))
        fmt = TokenFormat.from_tokenizer(tok)
        controller = ForkJoinController(
            fmt, ControllerConfig(fork=kind == "parallel", max_response_tokens=2048, max_thread_tokens=512)
        )
        setups[kind] = (model, fmt, controller, [prompt_ids(tok, r["prompt"]) for r in rows])
    sampling = {"temperature": 0.0, "logprobs": False}  # as the evaluation asks (EvalConfig.engine)
    extra = ["--block-size", "16", *args["server_args"].split()]
    pause_s = float(args["pause_s"])
    separate = args["separate"].lower() in ("true", "1")
    for rep in range(repeats):
        # A fresh pair of servers per repeat, both up, the two models' slices of the problems alternating
        # (ABBA) with a pause between them: a server's speed on a shared CPU differs from one start to the next
        # and drifts with the machine by more than the effects measured here, so a repeat's two models are
        # measured side by side. The pause outlasts vLLM's busy-wait after a step (1 s), so the idle server's
        # engine core and worker are asleep while the other one runs.
        with contextlib.ExitStack() as stack:
            servers, roles = {}, {}
            for kind in KINDS:
                model, fmt, controller, prompts = setups[kind]
                servers[kind] = stack.enter_context(
                    VLLMServer(
                        VLLMServerConfig(
                            model=str(model),
                            work_dir=str(work / f"{kind}-{rep}"),
                            extra_args=extra,
                            separate_engine_core=separate,
                        )
                    )
                )
                asyncio.run(run_batch(fmt, controller, servers[kind].url, prompts[:4], 4, sampling))  # warm-up
                roles[kind] = server_processes(servers[kind].process.pid)
                if rep == 0:
                    console.print(
                        f"{kind}: vLLM processes { ({k: [p.pid for p in v] for k, v in roles[kind].items()}) }"
                    )
            for c in concurrencies:
                size = max(int(args["slice"]), c)
                slices = [range(i, min(i + size, n)) for i in range(0, n, size)]
                parts = collections.defaultdict(list)
                for j, problems in enumerate(slices):
                    for kind in KINDS if j % 2 == 0 else KINDS[::-1]:
                        time.sleep(pause_s)
                        _, fmt, controller, prompts = setups[kind]
                        spies = []
                        if args["pyspy"] and rep == 0 and c == max(concurrencies) and j == 0:
                            for role, procs in roles[kind].items():
                                out = work / f"{kind}-{role}.txt"
                                spies.append((role, out, pyspy_start(args["pyspy"], procs[0].pid, out)))
                            out = work / f"{kind}-client.txt"
                            spies.append(("client", out, pyspy_start(args["pyspy"], os.getpid(), out)))
                            time.sleep(1.0)
                        url = servers[kind].url
                        parts[kind].append(
                            measure(fmt, controller, url, [prompts[i] for i in problems], c, sampling, roles[kind])
                        )
                        for role, path, proc in spies:
                            proc.send_signal(signal.SIGINT)
                            proc.wait(60)
                            spy[(kind, role)] = pyspy_top(path)
                for kind in KINDS:
                    meas = combine(parts[kind])
                    meas.update(model=kind, concurrency=c, repeat=rep)
                    measurements.append(meas)
                    console.print(
                        f"repeat {rep} {kind} c={c}: {len(slices)} slices, wall {meas['wall_s']:.1f} s, "
                        f"{meas['ms_per_token']:.2f} ms/token, latency {meas['latency_mean_s']:.3f} s, "
                        f"load {meas['load']:.2f}"
                    )
    console.print(f"load average at end: {os.getloadavg()[0]:.2f}")

    keys = [k for k in measurements[0] if k not in ("model", "concurrency", "repeat")]
    keys += sorted(
        {k for m in measurements for k in m if k not in keys and k not in ("model", "concurrency", "repeat")}
    )
    medians = {}
    for kind in ("sequential", "parallel"):
        for c in concurrencies:
            ms = [m for m in measurements if m["model"] == kind and m["concurrency"] == c]
            medians[(kind, c)] = {
                k: statistics.median(m[k] for m in ms if k in m) for k in keys if any(k in m for m in ms)
            }
    # the eval's definitions (threadweaver_verl.eval.metrics) on these problems, per repeat (its two models
    # measured side by side), then the median over repeats: every trajectory of both runs finished (the
    # controller raises otherwise), so ratios of the per-problem means are ratios of the means
    paired = collections.defaultdict(list)
    for c in concurrencies:
        for rep in range(repeats):
            (seq,) = [m for m in measurements if (m["model"], m["concurrency"], m["repeat"]) == ("sequential", c, rep)]
            (par,) = [m for m in measurements if (m["model"], m["concurrency"], m["repeat"]) == ("parallel", c, rep)]
            token_speedup = seq["mean_T"] / par["mean_L"]
            latency_speedup = seq["latency_mean_s"] / par["latency_mean_s"]
            paired[("token_speedup", c)].append(token_speedup)
            paired[("latency_speedup", c)].append(latency_speedup)
            paired[("latency_share_of_token_speedup", c)].append(share_of_token_speedup(latency_speedup, token_speedup))
            paired[("ms_per_token_over_sequential", c)].append(par["ms_per_token"] / seq["ms_per_token"])
        for k in ("token_speedup", "latency_speedup", "latency_share_of_token_speedup", "ms_per_token_over_sequential"):
            medians[("parallel", c)][k] = statistics.median(paired[(k, c)])
            console.print(f"c={c} {k} per repeat: " + ", ".join(f"{v:.3f}" for v in paired[(k, c)]))
    keys += ["token_speedup", "latency_speedup", "latency_share_of_token_speedup", "ms_per_token_over_sequential"]
    table = Table(
        title=f"median of {repeats} repeats (ratios: of the repeats' ratios), {n} problems (greedy), "
        "a fresh pair of vLLM servers per repeat, the models taking turns"
    )
    table.add_column("metric")
    cols = [(kind, c) for c in concurrencies for kind in ("sequential", "parallel")]
    for kind, c in cols:
        table.add_column(f"{kind[:3]} c={c}", justify="right")
    for c in concurrencies:
        table.add_column(f"par/seq c={c}", justify="right")
    for k in keys:
        vals = [medians[col].get(k) for col in cols]
        ratios = []
        for c in concurrencies:
            s, p = medians[("sequential", c)].get(k), medians[("parallel", c)].get(k)
            ratios.append(f"{p / s:.2f}" if s and p is not None else "")
        table.add_row(k, *[f"{v:.4g}" if v is not None else "" for v in vals], *ratios)
    console.print(table)
    for (kind, role), top in spy.items():
        console.print(f"py-spy {kind} {role}: " + "; ".join(f"{f} {share:.0%}" for f, share in top))
    if args["json"]:
        Path(args["json"]).write_text(
            json.dumps(
                {
                    "measurements": measurements,
                    "medians": {f"{k} c={c}": v for (k, c), v in medians.items()},
                    "per_repeat": {f"{k} c={c}": v for (k, c), v in paired.items()},
                    "pyspy": {f"{k} {r}": t for (k, r), t in spy.items()},
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
