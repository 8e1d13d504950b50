"""P-GRPO: the group-relative advantage of ThreadWeaver, registered with verl as
``algorithm.adv_estimator=p_grpo``.

Semantics (``method.md`` §4):

- One scalar reward per TRAJECTORY. Under verl 0.9.1's V1 multi-output
  contract a trajectory (one session of one prompt) becomes several rows keyed
  ``{uid}_{session}_{index}``; every row carries a copy of the reward.
- The group is the trajectories of one prompt (one ``uid``), not its rows: a
  trajectory that produced 9 rows weighs exactly as much as one that produced 1.
  Each trajectory's reward is read from its final row (highest ``index``), as
  verl's own V1 ``grpo`` path does.
- ``A = r - mean(group)``; dividing by the group's std is off by default
  (:attr:`PGRPOConfig.norm_adv_by_std`). A group of one trajectory gets ``A = 0``
  (``r - mean`` of itself; verl's ``grpo`` gives such a group ``A = r``).
- Optional: ``A = 0`` exactly when every reward in the group is equal
  (:attr:`PGRPOConfig.zero_equal_groups`).
- The scalar is broadcast to every row of the trajectory, times that row's
  response mask.
- verl's batch padding (``upsample_batch_to_divisible_size``) adds rows keyed
  ``pad<hex>_{i}_0`` under a uid of their own, with zero reward and mask: they
  form their own group and never enter a real prompt's mean.

How it reaches the rows' trajectories: a registered verl estimator receives only
``token_level_rewards``, ``response_mask``, ``config`` and ``index`` (the uid),
not the session. The ThreadWeaver trainer (:mod:`threadweaver_verl.integrations.verl.trainer`,
``trainer.v1.trainer_mode=threadweaver``) runs verl's own ``_compute_advantage``
unchanged inside :func:`row_keys`, which hands this estimator the batch's row
keys in row order; the estimator checks them against ``index`` and fails loudly
when they are missing (estimator selected without the trainer).

The equivalent stock setting: ``algorithm.adv_estimator=grpo
algorithm.norm_adv_by_std_in_grpo=False`` on verl's V1 trainer gives the same
advantages for every group of two or more trajectories (V1 special-cases the
name ``grpo``: it scores each session's final row and broadcasts). P-GRPO adds
the singleton rule, the equal-group switch and std division as an explicit
setting whose default is off. verl's ``algorithm.norm_adv_by_std_in_grpo``
(default True) is not ignored: the verl estimator refuses a value that disagrees
with ``algorithm.p_grpo.norm_adv_by_std``, so the preset sets both false.

Settings live under ``algorithm.p_grpo`` (``+algorithm.p_grpo.norm_adv_by_std=true``
on a command line; see ``configs/``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PGRPOConfig:
    """``algorithm.p_grpo``: settings of the P-GRPO advantage."""

    norm_adv_by_std: bool = False
    """Divide ``r - mean`` by the group's (unbiased) std + ``epsilon``. Off: mean-centred only, as ThreadWeaver
    trains (with std division the small acceleration bonus dominates when all answers are right). Under verl,
    ``algorithm.norm_adv_by_std_in_grpo`` must have the same value (a conflict is an error)."""
    zero_equal_groups: bool = False
    """Give every trajectory of a group ``A = 0`` exactly when all its rewards are equal (mean-centring already
    gives 0 up to float rounding; with std division it avoids dividing rounding noise by ``epsilon``)."""
    epsilon: float = 1e-6
    """Added to the std before dividing (used only with ``norm_adv_by_std``)."""


class PGRPOError(RuntimeError):
    """P-GRPO cannot compute advantages for this batch (names the cause and the fix)."""


def parse_row_key(key: str) -> tuple[str, str, int]:
    """``{uid}_{session}_{index}`` -> (uid, session, index); a clear error otherwise."""
    parts = str(key).rsplit("_", 2)
    if len(parts) != 3 or not parts[2].lstrip("-").isdigit():
        raise PGRPOError(f"row key {key!r} is not verl V1's '{{uid}}_{{session}}_{{index}}'")
    return parts[0], parts[1], int(parts[2])


def final_rows(keys: Sequence[str], is_padding: Sequence[bool] | None = None) -> dict[tuple[str, str], int]:
    """Each session's final row: ``(uid, session) -> position`` of its highest output index, in order of
    first appearance; rows with ``is_padding`` set are left out. The one place a session's final row is
    picked (its reward for the advantage, its stats for the trainer's metrics)."""
    best: dict[tuple[str, str], tuple[int, int]] = {}  # (uid, session) -> (index, row)
    for row, key in enumerate(keys):
        if is_padding is not None and is_padding[row]:
            continue
        uid, session, index = parse_row_key(key)
        if (uid, session) not in best or index > best[(uid, session)][0]:
            best[(uid, session)] = (index, row)
    return {session: row for session, (_, row) in best.items()}


def trajectory_advantages(scores: torch.Tensor, keys: Sequence[str], cfg: PGRPOConfig | None = None) -> torch.Tensor:
    """Per-row scalar advantages for rows ``keys`` whose rewards are ``scores`` (one float per row).

    Each session's reward is its final row's score (:func:`final_rows`); the group of a session is its uid.
    """
    cfg = cfg or PGRPOConfig()
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if len(keys) != scores.numel():
        raise PGRPOError(f"{len(keys)} row keys for {scores.numel()} rows")
    final = final_rows(keys)
    row_session = [parse_row_key(key)[:2] for key in keys]
    group: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for sess in final:
        group[sess[0]].append(sess)
    session_adv: dict[tuple[str, str], torch.Tensor] = {}
    with torch.no_grad():
        for sessions in group.values():
            r = torch.stack([scores[final[s]] for s in sessions])
            if len(sessions) == 1 or (cfg.zero_equal_groups and bool((r == r[0]).all())):
                adv = torch.zeros_like(r)
            else:
                adv = r - r.mean()
                if cfg.norm_adv_by_std:
                    adv = adv / (r.std() + cfg.epsilon)
            for s, a in zip(sessions, adv):
                session_adv[s] = a
        return torch.stack([session_adv[s] for s in row_session]) if row_session else scores.new_zeros(0)
