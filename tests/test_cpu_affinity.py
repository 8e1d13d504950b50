"""vLLM's busy-waiting engine core kept off the API server's core (rollout/cpu_affinity.py): the plan as a
pure function, and on a real vLLM server (CPU build) the cores its processes end up on."""

from __future__ import annotations

import os

import pytest

from threadweaver_verl.rollout.cpu_affinity import ENGINE_CORE_TITLE, WORKER_TITLE, CorePlan, plan_cores


def cores(*ids: int) -> frozenset[int]:
    return frozenset(ids)


def test_two_cores_engine_core_beside_the_worker_api_server_alone():
    # vLLM's `auto` binding on 2 cores: the worker on core 0, core 1 reserved
    assert plan_cores(cores(0, 1), cores(0)) == CorePlan(cores(0), cores(0), cores(1))


def test_two_cores_left_engine_core_and_api_server_each_get_their_own():
    plan = plan_cores(cores(*range(8)), cores(*range(5)))
    assert plan == CorePlan(cores(*range(5)), cores(5), cores(6, 7))
    assert not plan.engine_core & plan.api_server and not plan.api_server & plan.worker


@pytest.mark.parametrize(
    ("all_cores", "worker"),
    [
        (cores(0, 1), cores(0, 1)),  # the worker is not bound to a subset (GPU builds, nobind)
        (cores(0, 1), cores()),  # nothing known about the worker
        (cores(0), cores(0)),  # one core: nothing to separate
    ],
)
def test_nothing_to_separate_changes_nothing(all_cores, worker):
    assert plan_cores(all_cores, worker) is None


def _cores_of(pid: int) -> set[int]:
    """The union of the cores every thread of ``pid`` may run on."""
    return {c for tid in os.listdir(f"/proc/{pid}/task") for c in os.sched_getaffinity(int(tid))}


@pytest.mark.slow
def test_real_vllm_server_processes_end_up_on_the_planned_cores(vllm_server):
    import psutil

    root = psutil.Process(vllm_server.process.pid)
    titles = {p.pid: p.name() for p in root.children(recursive=True)}
    (worker,) = [pid for pid, t in titles.items() if t.startswith(WORKER_TITLE)]
    (engine,) = [pid for pid, t in titles.items() if t.startswith(ENGINE_CORE_TITLE)]
    plan = vllm_server.core_plan
    all_cores = _cores_of(root.pid) | _cores_of(engine) | _cores_of(worker)  # what the three may use together
    expected = plan_cores(frozenset(all_cores), frozenset(_cores_of(worker)))
    if os.cpu_count() == 2:  # this project's machines: vLLM binds its worker to core 0 of 2
        assert plan == CorePlan(cores(0), cores(0), cores(1))
    assert plan == expected
    if plan is not None:
        # every thread of the engine core and of the API server, not just the main ones
        assert _cores_of(engine) == plan.engine_core
        assert _cores_of(root.pid) == plan.api_server
        assert not _cores_of(engine) & _cores_of(root.pid)
