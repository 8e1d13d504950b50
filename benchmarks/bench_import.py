"""What the threadweaver plugin costs every ``import verl``: time, modules, printed lines, environment.

    PYTHONPATH=$PWD python benchmarks/bench_import.py [--runs 5] [--json summary.json]

verl imports every ``verl.plugins`` entry point on ``import verl``, in the driver and in every Ray worker.
Two modes, each ``import verl`` in a fresh interpreter, alternating (the first mode of a round alternates too):

* ``plugin``   - verl loads its plugins as usual (``VERL_USE_EXTERNAL_PLUGINS=auto``);
* ``baseline`` - verl's own switch leaves out ours and only ours (``VERL_USE_EXTERNAL_PLUGINS`` set to the
  other installed plugins' names, or ``none`` when there are none).

Per mode: the median (and range) of the time ``import verl`` took inside the process over ``--runs`` runs, as
wall time and as the process's CPU time (steadier on a busy machine). Then the difference and ratio of the
medians (plugin against baseline, same run), the modules only the plugin
mode loaded, the lines only it printed, and the environment variables only it set. The load average is
printed before and after: the machine may be shared, so compare the two modes of one run, never two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

PLUGIN = "threadweaver"
PLUGIN_MODULE = "threadweaver_verl.integrations.verl.plugin"
MARK = "@@bench_import@@"
CLOCKS = {"seconds": "wall", "cpu_seconds": "CPU"}
CHILD = f"""
import json, os, sys, time
env = dict(os.environ)
start, cpu_start = time.perf_counter(), time.process_time()
import verl
seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
changed = sorted(k for k, v in os.environ.items() if env.get(k) != v)
result = {{"seconds": seconds, "cpu_seconds": cpu_seconds, "modules": sorted(sys.modules), "env": changed}}
print({MARK!r} + json.dumps(result), flush=True)
"""


@dataclass
class ImportRun:
    mode: str
    seconds: float  # wall
    cpu_seconds: float  # CPU time of the importing process (less sensitive to a busy machine than wall time)
    modules: list[str]
    env: list[str]  # environment variables the import set or changed
    output: list[str]  # lines printed (stdout and stderr)


def plugin_policies() -> dict[str, str]:
    """mode -> VERL_USE_EXTERNAL_PLUGINS: both modes load every other installed plugin."""
    names = {ep.name for ep in entry_points(group="verl.plugins")}
    if PLUGIN not in names:
        raise SystemExit(f"the {PLUGIN!r} verl.plugins entry point is not installed: `pip install -e .` first")
    others = sorted(names - {PLUGIN})
    return {"plugin": "auto", "baseline": ",".join(others) or "none"}


def import_verl(mode: str, policy: str, timeout_s: float) -> ImportRun:
    env = {**os.environ, "VERL_USE_EXTERNAL_PLUGINS": policy}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    lines = (out.stdout + out.stderr).splitlines()
    result = [line for line in lines if line.startswith(MARK)]
    if out.returncode != 0 or len(result) != 1:
        raise SystemExit(f"`import verl` ({mode}) failed with exit code {out.returncode}:\n" + "\n".join(lines[-40:]))
    data = json.loads(result[0][len(MARK) :])
    run = ImportRun(
        mode,
        data["seconds"],
        data["cpu_seconds"],
        data["modules"],
        data["env"],
        [x for x in lines if not x.startswith(MARK)],
    )
    loaded = PLUGIN_MODULE in run.modules
    if loaded != (mode == "plugin"):
        raise SystemExit(f"{mode} mode: the plugin was {'' if loaded else 'not '}loaded by `import verl`")
    return run


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min; {os.cpu_count()} CPUs)"


def only_in(runs: list[ImportRun], others: list[ImportRun], field: str) -> list[str]:
    """Items of ``field`` seen in some run of ``runs`` and in no run of ``others``."""
    seen = {x for r in others for x in getattr(r, field)}
    return sorted({x for r in runs for x in getattr(r, field)} - seen)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh-process imports per mode (default 5)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds allowed for one import")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args()
    policies = plugin_policies()
    print(f"load average before: {load_average()}")
    print(f"VERL_USE_EXTERNAL_PLUGINS: {policies}")
    runs: dict[str, list[ImportRun]] = {mode: [] for mode in policies}
    for i in range(args.runs):
        order = list(policies) if i % 2 == 0 else list(reversed(policies))
        for mode in order:
            run = import_verl(mode, policies[mode], args.timeout)
            runs[mode].append(run)
            print(
                f"  round {i + 1}: {mode:<8} {run.seconds:7.2f} s wall {run.cpu_seconds:7.2f} s CPU "
                f"{len(run.modules)} modules",
                flush=True,
            )
    print(f"load average after:  {load_average()}")

    medians: dict[str, dict[str, float]] = {}
    print(f"\n{'mode':<8} {'clock':<5} {'median s':>9} {'min s':>7} {'max s':>7}")
    for clock in ("seconds", "cpu_seconds"):
        medians[clock] = {}
        for mode, rs in runs.items():
            times = [getattr(r, clock) for r in rs]
            medians[clock][mode] = statistics.median(times)
            print(f"{mode:<8} {CLOCKS[clock]:<5} {medians[clock][mode]:9.2f} {min(times):7.2f} {max(times):7.2f}")
        diff = medians[clock]["plugin"] - medians[clock]["baseline"]
        ratio = medians[clock]["plugin"] / medians[clock]["baseline"]
        print(f"{'':<14} {CLOCKS[clock]}: plugin - baseline {diff:+.2f} s (ratio {ratio:.3f}), medians of {args.runs}")
    print(f"modules: {len(runs['plugin'][0].modules)} with the plugin, {len(runs['baseline'][0].modules)} without")
    extra = {field: only_in(runs["plugin"], runs["baseline"], field) for field in ("modules", "output", "env")}
    print(f"modules only with the plugin ({len(extra['modules'])}): {', '.join(extra['modules']) or '-'}")
    print(f"lines printed only with the plugin ({len(extra['output'])}):")
    for line in extra["output"]:
        print(f"  | {line}")
    print(f"environment variables set only with the plugin: {', '.join(extra['env']) or '-'}")
    if args.json:
        summary = {
            "runs": args.runs,
            "median_s": medians,
            "only_with_plugin": extra,
            "runs_s": {mode: [(r.seconds, r.cpu_seconds) for r in rs] for mode, rs in runs.items()},
        }
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
