"""Ancestor-only attention masks for trie rows.

Token ``i`` may attend to token ``j`` iff ``j`` is an ancestor of ``i`` in the
trie, or ``i`` itself: ``tin[j] <= tin[i] <= tout[j]`` (entry/exit times from
:mod:`.trie`). Two forms, both exact; never a dense float (additive) mask:

* :func:`bool_mask` - a 4-D bool ``[B, 1, N, N]`` for SDPA (``attn_implementation="sdpa"``).
  Memory: ``B * N * N`` bytes (1 byte per bool) plus SDPA's own working set;
  N = 4k: 16 MiB per row, 8k: 64 MiB, 32k: 1 GiB. For short rows.
  Beyond the mask, SDPA may materialise N x N scores per head (its CPU and math
  paths do). (The reference code builds a dense N x N float mask: 6.4 GB at 40k tokens.)
* :func:`block_mask` - a flex-attention :class:`~torch.nn.attention.flex_attention.BlockMask`
  (``attn_implementation="flex_attention"``). Built WITHOUT evaluating the N x N
  grid: block tiles (``block_size``, default 128) are classified as empty /
  partial / full from the subtree intervals in ``O(N + (N/bs)^2)`` time, and the
  element rule is a ``mask_mod`` reading ``tin``/``tout``. Memory:
  ``16 * B * N`` bytes for the intervals + ``16 * B * (N/bs)^2`` bytes of block
  indices (partial and full, kv- and q-major, int32): N = 32k: ~1.5 MiB per row. For long rows.
  Flex attention is fast only compiled (HF's integration compiles it); torch has no
  flex backward on a CPU, so training with it needs a GPU.

:func:`block_mask` needs rows in depth-first layout, ``tin[i] == i`` within the row
(what :mod:`.trie` produces; padding at the end of a row gets ``tout[i] = i``: it
sees itself only). :func:`bool_mask` takes any entry/exit times.
"""

from __future__ import annotations

import torch

DEFAULT_BLOCK_SIZE = 128


def _check(tin: torch.Tensor, tout: torch.Tensor) -> None:
    if tin.shape != tout.shape or tin.dim() != 2:
        raise ValueError(f"tin and tout must both be [batch, seq]; got {tuple(tin.shape)} and {tuple(tout.shape)}")


def bool_mask(tin: torch.Tensor, tout: torch.Tensor) -> torch.Tensor:
    """``[B, 1, N, N]`` bool, True where query ``i`` may attend to key ``j`` (SDPA convention)."""
    _check(tin, tout)
    q = tin[:, :, None]  # [B, N, 1]
    return ((tin[:, None, :] <= q) & (q <= tout[:, None, :])).unsqueeze(1)


def ancestor_mask_mod(tin: torch.Tensor, tout: torch.Tensor):
    """The element rule as a flex-attention ``mask_mod(b, h, q, kv)``."""

    def mask_mod(b, h, q_idx, kv_idx):
        tq = tin[b, q_idx]
        return (tin[b, kv_idx] <= tq) & (tq <= tout[b, kv_idx])

    return mask_mod


def block_mask(tin: torch.Tensor, tout: torch.Tensor, block_size: int = DEFAULT_BLOCK_SIZE):
    """A flex-attention BlockMask for rows whose ``tin`` is the row index (depth-first layout).

    Tile ``(qb, kb)`` (query block, key block) is
    * full     iff ``kb < qb`` and every key ``j`` in ``kb`` has ``tout[j] >= `` the last query of ``qb``;
    * partial  iff not full and (``kb == qb`` or (``kb < qb`` and some ``tout[j] >=`` the first query));
    * empty otherwise (keys after the query block are never ancestors).
    """
    from torch.nn.attention.flex_attention import BlockMask

    _check(tin, tout)
    bsz, n = tin.shape
    expected = torch.arange(n, device=tin.device).expand(bsz, n)
    if not torch.equal(tin, expected):
        raise ValueError(
            "block_mask needs rows in depth-first layout (tin[i] == i); build rows with "
            "threadweaver_verl.sft.trie and pad at the end"
        )
    nb = (n + block_size - 1) // block_size
    pad = nb * block_size - n
    big = torch.iinfo(torch.int64).max
    # tout per key block: max over real keys, min over real keys (padding keys neutral)
    t_max = torch.nn.functional.pad(tout, (0, pad), value=-1).view(bsz, nb, block_size).amax(-1)  # [B, nb]
    t_min = torch.nn.functional.pad(tout, (0, pad), value=big).view(bsz, nb, block_size).amin(-1)
    blocks = torch.arange(nb, device=tin.device)
    q_first = blocks * block_size  # [nb]
    q_last = torch.clamp(q_first + block_size - 1, max=n - 1)
    qb = blocks[:, None]  # rows: query blocks
    kb = blocks[None, :]  # cols: key blocks
    below = kb < qb  # [nb, nb]
    complete = (q_first + block_size <= n)[:, None]  # a ragged last query block stays partial (as torch does)
    full = (below & complete)[None] & (t_min[:, None, :] >= q_last[None, :, None])  # [B, nb, nb]
    any_ = (kb == qb)[None] | (below[None] & (t_max[:, None, :] >= q_first[None, :, None]))
    partial = any_ & ~full

    def to_indices(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num = sel.sum(-1, dtype=torch.int32)  # [B, nb]
        # selected key blocks first, in increasing order (stable sort on "not selected")
        idx = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
        return num[:, None], idx[:, None]  # add the head dimension

    kv_num, kv_idx = to_indices(partial)
    full_num, full_idx = to_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=block_size,
        mask_mod=ancestor_mask_mod(tin, tout),
        seq_lengths=(n, n),
    )


def bool_mask_bytes(n: int, batch: int = 1) -> int:
    """Bytes of :func:`bool_mask` for ``batch`` rows of length ``n``."""
    return batch * n * n


def block_mask_bytes(n: int, batch: int = 1, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Approximate bytes of :func:`block_mask` (intervals + kv and q block indices, partial and full)."""
    nb = (n + block_size - 1) // block_size
    return batch * (2 * 8 * n + 4 * (4 * nb * nb + 4 * nb))
