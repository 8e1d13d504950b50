"""The trie engine for verl's SFT trainer: verl's FSDP LM engine with trie inputs.

verl's FSDP engine packs rows without padding and runs flash-attention varlen
with ``attention_mask=None`` and flat next-token labels (``torch.roll``). A trie
row needs the ancestor-only mask and targets at trie parents, so
:class:`TrieFSDPEngineWithLMHead` overrides the input and output preparation
for rows that carry ``trie_parent``/``trie_tout`` (from
:class:`~threadweaver_verl.integrations.verl.sft_dataset.TrieSFTDataset`); any other row goes
through verl's own code unchanged. No verl file is edited.

Selecting it (opt-in; the plugin registers it under its own vendor key)::

    VERL_ENGINE_VENDOR=threadweaver_trie torchrun ... -m verl.trainer.sft_trainer \\
        data.custom_cls.path=pkg://threadweaver_verl.integrations.verl.sft_dataset \\
        data.custom_cls.name=TrieSFTDataset data.max_length=8192 \\
        model.override_config.attn_implementation=sdpa   # or flex_attention for long rows

Mask kind follows the model's attention implementation: ``sdpa`` -> 4-D bool
``[B, 1, N, N]`` over right-padded rows; ``flex_attention`` -> one BlockMask over
all rows of the micro-batch concatenated (no padding). ``flash_attention_2``
(verl's default) takes no mask and is refused with that fix in the message.
Not supported with trie rows (refused loudly): Ulysses sequence parallelism,
fused kernels, entropy / sum-pi-squared outputs, distillation.

verl's SFT loss (``sft_loss``) expects ``log_probs[i]`` to score the token whose
loss flag is ``loss_mask[i + 1]`` (it rolls the mask by one). The engine keeps
that contract: ``log_probs[i]`` holds the parent-gathered log-prob of token
``i + 1`` - whatever its parent is - so verl's loss and metrics run unchanged.

Trains on CUDA/NPU, and on CPU in verl's CPU mode (``integrations/verl/cpu``, ``VERL_PLATFORM=cpu``).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from threadweaver_verl.sft.loss import parent_logprobs
from threadweaver_verl.sft.masks import block_mask, bool_mask

TRIE_VENDOR = "threadweaver_trie"
VENDOR_ENV = "VERL_ENGINE_VENDOR"
BACKENDS = ("fsdp", "fsdp2")
DEVICES = ("cuda", "npu", "cpu")  # cpu: verl's CPU mode (integrations/verl/cpu)
TRIE_KEYS = ("trie_parent", "trie_tout")
_MASK_OF_IMPL = {"sdpa": "sdpa", "flex_attention": "flex"}


class TrieEngineError(RuntimeError):
    pass


def _non_tensor(micro_batch: Any, key: str, default: Any) -> Any:
    from verl.utils import tensordict_utils as tu

    return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)


def _scalar_temperature(micro_batch: Any) -> float:
    t = micro_batch["temperature"] if "temperature" in micro_batch.keys() else 1.0
    if isinstance(t, torch.Tensor):
        vals = t.detach().flatten().unique()
        if vals.numel() != 1:
            raise TrieEngineError("trie rows take one temperature for the whole micro-batch")
        return float(vals.item())
    return float(t)


def trie_model_inputs(micro_batch: Any, mask: str, pad_token_id: int = 0) -> tuple[dict, dict]:
    """Model kwargs and output args for a micro-batch of trie rows (nested, no padding).

    ``mask="sdpa"``: right-padded ``[B, N]`` inputs and a 4-D bool mask.
    ``mask="flex"``: all rows concatenated into ``[1, total]`` and one BlockMask (the
    intervals of different rows are disjoint, so the mask is block-diagonal).
    """
    input_ids = micro_batch["input_ids"]
    if not getattr(input_ids, "is_nested", False):
        raise TrieEngineError("trie rows must come unpadded (data.pad_mode=no_padding)")
    offsets = input_ids.offsets().to(torch.long)
    lengths = offsets.diff()
    ids = input_ids.values()
    pos = micro_batch["position_ids"].values()
    parent = micro_batch["trie_parent"].values()
    tout = micro_batch["trie_tout"].values()
    if pos.dim() != 1:
        raise TrieEngineError("trie rows take 1-D position ids (text models only)")
    device = ids.device
    row_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths.to(device))
    local = torch.arange(ids.numel(), device=device) - offsets.to(device)[row_of]
    out_args: dict[str, Any] = {
        "trie": True,
        "mask": mask,
        "cu_seqlens": offsets,
        "temperature": _scalar_temperature(micro_batch),
    }
    if mask == "flex":
        start = offsets.to(device)[row_of]
        g_parent = torch.where(parent >= 0, parent + start, parent)
        g_tout = tout + start
        tin = torch.arange(ids.numel(), device=device)[None]
        out_args.update(input_ids=ids[None], parent=g_parent[None])
        model_inputs = {
            "input_ids": ids[None],
            "position_ids": pos[None],
            "attention_mask": block_mask(tin, g_tout[None]),
        }
        return model_inputs, out_args
    if mask != "sdpa":
        raise TrieEngineError(f"unknown mask kind {mask!r}")
    bsz, n = lengths.numel(), int(lengths.max().item())
    grid = torch.arange(n, device=device).expand(bsz, n)

    def padded(values: torch.Tensor, fill: int) -> torch.Tensor:
        out = torch.full((bsz, n), fill, dtype=values.dtype, device=device)
        out[row_of, local] = values
        return out

    p_ids = padded(ids, pad_token_id)
    p_parent = padded(parent, -1)
    p_tout = padded(tout, -1)
    p_tout = torch.where(p_tout >= 0, p_tout, grid)  # padding sees itself only
    valid = padded(torch.ones_like(ids, dtype=torch.bool), False)
    out_args.update(input_ids=p_ids, parent=p_parent, valid=valid)
    model_inputs = {
        "input_ids": p_ids,
        "position_ids": padded(pos, 0),
        "attention_mask": bool_mask(grid.contiguous(), p_tout),
    }
    return model_inputs, out_args


def trie_log_probs(logits: torch.Tensor, out_args: dict) -> torch.Tensor:
    """Flat (unpadded, rows in order) log-prob of every token at its trie parent; 0 at roots."""
    lp = parent_logprobs(logits, out_args["input_ids"], out_args["parent"], out_args["temperature"])
    return lp[out_args["valid"]] if out_args["mask"] == "sdpa" else lp[0]


def verl_log_probs(token_logprobs: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """verl's layout: nested ``log_probs[i]`` = log-prob of token ``i + 1`` (see module doc)."""
    return torch.nested.nested_tensor_from_jagged(
        torch.roll(token_logprobs, shifts=-1, dims=0), cu_seqlens.to(token_logprobs.device)
    )


def _refuse_unsupported(micro_batch: Any) -> None:
    for key in ("use_fused_kernels", "calculate_entropy", "calculate_sum_pi_squared", "distillation_use_topk"):
        if _non_tensor(micro_batch, key, False):
            raise TrieEngineError(f"{key}=True is not supported with trie rows")


def _build_engine_class():
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    class TrieFSDPEngineWithLMHead(FSDPEngineWithLMHead):
        """verl's FSDP LM engine; trie rows get the ancestor mask and parent-gathered targets."""

        def _trie_mask_kind(self) -> str:
            module = self.module
            for _ in range(3):  # FSDP1 wraps the HF model; FSDP2 keeps it
                if hasattr(module, "config"):
                    break
                module = getattr(module, "module", module)
            impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
            if impl not in _MASK_OF_IMPL:
                raise TrieEngineError(
                    f"trie rows need an attention implementation that takes a mask, the model uses {impl!r}: set "
                    "model.override_config.attn_implementation=sdpa (short rows) or flex_attention (long rows)"
                )
            return _MASK_OF_IMPL[impl]

        def prepare_model_inputs(self, micro_batch):
            if not all(k in micro_batch.keys() for k in TRIE_KEYS):
                return super().prepare_model_inputs(micro_batch)
            _refuse_unsupported(micro_batch)
            if getattr(self, "use_ulysses_sp", False):
                raise TrieEngineError("Ulysses sequence parallelism is not supported with trie rows")
            pad_id = _non_tensor(micro_batch, "pad_token_id", 0) or 0
            return trie_model_inputs(micro_batch, self._trie_mask_kind(), int(pad_id))

        def prepare_model_outputs(self, output, output_args, micro_batch, logits_processor_func):
            if not output_args.get("trie"):
                return super().prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
            _refuse_unsupported(micro_batch)
            logits = output.logits
            if hasattr(logits, "full_tensor"):  # DTensor under tensor parallelism
                logits = logits.full_tensor()
            return {"log_probs": verl_log_probs(trie_log_probs(logits, output_args), output_args["cu_seqlens"])}

    TrieFSDPEngineWithLMHead.__module__ = __name__
    TrieFSDPEngineWithLMHead.__qualname__ = "TrieFSDPEngineWithLMHead"
    return TrieFSDPEngineWithLMHead


_ENGINE_CLASS = None


def engine_class():
    """The engine class (built on first use: importing verl's FSDP engine is heavy)."""
    global _ENGINE_CLASS
    if _ENGINE_CLASS is None:
        _ENGINE_CLASS = _build_engine_class()
    return _ENGINE_CLASS


def register() -> None:
    """Register the engine under vendor ``threadweaver_trie`` for fsdp/fsdp2 on cuda/npu/cpu. Idempotent."""
    from verl.workers.engine.base import EngineRegistry

    from threadweaver_verl.integrations.verl.plugin import Kind, verl_private_registry

    cls = engine_class()
    table = verl_private_registry(Kind.ENGINE).get("language_model", {})
    keys = [(b, (d, TRIE_VENDOR)) for b in BACKENDS for d in DEVICES]
    present = [table.get(b, {}).get(k) for b, k in keys]
    if all(p is not None for p in present):
        for p in present:
            if f"{p.__module__}.{p.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
                raise TrieEngineError(
                    f"another engine ({p.__module__}.{p.__qualname__}) is registered under vendor {TRIE_VENDOR!r}"
                )
        return
    if any(p is not None for p in present):
        raise TrieEngineError(f"vendor {TRIE_VENDOR!r} is partly registered already: {present}")
    EngineRegistry.register(
        model_type="language_model", backend=list(BACKENDS), device=list(DEVICES), vendor=TRIE_VENDOR
    )(cls)


def check_trie_engine_selected() -> None:
    """Raise unless verl will build the trie engine for language models in this process."""
    from threadweaver_verl.integrations.verl.plugin import require

    require("engine:trie")
    if os.environ.get(VENDOR_ENV) != TRIE_VENDOR:
        raise TrieEngineError(
            f"TrieSFTDataset rows need the trie engine; set {VENDOR_ENV}={TRIE_VENDOR} in the trainer's environment "
            "(the stock engine would train on the flattened trie with a causal mask: leaking and wrong targets). "
            "For stock verl use ExpandedSFTDataset instead."
        )
