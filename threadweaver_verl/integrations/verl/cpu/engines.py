"""verl's FSDP engines on the ``cpu`` device.

verl 0.9.1 registers its FSDP language-model and value-model engines for ``cuda``/``npu`` only
(``verl/workers/engine/fsdp/transformer_impl.py``), so ``EngineRegistry.get_engine_cls`` finds
nothing on the CPU platform. They run on CPU unchanged (FSDP2 over gloo); the subclasses here
only refuse flash-attention, which has no CPU kernel, with the fix in the message.

Imported (and registered) right after verl imports its FSDP engine module, not
before: that module is heavy and most of verl's processes never build an engine.
"""

from __future__ import annotations

from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

from threadweaver_verl.integrations.verl.cpu.errors import CPUModeError

DEVICE = "cpu"

BACKENDS = ("fsdp", "fsdp2")
DEFAULT_ATTN = "flash_attention_2"  # verl's default (verl/workers/config/model.py)


def check_attention(model_config) -> None:
    """Refuse flash-attention (verl's default), which has no CPU kernel."""
    impl = (model_config.override_config or {}).get("attn_implementation", DEFAULT_ATTN)
    if str(impl).startswith("flash_attention"):
        raise CPUModeError(
            f"attn_implementation={impl!r} has no CPU kernel. Set "
            "actor_rollout_ref.model.override_config.attn_implementation=sdpa (the CPU preset "
            "configs/platform/cpu.yaml does; for verl's SFT trainer: +model.override_config.attn_implementation=sdpa)"
        )


class CPUFSDPEngineWithLMHead(FSDPEngineWithLMHead):
    """verl's FSDP language-model engine, on CPU."""

    def __init__(self, model_config, *args, **kwargs):
        check_attention(model_config)
        super().__init__(model_config, *args, **kwargs)


class CPUFSDPEngineWithValueHead(FSDPEngineWithValueHead):
    """verl's FSDP value-model engine, on CPU."""

    def __init__(self, model_config, *args, **kwargs):
        check_attention(model_config)
        super().__init__(model_config, *args, **kwargs)


ENGINES = {"language_model": CPUFSDPEngineWithLMHead, "value_model": CPUFSDPEngineWithValueHead}


def register() -> None:
    """Register the engines for device ``cpu`` (idempotent; loud when another class holds the key)."""
    for model_type, cls in ENGINES.items():
        table = EngineRegistry._engines.get(model_type, {})
        present = [table.get(b, {}).get(DEVICE) for b in BACKENDS]
        if all(p is cls for p in present):
            continue
        if any(p is not None and p is not cls for p in present):
            raise CPUModeError(f"another {model_type} engine is registered for device {DEVICE!r}: {present}")
        EngineRegistry.register(model_type=model_type, backend=list(BACKENDS), device=DEVICE)(cls)
