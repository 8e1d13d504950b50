"""The token trie of a trajectory, flattened depth first.

A trajectory's :class:`~threadweaver_verl.format.Request` s (the (context,
completion) calls fork/join inference issues, from
:func:`~threadweaver_verl.format.split_requests`) are inserted as token paths
``context + completion`` into one trie. Shared prefixes (the prompt, the context
every thread of a block forks from, thread 1 inside the joined context) are
stored once. Completion tokens carry the loss.

After a join the next Request re-reads the joined text as one ordinary causal
context, so threads 2..k of a block occur twice: as their own branch (forked
from the outline list, with loss) and inside the joined context (after the
earlier threads, no loss). Thread 1's branch IS a prefix of the joined context,
so it occurs once. Both copies fall out of inserting the Requests' paths; both
are needed for training to see exactly what inference computed.

The flattened trie is a depth-first (pre-order) sequence with, per token:

* ``input_ids``      - the token,
* ``position_ids``   - its depth (= its position in its Request, what the engine used),
* ``parent``         - index of its parent, ``-1`` for a root,
* ``loss_mask``      - True on completion tokens (except the trailing ``Request.forced``
  ids a controller inserted without sampling them),
* ``tin``/``tout``   - entry/exit times: ``tin[i] == i`` (pre-order index) and ``tout[i]``
  is the last index of i's subtree; so ``j`` is an ancestor-or-self of ``i`` iff
  ``tin[j] <= tin[i] <= tout[j]``: the attention rule (:mod:`.masks`).

Loss collisions: a token gets loss if ANY Request has it in its completion, and
it gets it once (the mask is boolean). Two Requests of one split trajectory
cannot both complete the same node (every context ends in a fork header or a
``</Parallel>`` that no completion contains). Several trajectories inserted into
ONE trie (e.g. samples of one prompt, sharing the prompt) can: an identical
(context, next token) pair is then trained once, not once per trajectory.
Training rows keep each trajectory in its own trie (:func:`pack`), so there the
loss equals the expanded layout's; :attr:`Trie.loss_collisions` counts them.

Several tries pack into one row (:func:`pack`), block-diagonally: indices of a
later trie are offset, its intervals are disjoint from the earlier ones, so the
ancestor rule never crosses trajectories. Each trie keeps its own positions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from threadweaver_verl.format import Request


class TrieError(ValueError):
    """Requests or tries that cannot be turned into a training row."""


@dataclass(frozen=True, eq=False)
class Trie:
    """A flattened token trie (or several packed block-diagonally: a row)."""

    input_ids: np.ndarray  # int64 [N]
    position_ids: np.ndarray  # int64 [N], depth of the token
    parent: np.ndarray  # int64 [N], -1 for roots
    loss_mask: np.ndarray  # bool [N]
    tout: np.ndarray  # int64 [N], last pre-order index of the subtree
    starts: tuple[int, ...] = (0,)  # start index of each packed trie (one for a single trie)
    num_requests: int = 0  # Requests inserted (summed over packed tries)
    request_tokens: int = 0  # sum of len(context + completion) over those Requests
    loss_collisions: int = 0  # completion tokens claimed by more than one Request (counted once)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tin(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def index_of(self, ids: Sequence[int], segment: int = 0) -> list[int]:
        """Row indices of the tokens along the path ``ids`` in packed trie ``segment`` (raises if absent)."""
        children = {(int(p), int(tok)): i for i, (p, tok) in enumerate(zip(self.parent, self.input_ids)) if p >= 0}
        ends = list(self.starts[1:]) + [len(self)]
        start, end = self.starts[segment], ends[segment]
        roots = {int(self.input_ids[i]): i for i in range(start, end) if self.parent[i] < 0}
        out: list[int] = []
        for tok in ids:
            nxt = roots.get(int(tok)) if not out else children.get((out[-1], int(tok)))
            if nxt is None:
                raise KeyError(f"path absent from the trie at step {len(out)} (token {tok})")
            out.append(nxt)
        return out


def build_trie(requests: Iterable[Request]) -> Trie:
    """Insert each Request's ``context + completion`` path; flatten depth first.

    Children keep insertion order, so the first Request's path is laid out first
    and a trajectory with no blocks flattens to its plain token sequence.
    """
    tokens: list[int] = []
    parents: list[int] = []
    loss: list[bool] = []
    kids: list[dict[int, int]] = []  # node -> {token: child}
    roots: dict[int, int] = {}
    n_req = req_tokens = collisions = 0
    for r in requests:
        ctx_len = len(r.context_ids)
        ids = r.ids
        loss_end = len(ids) - int(r.forced)  # ids the controller inserted (not sampled) carry no loss
        if not r.completion_ids:
            continue  # nothing to learn; its context is a prefix of another path anyway
        if ctx_len == 0:
            raise TrieError(
                "a Request with an empty context: its first completion token has no token to be "
                "predicted from. Give every trajectory a non-empty prompt (the chat template's tokens)."
            )
        n_req += 1
        req_tokens += len(ids)
        cur = -1
        children = roots
        for k, tok in enumerate(ids):
            tok = int(tok)
            nxt = children.get(tok)
            if nxt is None:
                nxt = len(tokens)
                tokens.append(tok)
                parents.append(cur)
                loss.append(False)
                kids.append({})
                children[tok] = nxt
            if ctx_len <= k < loss_end:
                if loss[nxt]:
                    collisions += 1
                loss[nxt] = True
            cur = nxt
            children = kids[nxt]
    n = len(tokens)
    order = np.empty(n, dtype=np.int64)  # pre-order index -> node
    new_index = np.empty(n, dtype=np.int64)
    depth = np.empty(n, dtype=np.int64)
    tout = np.empty(n, dtype=np.int64)
    pos = 0
    # iterative DFS; a negative entry closes a node (sets its exit time)
    stack: list[tuple[int, int]] = [(node, 0) for node in reversed(list(roots.values()))]
    while stack:
        node, d = stack.pop()
        if node < 0:
            tout[new_index[~node]] = pos - 1
            continue
        order[pos] = node
        new_index[node] = pos
        depth[pos] = d
        pos += 1
        stack.append((~node, 0))
        for child in reversed(list(kids[node].values())):
            stack.append((child, d + 1))
    tok_arr = np.asarray(tokens, dtype=np.int64)
    par_arr = np.asarray(parents, dtype=np.int64)
    loss_arr = np.asarray(loss, dtype=bool)
    old_parent = par_arr[order] if n else par_arr
    parent = np.where(old_parent >= 0, new_index[np.maximum(old_parent, 0)], -1) if n else old_parent
    return Trie(
        input_ids=tok_arr[order] if n else tok_arr,
        position_ids=depth,
        parent=parent.astype(np.int64),
        loss_mask=loss_arr[order] if n else loss_arr,
        tout=tout,
        num_requests=n_req,
        request_tokens=req_tokens,
        loss_collisions=collisions,
    )


def concat(tries: Sequence[Trie]) -> Trie:
    """Several tries in one row, block-diagonal (each keeps its own positions)."""
    if not tries:
        raise TrieError("nothing to concatenate")
    offsets = np.cumsum([0] + [len(t) for t in tries[:-1]])
    starts: list[int] = []
    for off, t in zip(offsets, tries):
        starts += [int(off) + s for s in t.starts]
    return Trie(
        input_ids=np.concatenate([t.input_ids for t in tries]),
        position_ids=np.concatenate([t.position_ids for t in tries]),
        parent=np.concatenate([np.where(t.parent >= 0, t.parent + off, -1) for off, t in zip(offsets, tries)]),
        loss_mask=np.concatenate([t.loss_mask for t in tries]),
        tout=np.concatenate([t.tout + off for off, t in zip(offsets, tries)]),
        starts=tuple(starts),
        num_requests=sum(t.num_requests for t in tries),
        request_tokens=sum(t.request_tokens for t in tries),
        loss_collisions=sum(t.loss_collisions for t in tries),
    )


@dataclass
class _Bin:
    members: list[int] = field(default_factory=list)
    size: int = 0


def pack(tries: Sequence[Trie], max_tokens: int) -> list[tuple[Trie, list[int]]]:
    """Pack tries into rows of at most ``max_tokens`` tokens (first fit, input order kept
    within a row). Returns (row, indices of the tries in it). A trie longer than the
    budget is an error: raise the budget (or shorten the data)."""
    if max_tokens <= 0:
        raise TrieError(f"max_tokens must be positive, got {max_tokens}")
    bins: list[_Bin] = []
    for i, t in enumerate(tries):
        if len(t) > max_tokens:
            raise TrieError(
                f"trajectory {i} needs {len(t)} trie tokens, more than the row budget max_tokens="
                f"{max_tokens}; raise the budget (data.max_length / max_tokens) or drop long samples"
            )
        for b in bins:
            if b.size + len(t) <= max_tokens:
                b.members.append(i)
                b.size += len(t)
                break
        else:
            bins.append(_Bin([i], len(t)))
    return [(concat([tries[i] for i in b.members]), b.members) for b in bins]


def chain(request: Request) -> Trie:
    """One Request alone as a (chain) trie: the expanded layout's row."""
    return build_trie([request])
