"""vLLM's busy-waiting engine core kept off the API server's core (rollout/cpu_affinity.py): the plan as a
pure function, and on a real vLLM server (CPU build) the cores its processes end up on."""

from __future__ import annotations

import pytest

from threadweaver_verl.rollout.cpu_affinity import CorePlan, plan_cores


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


@pytest.mark.slow
def test_real_vllm_server_processes_end_up_on_the_planned_cores(vllm_server):
    from _vllm_cores import assert_engine_core_separated

    assert vllm_server.core_plan == assert_engine_core_separated(vllm_server.process.pid)
