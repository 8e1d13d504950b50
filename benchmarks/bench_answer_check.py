"""Cost of bounding math-verify in a worker process (threadweaver_verl.rl.correctness) against calling
math-verify in-process without any bound, measured in the same run on the same answers.

    python benchmarks/bench_answer_check.py [n=300]
"""

from __future__ import annotations

import logging
import random
import sys
import time


def answers(n: int) -> list[tuple[str, str]]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 99)
        kind = i % 3
        if kind == 0:
            out.append((f"{a + b}", f"{a + b if i % 2 else a + b + 1}"))
        elif kind == 1:
            out.append((f"\\frac{{{a}}}{{{b}}}", f"{a / b:.6f}"))
        else:
            out.append((f"{a}\\sqrt{{{b}}}", f"\\sqrt{{{a * a * b}}}"))
    return out


def main(argv: list[str]) -> int:
    from math_verify import parse, verify
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from threadweaver_verl.rl.correctness import CorrectnessConfig, check_answer, verifier_counters

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    n = int(dict(a.split("=", 1) for a in argv).get("n", 300))
    pairs = answers(n)
    cfg = CorrectnessConfig()
    check_answer("<think></think>\\boxed{1}", "1", cfg)  # start the worker outside the timing
    parse("\\boxed{1}", parsing_timeout=None)

    t0 = time.perf_counter()
    inproc = []
    for gold, pred in tqdm(pairs, desc="in-process math-verify (unbounded)"):
        g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        p = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
        inproc.append(bool(g and p and verify(g, p, timeout_seconds=None)))
    t_in = time.perf_counter() - t0

    t0 = time.perf_counter()
    bounded = []
    for gold, pred in tqdm(pairs, desc="bounded check_answer (worker process)"):
        bounded.append(check_answer(f"<think>x</think>\\boxed{{{pred}}}", gold, cfg).correct)
    t_out = time.perf_counter() - t0

    table = Table(title=f"answer checking, {n} answers")
    for col in ("path", "ms / answer", "ratio vs in-process", "correct"):
        table.add_column(col)
    table.add_row("in-process, unbounded", f"{1000 * t_in / n:.3f}", "1.00", str(sum(inproc)))
    table.add_row("worker process, bounded", f"{1000 * t_out / n:.3f}", f"{t_out / t_in:.2f}", str(sum(bounded)))
    Console().print(table)
    print("agreement:", sum(a == b for a, b in zip(inproc, bounded)), "/", n, "| counters:", verifier_counters())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
