"""Where a running vLLM server's processes may run, checked against rollout/cpu_affinity.py's plan (shared by
the test of our own vLLM launcher and the test of verl's vLLM replica in the CPU mode)."""

from __future__ import annotations

import os

from threadweaver_verl.rollout.cpu_affinity import CorePlan, cores_of, plan_cores, vllm_processes


def assert_engine_core_separated(api_server_pid: int) -> CorePlan | None:
    """Every thread of the engine core and of the API server is on the cores the plan gives it, and the two
    share no core. Returns the plan (None: nothing to separate on this machine)."""
    found = vllm_processes(api_server_pid)
    assert found is not None, f"no single vLLM worker and engine core under pid {api_server_pid}"
    worker, engine = found
    # what the three processes may use together (the plan moved the engine core and the API server within it)
    all_cores = cores_of(api_server_pid) | cores_of(engine) | cores_of(worker)
    plan = plan_cores(all_cores, cores_of(worker))
    if os.cpu_count() == 2:  # this project's machines: vLLM binds its worker to core 0 of 2
        assert plan == CorePlan(frozenset({0}), frozenset({0}), frozenset({1}))
    if plan is not None:
        assert cores_of(engine) == plan.engine_core
        assert cores_of(api_server_pid) == plan.api_server
        assert not cores_of(engine) & cores_of(api_server_pid)
    return plan
