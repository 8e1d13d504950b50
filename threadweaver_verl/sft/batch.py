"""Trie rows as tensors: row features, the collator, and one forward pass.

A row (one trie, several packed, or one Request chain) becomes the features
``input_ids``, ``position_ids``, ``loss_mask``, ``trie_parent`` and ``trie_tout``
(the same names in the verl datasets). The collator right-pads a list of rows
into ``[B, N]`` tensors plus ``trie_tin`` (``arange``); padding tokens have no
parent, no loss and see only themselves.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from threadweaver_verl.sft.loss import parent_logprobs
from threadweaver_verl.sft.masks import block_mask, bool_mask
from threadweaver_verl.sft.trie import Trie

ROW_KEYS = ("input_ids", "position_ids", "loss_mask", "trie_parent", "trie_tout")


class Attention(enum.StrEnum):
    """The attention of trie rows (``SFTConfig.attention``)."""

    AUTO = "auto"  # sdpa for rows shorter than flex_min_tokens (and always when training on a CPU), else flex
    SDPA = "sdpa"  # a 4-D bool mask: O(N^2) memory per row
    FLEX = "flex"  # torch's flex attention with a BlockMask (no CPU backward: GPU only for training)


def row_features(row: Trie) -> dict[str, torch.Tensor]:
    """The tensors of one row (1-D, length N)."""
    return {
        "input_ids": torch.as_tensor(row.input_ids, dtype=torch.long),
        "position_ids": torch.as_tensor(row.position_ids, dtype=torch.long),
        "loss_mask": torch.as_tensor(row.loss_mask, dtype=torch.long),
        "trie_parent": torch.as_tensor(row.parent, dtype=torch.long),
        "trie_tout": torch.as_tensor(row.tout, dtype=torch.long),
    }


@dataclass
class TrieCollator:
    """Right-pads rows into a batch: ``[B, N]`` tensors for :data:`ROW_KEYS` plus ``trie_tin``."""

    pad_token_id: int = 0

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("empty batch")
        n = max(int(len(r["input_ids"])) for r in rows)
        bsz = len(rows)
        idx = torch.arange(n).expand(bsz, n).clone()
        out = {
            "input_ids": torch.full((bsz, n), self.pad_token_id, dtype=torch.long),
            "position_ids": torch.zeros((bsz, n), dtype=torch.long),
            "loss_mask": torch.zeros((bsz, n), dtype=torch.long),
            "trie_parent": torch.full((bsz, n), -1, dtype=torch.long),
            "trie_tout": idx.clone(),  # padding: sees itself only
            "trie_tin": idx,
        }
        for b, r in enumerate(rows):
            k = int(len(r["input_ids"]))
            for key in ROW_KEYS:
                out[key][b, :k] = torch.as_tensor(r[key], dtype=torch.long)
        return out


def choose_attention(
    attention: str, seq_len: int, flex_min_tokens: int, device: torch.device | str = "cpu", needs_grad: bool = False
) -> str:
    """``auto`` -> ``sdpa`` (4-D bool mask) for rows shorter than ``flex_min_tokens``, else ``flex``.

    torch's flex attention has no CPU backward: on a CPU with gradients ``auto`` stays on
    ``sdpa`` and an explicit ``flex`` is refused (CPU flex is for forward passes only).
    """
    if attention not in tuple(Attention):
        raise ValueError(f"attention must be one of {[a.value for a in Attention]}, got {attention!r}")
    cpu_training = torch.device(device).type == "cpu" and needs_grad
    if attention == Attention.AUTO:
        return Attention.FLEX if seq_len >= flex_min_tokens and not cpu_training else Attention.SDPA
    if attention == Attention.FLEX and cpu_training:
        raise ValueError(
            "attention=flex cannot train on a CPU (torch's flex attention has no CPU backward); "
            "use attention=sdpa or auto on CPU, flex on a GPU"
        )
    return Attention(attention)


_HF_IMPL = {Attention.SDPA: "sdpa", Attention.FLEX: "flex_attention"}


@contextmanager
def attention_implementation(model: Any, attention: str) -> Iterator[None]:
    """Run ``model`` with the HF attention implementation matching the mask kind."""
    want = _HF_IMPL[attention]
    have = model.config._attn_implementation
    if have == want:
        yield
        return
    model.set_attn_implementation(want)
    try:
        yield
    finally:
        model.set_attn_implementation(have)


def attention_mask(batch: dict[str, torch.Tensor], attention: str, block_size: int = 128):
    """The ancestor-only mask of a collated batch in the form ``attention`` needs."""
    if attention == Attention.SDPA:
        return bool_mask(batch["trie_tin"], batch["trie_tout"])
    if attention == Attention.FLEX:
        return block_mask(batch["trie_tin"], batch["trie_tout"], block_size)
    raise ValueError(f"attention must be 'sdpa' or 'flex' here, got {attention!r}")


def forward_logprobs(
    model: Any, batch: dict[str, torch.Tensor], attention: str = Attention.AUTO, flex_min_tokens: int = 4096
) -> torch.Tensor:
    """One forward over a collated batch; ``[B, N]`` log-prob of each token at its trie parent."""
    device = next(model.parameters()).device
    kind = choose_attention(attention, batch["input_ids"].shape[1], flex_min_tokens, device, torch.is_grad_enabled())
    batch = {k: v.to(device) for k, v in batch.items()}
    with attention_implementation(model, kind):
        out = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            attention_mask=attention_mask(batch, kind),
            use_cache=False,
        )
    return parent_logprobs(out.logits, batch["input_ids"], batch["trie_parent"])
