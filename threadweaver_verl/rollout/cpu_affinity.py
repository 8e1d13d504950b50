"""Keep vLLM's busy-waiting engine core off the API server's core (CPU builds of vLLM).

A vLLM server on a CPU runs three processes: the API server (HTTP, request intake, detokenization), the
engine core (the scheduler) and a worker that runs the model on the cores ``VLLM_CPU_OMP_THREADS_BIND``
gives it (``auto``: all but one reserved core). The engine core and the worker hand each step over through
a shared-memory queue whose reader busy-waits (``sched_yield``) for up to a second after each message, so
the engine core holds a whole core for as long as requests are running. Left to the kernel, it shares the
reserved core with the API server, which then gets that core only between the spinner's time slices: with
many short requests in flight (fork/join's thread requests) requests waited seconds before the engine saw
them. Measured on 2 cores with the demo's models (``benchmarks/profile_forkjoin.py``, docs/benchmarks.md):
fork/join at 16 problems in flight went from 2.45 to 0.37 ms of wall time per generated token.

:func:`separate_engine_core` pins the engine core beside the worker (where its spinning only yields to the
worker) and the API server onto the cores left, or, where at least two cores are left, the engine core onto
one of them and the API server onto the others. It changes nothing when the worker is not bound to a subset
of the cores (GPU builds, ``VLLM_CPU_OMP_THREADS_BIND=nobind``) or when no core is left for the API server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# Process titles vLLM sets (as prefixes: the kernel keeps 15 characters of a title, psutil may give it whole).
WORKER_TITLE = "VLLM::Worker"
ENGINE_CORE_TITLE = "VLLM::EngineCor"


@dataclass(frozen=True)
class CorePlan:
    """Cores each vLLM process was pinned to (empty: left alone)."""

    worker: frozenset[int]
    engine_core: frozenset[int]
    api_server: frozenset[int]


def _pin(pid: int, cores: frozenset[int]) -> None:
    """Every thread of ``pid`` onto ``cores`` (threads started later inherit it from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except (ProcessLookupError, PermissionError):
            pass  # a thread that ended meanwhile; affinity of one's own processes is always allowed


def plan_cores(all_cores: frozenset[int], worker: frozenset[int]) -> CorePlan | None:
    """Where the engine core and the API server go, given the worker's cores (None: leave them alone)."""
    rest = all_cores - worker
    if not worker or not rest:  # nothing known about the worker, or it holds every core
        return None
    if len(rest) >= 2:
        engine = frozenset({min(rest)})
        return CorePlan(worker, engine, rest - engine)
    return CorePlan(worker, worker, rest)


def vllm_processes(api_server_pid: int) -> tuple[int, int] | None:
    """(worker pid, engine core pid) of the vLLM server whose API server is ``api_server_pid``, found by the
    titles vLLM gives its processes; None unless there is exactly one of each (e.g. tensor parallelism)."""
    import psutil  # a dependency of vLLM

    workers, engines = [], []
    for child in psutil.Process(api_server_pid).children(recursive=True):
        try:
            title = child.name()
        except psutil.Error:
            continue
        if title.startswith(WORKER_TITLE):
            workers.append(child.pid)
        elif title.startswith(ENGINE_CORE_TITLE):
            engines.append(child.pid)
    if len(workers) != 1 or len(engines) != 1:
        return None
    return workers[0], engines[0]


def cores_of(pid: int) -> frozenset[int]:
    """The cores any thread of ``pid`` may run on."""
    return frozenset(c for tid in os.listdir(f"/proc/{pid}/task") for c in os.sched_getaffinity(int(tid)))


def separate_engine_core(api_server_pid: int) -> CorePlan | None:
    """Apply :func:`plan_cores` to a running vLLM server's processes (see the module doc); returns the plan,
    or None when it changed nothing (not Linux, not one worker and one engine core, no CPU worker bound to a
    subset of the cores)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    found = vllm_processes(api_server_pid)
    if found is None:
        return None  # tensor parallelism, or another layout: not the case this handles
    worker, engine = found
    plan = plan_cores(frozenset(os.sched_getaffinity(api_server_pid)), frozenset(os.sched_getaffinity(worker)))
    if plan is None:
        return None
    _pin(engine, plan.engine_core)
    _pin(api_server_pid, plan.api_server)
    return plan
