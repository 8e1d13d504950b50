"""Ancestor-only masks: the 4-D bool mask and the flex BlockMask (built without an N x N grid)."""

from __future__ import annotations

import random

import pytest
import torch
from _sft_common import requests_of

from threadweaver_verl.sft.batch import TrieCollator, row_features
from threadweaver_verl.sft.masks import ancestor_mask_mod, block_mask, block_mask_bytes, bool_mask, bool_mask_bytes
from threadweaver_verl.sft.synthetic import TrajectoryShape, random_trajectory
from threadweaver_verl.sft.trie import build_trie, pack


def random_rows(tok, fmt, seed: int, n_traj: int = 3, budget: int = 2000):
    rng = random.Random(seed)
    tries = [
        build_trie(
            requests_of(
                tok, fmt, random_trajectory(rng, TrajectoryShape(tokens=60, blocks=2, max_threads=3, nested_prob=0.6))
            )
        )
        for _ in range(n_traj)
    ]
    return TrieCollator()([row_features(r) for r, _ in pack(tries, budget)] + [row_features(tries[0])])


def brute_force(batch) -> torch.Tensor:
    """Ancestor-or-self sets from parent pointers alone (a parent precedes its child)."""
    bsz, n = batch["input_ids"].shape
    out = torch.zeros(bsz, 1, n, n, dtype=torch.bool)
    for b in range(bsz):
        par = batch["trie_parent"][b].tolist()
        rows = out[b, 0]
        for i in range(n):
            if par[i] >= 0:
                assert par[i] < i
                rows[i] = rows[par[i]]
            rows[i, i] = True
    return out


def test_bool_mask_is_the_ancestor_relation_with_padding_seeing_itself(tiny_tokenizer, tiny_fmt):
    batch = random_rows(tiny_tokenizer, tiny_fmt, 0)
    m = bool_mask(batch["trie_tin"], batch["trie_tout"])
    assert m.dtype == torch.bool and m.shape[1] == 1
    assert torch.equal(m, brute_force(batch))


@pytest.mark.parametrize("block", [16, 32])
def test_block_mask_tiles_match_torch_exhaustive_construction(tiny_tokenizer, tiny_fmt, block):
    from torch.nn.attention.flex_attention import create_block_mask

    batch = random_rows(tiny_tokenizer, tiny_fmt, 1)
    tin, tout = batch["trie_tin"], batch["trie_tout"]
    ours = block_mask(tin, tout, block)
    bsz, n = tin.shape
    ref = create_block_mask(ancestor_mask_mod(tin, tout), bsz, None, n, n, device="cpu", BLOCK_SIZE=block)
    assert torch.equal(ours.to_dense(), ref.to_dense())  # every non-empty tile, full or partial
    for b in range(bsz):  # and the same tiles classified as full
        for q in range(ours.full_kv_num_blocks.shape[-1]):
            k1 = int(ours.full_kv_num_blocks[b, 0, q])
            k2 = int(ref.full_kv_num_blocks[b, 0, q])
            mine = sorted(ours.full_kv_indices[b, 0, q, :k1].tolist())
            assert mine == sorted(ref.full_kv_indices[b, 0, q, :k2].tolist())


def test_flex_attention_with_the_block_mask_equals_sdpa_with_the_bool_mask(tiny_tokenizer, tiny_fmt):
    from torch.nn.attention.flex_attention import flex_attention

    batch = random_rows(tiny_tokenizer, tiny_fmt, 2)
    tin, tout = batch["trie_tin"], batch["trie_tout"]
    bsz, n = tin.shape
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(bsz, 2, n, 16, generator=g) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask(tin, tout))
    out = flex_attention(q, k, v, block_mask=block_mask(tin, tout, 32))
    assert (out - ref).abs().max().item() <= 1e-5


def test_block_mask_refuses_rows_not_in_depth_first_layout():
    tin = torch.tensor([[1, 0, 2]])
    with pytest.raises(ValueError, match="depth-first"):
        block_mask(tin, torch.tensor([[2, 2, 2]]))


def test_memory_formulas():
    assert bool_mask_bytes(32768) == 2**30  # 1 GiB per 32k row: the reason flex exists
    assert block_mask_bytes(32768) < 2 * 2**20  # under 2 MiB
