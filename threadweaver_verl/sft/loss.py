"""Trie loss: the target of each token is predicted at its trie PARENT's position.

In a depth-first row the previous flat position is the parent only inside a
chain: where the DFS backtracks, the next flat token is a sibling (or a cousin),
not a child. So logits are gathered at ``parent`` indices, never shifted by one.
A plain sequence (an expanded Request row) is the chain ``parent[i] = i - 1``,
so the same functions serve both layouts.
"""

from __future__ import annotations

import torch


def parent_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, parent: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-prob of each token under the logits at its parent: ``[B, N]`` float32, 0 at roots.

    ``logits`` is ``[B, N, V]`` (any float dtype), ``input_ids``/``parent`` are ``[B, N]``
    with row-local parent indices (``-1`` for a root). Memory beyond the logits:
    ``O(B * N)`` (a log-sum-exp per position and one gathered logit per token), plus a
    float32 copy of the logits while the log-sum-exp runs when they are not float32.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or parent.shape != input_ids.shape:
        raise ValueError(
            f"shapes: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
            f"parent {tuple(parent.shape)}; expected [B, N, V], [B, N], [B, N]"
        )
    bsz, n, v = logits.shape
    flat = logits.reshape(bsz * n, v)
    if temperature != 1.0:
        flat = flat / temperature
    has_parent = parent >= 0
    rows = (parent.clamp(min=0) + torch.arange(bsz, device=parent.device)[:, None] * n).reshape(-1)
    lse = torch.logsumexp(flat.float(), dim=-1)  # [B*N]
    target = flat[rows, input_ids.reshape(-1)].float()  # logit of token j at its parent's row
    lp = target - lse[rows]
    return torch.where(has_parent, lp.view(bsz, n), torch.zeros((), dtype=lp.dtype, device=lp.device))


def token_nll(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-token negative log-likelihood, 0 where there is no loss."""
    return torch.where(loss_mask.bool(), -logprobs, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))


def mean_nll(
    logprobs: torch.Tensor, loss_mask: torch.Tensor, num_tokens: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Mean NLL over the loss tokens (or sum / ``num_tokens`` when given, e.g. across accumulation steps)."""
    total = token_nll(logprobs, loss_mask).sum()
    denom = loss_mask.sum() if num_tokens is None else num_tokens
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.dtype).clamp(min=1)
    else:
        denom = max(int(denom), 1)
    return total / denom
