"""The fork/join controller's own CPU time per request.

An engine that answers at once from finished trajectories (``tests/_replay_engine.py``) drives the
controller through realistic ones: the demo task's (multiplication 3x3, one block of 3 threads, ~250
response tokens) and RL-sized synthetic ones (~2k and ~8k tokens, 1-3 blocks of 2-8 threads, some
nested). The engine costs one dict lookup per request, so what is timed is the controller. It is timed
in CPU seconds (``time.process_time``), which other load on the machine barely changes; every run also
checks that the controller issued exactly ``split_requests``' requests.

With ``baseline=REV`` the controller module of git revision REV (read with ``git show`` into a module of
its own; the rest of the package is this tree's) runs the same trajectories in the same process,
alternating with this tree's in every repeat, and the table gives the ratio baseline / this tree.
``profile=1`` adds this tree's cProfile on the largest case.

    python benchmarks/bench_controller.py [repeats=5] [baseline=REV] [profile=1]
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import os
import pstats
import random
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the controller tests replay trajectories too

from _replay_engine import ReplayEngine  # noqa: E402


def cases(tok, fmt) -> dict[str, dict[str, tuple[list[int], list[int]]]]:
    """Case name -> routing key -> (prompt ids, response ids) of each trajectory."""
    from threadweaver_verl.data.chat import PromptStyle, prompt_ids, response_ids
    from threadweaver_verl.sft.synthetic import TrajectoryShape, random_trajectory
    from threadweaver_verl.tasks.multiplication import Difficulty, make_samples

    def prompt(question: str) -> list[int]:
        return prompt_ids(tok, PromptStyle().messages(question))

    out = {
        "demo task (multiplication 3x3)": {
            f"mul-{i}": (prompt(s.problem.question), response_ids(fmt, s.parallel))
            for i, s in enumerate(make_samples(Difficulty.parse("3x3"), 16, seed=0, split="test"))
        }
    }
    for tokens, n in ((2048, 4), (8192, 2)):
        rng = random.Random(tokens)
        trajectories = {}
        for i in range(n):
            shape = TrajectoryShape(tokens=tokens, blocks=rng.randint(1, 3), max_threads=8, nested_prob=0.3)
            trajectories[f"synthetic-{i}"] = (
                prompt(f"synthetic {i}"),
                response_ids(fmt, random_trajectory(rng, shape)),
            )
        out[f"synthetic ~{tokens // 1024}k tokens"] = trajectories
    return out


def controller_at(rev: str) -> types.ModuleType:
    """The controller module of git revision ``rev``, loaded under a name of its own."""
    path = "threadweaver_verl/rollout/controller.py"
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    name = f"controller_at_{rev.replace('-', '_').replace('.', '_')}"
    module = types.ModuleType(name)
    module.__file__ = f"{rev}:{path}"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def controller_for(module, fmt, trajectories):
    longest = max(len(r) for _, r in trajectories.values())
    config = module.ControllerConfig(
        max_response_tokens=16 * longest, max_thread_tokens=longest, max_requests=4096, max_blocks=64
    )
    return module.ForkJoinController(fmt, config)


async def cpu_seconds(controller, engine, trajectories, check, fmt) -> tuple[float, int]:
    """CPU seconds the controller spends on all ``trajectories``, and the requests it made."""
    spent, requests = 0.0, 0
    for key, (prompt, response) in trajectories.items():
        t0 = time.process_time()
        result = await controller.run(engine, prompt, routing_key=key)
        spent += time.process_time() - t0
        requests += result.num_engine_calls
        if check:
            assert result.response_ids == list(response), "the controller did not rebuild the trajectory"
            assert result.requests == engine.requests[key], "requests differ from split_requests"
    return spent, requests


def main(argv: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from threadweaver_verl.format import TokenFormat
    from threadweaver_verl.models.tiny import build_tokenizer
    from threadweaver_verl.rollout import controller as current

    args = dict(a.split("=", 1) for a in argv)
    repeats = int(args.get("repeats", 5))
    console = Console(width=200)
    console.print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    tok = build_tokenizer()
    fmt = TokenFormat.from_tokenizer(tok)
    controllers = {"this tree": current}
    if "baseline" in args:
        controllers[f"baseline {args['baseline']}"] = controller_at(args["baseline"])
    table = Table(title=f"controller CPU time, replayed trajectories, engine answers at once (median of {repeats})")
    for col in ("case", "trajectories", "mean T", "requests / trajectory"):
        table.add_column(col, justify="right")
    for name in controllers:
        table.add_column(f"{name}: us / request", justify="right")
        table.add_column(f"{name}: ms / trajectory", justify="right")
    if len(controllers) == 2:
        table.add_column("baseline / this tree", justify="right")
    all_cases = cases(tok, fmt)
    for case, trajectories in all_cases.items():
        engine = ReplayEngine(fmt, trajectories)
        ctrls = {name: controller_for(module, fmt, trajectories) for name, module in controllers.items()}
        for ctrl in ctrls.values():  # warm up, and check every controller rebuilds every trajectory exactly
            asyncio.run(cpu_seconds(ctrl, engine, trajectories, True, fmt))
        spent: dict[str, list[float]] = {name: [] for name in ctrls}
        requests = 0
        for _ in range(repeats):
            for name, ctrl in ctrls.items():
                seconds, requests = asyncio.run(cpu_seconds(ctrl, engine, trajectories, False, fmt))
                spent[name].append(seconds)
        medians = {name: statistics.median(v) for name, v in spent.items()}
        row = [
            case,
            str(len(trajectories)),
            f"{statistics.fmean(len(r) for _, r in trajectories.values()):.0f}",
            f"{requests / len(trajectories):.1f}",
        ]
        for name in ctrls:
            row += [f"{medians[name] / requests * 1e6:.0f}", f"{medians[name] / len(trajectories) * 1e3:.2f}"]
        if len(ctrls) == 2:
            base = next(name for name in ctrls if name != "this tree")
            row.append(f"{medians[base] / medians['this tree']:.2f}x")
        table.add_row(*row)
    console.print(table)
    console.print(f"load average at end: {os.getloadavg()[0]:.2f}")
    if args.get("profile") == "1":
        case, trajectories = list(all_cases.items())[-1]
        engine = ReplayEngine(fmt, trajectories)
        ctrl = controller_for(current, fmt, trajectories)
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        asyncio.run(cpu_seconds(ctrl, engine, trajectories, False, fmt))
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        console.print(f"cProfile of this tree's controller on {case} (by own time):\n{text.getvalue()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
