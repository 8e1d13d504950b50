"""Trie SFT benchmark: tokens processed per trajectory and step cost of three layouts.

    python benchmarks/bench_trie.py [--quick] [--device cpu|cuda] [--write-docs]

Layouts (all give the same loss on the same trajectories, except the reference's):
* trie      - one trie per trajectory (:mod:`threadweaver_verl.sft.trie`), packed into rows;
* expanded  - one row per Request (context + completion): what stock verl trains on;
* reference - the ThreadWeaver reference code's layout: the full sequence plus a copy of
  every thread after the first (token count only: it leaks between threads and shifts
  targets wrongly, so it is not a correct baseline to time).

Step cost (forward + backward over every row of the data, one row at a time, tiny model,
float32) for trie with the 4-D bool mask (SDPA), trie with the flex BlockMask and the
expanded rows (plain causal SDPA, no mask). Ratios are against trie (SDPA) from the same
run. On a CPU torch's flex attention has no backward: flex is timed forward-only there,
and every layout gets a forward-only column too. Each measurement runs in a fresh
process (one warm-up pass, then the timed passes; on a CPU with one torch thread by default);
peak memory of the timed passes: on CUDA the allocator's peak, on a CPU the kernel's peak RSS (reset after the warm-up).

Data: the project's multiplication task, and random format-valid trajectories (2-8 threads
per block, some nested) sized 8k-32k tokens for the token counts; the step timings on a CPU
use smaller synthetic sizes (see --time-sizes) so the run takes a few minutes.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from threadweaver_verl.data.chat import PromptStyle, prompt_ids, response_ids
from threadweaver_verl.format import Block, Limits, TokenFormat, node_length, split_requests
from threadweaver_verl.sft.batch import TrieCollator, attention_implementation, attention_mask, row_features
from threadweaver_verl.sft.loss import mean_nll, parent_logprobs
from threadweaver_verl.sft.synthetic import TrajectoryShape, random_trajectory
from threadweaver_verl.sft.trie import build_trie, chain, pack

SECTION = "## Trie SFT"


# --------------------------------------------------------------------------- data


@dataclass
class Traj:
    requests: list
    response: list[int]
    prompt: list[int]
    fmt: TokenFormat

    @property
    def sequence_tokens(self) -> int:
        return len(self.prompt) + len(self.response)

    def reference_tokens(self) -> int:
        """Full sequence + every thread after the first, at every nesting level."""
        extra = 0

        def walk(nodes):
            nonlocal extra
            for n in nodes:
                if isinstance(n, Block):
                    threads = n.threads
                    extra += sum(node_length(t) for t in threads[1:])
                    for t in threads:
                        walk(t.body)

        walk(self.fmt.parse(self.response).body)
        return self.sequence_tokens + extra


def make_traj(tok, fmt, question: str, text: str) -> Traj:
    p = prompt_ids(tok, PromptStyle().messages(question))
    r = response_ids(fmt, text)
    return Traj(split_requests(p, r, fmt), r, p, fmt)


def multiplication(tok, fmt, n: int, preset: str) -> list[Traj]:
    from threadweaver_verl.tasks.multiplication import Difficulty, make_samples

    return [
        make_traj(tok, fmt, s.problem.question, s.parallel) for s in make_samples(Difficulty.parse(preset), n, seed=0)
    ]


def synthetic(tok, fmt, tokens: int, n: int, seed: int) -> list[Traj]:
    """``n`` random trajectories of about ``tokens`` response tokens, 2-8 threads, some nested."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        shape = TrajectoryShape(tokens=tokens, blocks=rng.randint(1, 3), min_threads=2, max_threads=8, nested_prob=0.3)
        t = make_traj(tok, fmt, "synthetic", random_trajectory(rng, shape))
        scale = tokens / len(t.response)  # the generator's size is rough: one correction pass
        shape.tokens = max(int(tokens * scale), 64)
        out.append(make_traj(tok, fmt, "synthetic", random_trajectory(rng, shape)))
    return out


# --------------------------------------------------------------------------- measuring


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_rows(model, rows, kind: str, backward: bool, device) -> None:
    """One pass over ``rows`` (one row per forward): trie rows with their mask, or plain causal rows."""
    collate = TrieCollator()
    for row in rows:
        batch = {k: v.to(device) for k, v in collate([row_features(row)]).items()}
        with torch.set_grad_enabled(backward):
            if kind == "causal":
                out = model(input_ids=batch["input_ids"], use_cache=False)
            else:
                with attention_implementation(model, kind):
                    out = model(
                        input_ids=batch["input_ids"],
                        position_ids=batch["position_ids"],
                        attention_mask=attention_mask(batch, kind),
                        use_cache=False,
                    )
            lp = parent_logprobs(out.logits, batch["input_ids"], batch["trie_parent"])
            loss = mean_nll(lp, batch["loss_mask"])
            if backward:
                loss.backward()
    if backward:
        model.zero_grad(set_to_none=True)
    sync(device)


def measure(model, rows, kind, backward, device, repeats) -> tuple[float, int]:
    """Fastest of ``repeats`` passes over ``rows`` after a warm-up, and the peak memory of the
    timed passes above what was resident before them (compile caches of the warm-up excluded):
    on CUDA the allocator's peak, on a CPU the kernel's peak RSS (VmHWM, reset after warm-up).
    The fastest pass, not the median: on a shared machine other jobs only ever add time."""
    run_rows(model, rows, kind, backward, device)  # warm-up pass (flex compiles once per row length)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        if not reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); run on Linux >= 4.0")
        base = rss_bytes("VmRSS")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run_rows(model, rows, kind, backward, device)
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_bytes("VmHWM")) - base
    return min(times), max(peak, 0)


def case_data(tok, fmt, spec: dict) -> list[Traj]:
    if spec["kind"] == "multiplication":
        return multiplication(tok, fmt, spec["n"], spec["preset"])
    return synthetic(tok, fmt, spec["size"], spec["n"], spec["seed"])


def case_rows(trajs: list[Traj], layout: str, budget: int):
    if layout == "expanded":
        return [chain(r) for t in trajs for r in t.requests if r.completion_ids]
    tries = [build_trie(t.requests) for t in trajs]
    return [r for r, _ in pack(tries, max(budget, max(len(x) for x in tries)))]


def run_case(case: dict) -> dict:
    """One (data, layout, mode) measurement; called in a fresh process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(case["device"])
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    tok = AutoTokenizer.from_pretrained(case["model"])
    fmt = TokenFormat.from_tokenizer(tok, limits=Limits(max_threads_per_block=16, max_depth=2))
    rows = case_rows(case_data(tok, fmt, case["data"]), case["layout"], case["budget"])
    model = AutoModelForCausalLM.from_pretrained(case["model"], dtype=torch.float32, attn_implementation="sdpa")
    model.to(device).train()
    kind = {"trie (sdpa bool)": "sdpa", "trie (flex BlockMask)": "flex", "expanded": "causal"}[case["layout"]]
    seconds, peak = measure(model, rows, kind, case["backward"], device, case["repeats"])
    return {"rows": len(rows), "tokens": sum(len(r) for r in rows), "seconds": seconds, "peak": peak}


def spawn_case(case: dict) -> dict:
    import json
    import subprocess

    proc = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark case {case} failed:\n{proc.stderr[-3000:]}")


# --------------------------------------------------------------------------- report


def token_row(name: str, trajs: list[Traj]) -> dict:
    tries = [build_trie(t.requests) for t in trajs]
    seq = statistics.mean(t.sequence_tokens for t in trajs)
    trie = statistics.mean(len(x) for x in tries)
    exp = statistics.mean(x.request_tokens for x in tries)
    ref = statistics.mean(t.reference_tokens() for t in trajs)
    return {
        "data": name,
        "n": len(trajs),
        "sequence": seq,
        "trie": trie,
        "expanded": exp,
        "reference": ref,
        "expanded/trie": exp / trie,
        "reference/trie": ref / trie,
    }


LAYOUTS = ("trie (sdpa bool)", "trie (flex BlockMask)", "expanded")


def step_rows(name: str, spec: dict, base_case: dict, progress) -> list[dict]:
    cpu = base_case["device"] == "cpu"
    out = []
    for layout in LAYOUTS:
        rec = {"data": name, "layout": layout}
        for mode, backward in (("fwd_bwd", True), ("fwd", False)):
            if cpu and backward and "flex" in layout:  # torch's flex attention has no CPU backward
                rec[mode + "_s"] = rec[mode + "_mib"] = None
                continue
            progress(f"{name}: {layout}, {'forward+backward' if backward else 'forward'}")
            res = spawn_case({**base_case, "data": spec, "layout": layout, "backward": backward})
            rec.update(rows=res["rows"], tokens=res["tokens"])
            rec[mode + "_s"], rec[mode + "_mib"] = res["seconds"], res["peak"] / 2**20
        out.append(rec)
    base = out[0]
    for r in out:
        for k in ("fwd_bwd_s", "fwd_bwd_mib", "fwd_s", "fwd_mib"):
            r[k + "_x"] = None if r[k] is None or not base[k] else r[k] / base[k]
    return out


def _f(v, fmt="{:.2f}"):
    return "n/a" if v is None else fmt.format(v)


def markdown(tok_rows, step_rows_, meta: dict) -> str:
    lines = [
        SECTION,
        "",
        f"`python benchmarks/bench_trie.py {meta['args']}` on {meta['device']} ({meta['date']}), "
        f"model: the tiny Qwen3 (hidden 128, 2 layers), float32, torch {torch.__version__}.",
        "",
        "### Tokens processed per trajectory (mean)",
        "",
        "| data | trajectories | sequence | trie | expanded | reference | expanded / trie | reference / trie |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in tok_rows:
        lines.append(
            f"| {r['data']} | {r['n']} | {r['sequence']:.0f} | {r['trie']:.0f} | {r['expanded']:.0f} | "
            f"{r['reference']:.0f} | {r['expanded/trie']:.2f}x | {r['reference/trie']:.2f}x |"
        )
    lines += [
        "",
        "sequence: prompt + response once. trie: tokens of the flattened trie (threads 2..k twice: own "
        "branch + inside the joined context). expanded: sum of context + completion over the Requests. "
        "reference: the full sequence plus every thread after the first (the reference code's layout; "
        "about the trie's size, but it lets threads see siblings and shifts targets wrongly).",
        "",
        "### Step cost (one pass over the data, one row per forward)",
        "",
        "| data | layout | rows | tokens | fwd+bwd s | x | fwd+bwd peak MiB | x | fwd s | x | fwd peak MiB | x |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in step_rows_:
        lines.append(
            f"| {r['data']} | {r['layout']} | {r['rows']} | {r['tokens']} | {_f(r['fwd_bwd_s'])} | "
            f"{_f(r['fwd_bwd_s_x'])} | {_f(r['fwd_bwd_mib'], '{:.0f}')} | {_f(r['fwd_bwd_mib_x'])} | "
            f"{_f(r['fwd_s'])} | {_f(r['fwd_s_x'])} | {_f(r['fwd_mib'], '{:.0f}')} | {_f(r['fwd_mib_x'])} |"
        )
    lines += [
        "",
        "x: ratio to trie (sdpa bool) on the same data in the same run (lower is better). " + meta["notes"],
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace this benchmark's section of ``path`` (other benchmarks' sections stay), or append it."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    if SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        new = old[:start] + text.rstrip() + "\n" + (old[nxt:] if nxt >= 0 else "")
    else:
        new = old.rstrip() + "\n\n" + text.rstrip() + "\n"
    path.write_text(new)


def main(argv=None) -> int:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table
    from transformers import AutoTokenizer

    from threadweaver_verl.models.tiny import TinyModelConfig, build_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small sizes (about a minute on a CPU)")
    ap.add_argument("--count-sizes", default="8192,16384,32768", help="synthetic sizes for the token counts")
    ap.add_argument(
        "--time-sizes",
        default=None,
        help="synthetic sizes for step timing (default: 8192,16384,32768 on CUDA; 2048,4096 on a CPU)",
    )
    ap.add_argument("--mul-preset", default="4x4")
    ap.add_argument("--mul-n", type=int, default=8)
    ap.add_argument("--budget", type=int, default=1024, help="trie row token budget (multiplication rows)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per measurement (default: 1 on "
        "a CPU: on a shared machine a descheduled worker thread stalls every parallel op)",
    )
    ap.add_argument("--write-docs", action="store_true", help="write the section into docs/benchmarks.md")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: one measurement in a fresh process
    args = ap.parse_args(argv)
    if args.case:
        import json

        print("RESULT " + json.dumps(run_case(json.loads(args.case))), flush=True)
        return 0
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    time_sizes = args.time_sizes or ("1024" if args.quick and cpu else "2048,4096" if cpu else "8192,16384,32768")
    time_sizes = [int(x) for x in time_sizes.split(",") if x]
    count_sizes = [int(x) for x in args.count_sizes.split(",") if x]
    repeats = args.repeats or (2 if cpu else 3)
    threads = args.threads or (1 if cpu else None)
    if args.quick:
        args.mul_n = min(args.mul_n, 4)
        count_sizes = count_sizes[:1]
    console = Console()
    torch.manual_seed(0)
    t_start = time.monotonic()
    load_start = os.getloadavg()[0]

    model_dir = build_tiny_model(
        Path(tempfile.mkdtemp(prefix="bench_trie_")) / "tiny", TinyModelConfig(max_position_embeddings=1 << 16)
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    fmt = TokenFormat.from_tokenizer(tok, limits=Limits(max_threads_per_block=16, max_depth=2))
    console.print("[bold]token counts[/bold]")
    mul = multiplication(tok, fmt, args.mul_n, args.mul_preset)
    tok_rows = [token_row(f"multiplication {args.mul_preset}", mul)]
    for size in count_sizes:
        tok_rows.append(
            token_row(f"synthetic ~{size // 1024}k", synthetic(tok, fmt, size, 2 if args.quick else 3, seed=size))
        )
    specs = [
        (
            f"multiplication {args.mul_preset}",
            {"kind": "multiplication", "n": args.mul_n, "preset": args.mul_preset},
            args.budget,
        )
    ]
    specs += [
        (f"synthetic ~{size // 1024}k", {"kind": "synthetic", "size": size, "n": 1, "seed": size + 1}, size)
        for size in time_sizes
    ]
    total = sum(5 if cpu else 6 for _ in specs)
    steps = []
    with Progress(console=console) as bar:
        task = bar.add_task("step cost", total=total)

        def progress(text):
            bar.update(task, advance=1, description=text)

        for name, spec, budget in specs:
            base_case = {
                "device": device.type,
                "model": str(model_dir),
                "budget": budget,
                "repeats": repeats,
                "threads": threads,
            }
            steps += step_rows(name, spec, base_case, progress)

    table = Table(title="tokens processed per trajectory (mean)")
    for c in ("data", "n", "sequence", "trie", "expanded", "reference", "expanded/trie", "reference/trie"):
        table.add_column(c, justify="right")
    for r in tok_rows:
        table.add_row(
            r["data"],
            str(r["n"]),
            *(f"{r[k]:.0f}" for k in ("sequence", "trie", "expanded", "reference")),
            f"{r['expanded/trie']:.2f}x",
            f"{r['reference/trie']:.2f}x",
        )
    console.print(table)
    table = Table(title=f"step cost on {device.type} (x = ratio to trie sdpa)")
    for c in ("data", "layout", "tokens", "fwd+bwd s", "x", "peak MiB", "x", "fwd s", "x", "fwd MiB", "x"):
        table.add_column(c, justify="right")
    for r in steps:
        table.add_row(
            r["data"],
            r["layout"],
            str(r["tokens"]),
            _f(r["fwd_bwd_s"]),
            _f(r["fwd_bwd_s_x"]),
            _f(r["fwd_bwd_mib"], "{:.0f}"),
            _f(r["fwd_bwd_mib_x"]),
            _f(r["fwd_s"]),
            _f(r["fwd_s_x"]),
            _f(r["fwd_mib"], "{:.0f}"),
            _f(r["fwd_mib_x"]),
        )
    console.print(table)
    elapsed = time.monotonic() - t_start
    console.print(f"done in {elapsed:.0f} s")

    if args.write_docs:
        if cpu:
            dev = f"a CPU ({os.cpu_count()} cores, shared; {threads} torch thread(s) per measurement)"
            notes = (
                "On a CPU torch's flex attention has no backward (flex fwd+bwd: n/a); its forward runs "
                "inductor's C++ kernel, so CPU flex timings say little about the GPU (Triton) kernels. "
                "Step timings used synthetic sizes "
                + ", ".join(f"~{s // 1024}k" for s in time_sizes)
                + " (the 8k-32k sizes are counted above but too slow to time on 2 shared cores). "
                f"Each measurement runs in a fresh process: a warm-up pass, then {repeats} timed passes (the "
                "fastest is reported); "
                "CPU peak memory = peak RSS (VmHWM, reset after the warm-up) minus the RSS before the "
                "timed passes. The machine was shared with other jobs (load average "
                f"{load_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end), so CPU timings are "
                "noisy. Not yet run on a GPU."
            )
        else:
            dev = torch.cuda.get_device_name(device)
            notes = (
                f"Each measurement runs in a fresh process: a warm-up pass, then {repeats} timed passes (the "
                "fastest is reported); peak memory = torch.cuda.max_memory_allocated over the passes minus "
                "the memory allocated before them."
            )
        meta = {
            "args": " ".join(sys.argv[1:] if argv is None else argv),
            "device": dev,
            "date": time.strftime("%Y-%m-%d"),
            "notes": notes + f" Whole run: {elapsed:.0f} s.",
        }
        path = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        write_section(path, markdown(tok_rows, steps, meta))
        console.print(f"wrote the '{SECTION[3:]}' section of {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
