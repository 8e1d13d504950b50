"""The ``p_grpo`` advantage estimator in verl's registry: the verl side of :mod:`threadweaver_verl.rl.advantage`.

verl passes an estimator the rows' rewards and uids but not their sessions; the ThreadWeaver trainer
(:mod:`threadweaver_verl.integrations.verl.trainer`) makes the row keys visible with :func:`row_keys`
around verl's own ``_compute_advantage``, and :func:`compute_p_grpo_advantage` turns them into
trajectory advantages with :func:`threadweaver_verl.rl.advantage.trajectory_advantages`.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from threadweaver_verl.config import ConfigError, read_section
from threadweaver_verl.rl.advantage import PGRPOConfig, PGRPOError, parse_row_key, trajectory_advantages

ESTIMATOR_NAME = "p_grpo"

_ROW_KEYS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("p_grpo_row_keys", default=None)


@contextlib.contextmanager
def row_keys(keys: Sequence[str]) -> Iterator[None]:
    """Make the batch's row keys (``{uid}_{session}_{index}``, in row order) visible to the estimator."""
    token = _ROW_KEYS.set(tuple(str(k) for k in keys))
    try:
        yield
    finally:
        _ROW_KEYS.reset(token)


def _setting(config: Any, name: str) -> Any:
    """``config.<name>`` of verl's ``algorithm`` section (a DictConfig, a dataclass or a dict), None if absent."""
    if config is None:
        return None
    getter = getattr(config, "get", None)
    return getter(name, None) if getter else getattr(config, name, None)


def read_config(config: Any) -> PGRPOConfig:
    """The :class:`PGRPOConfig` under ``config.p_grpo`` (``config`` is verl's ``algorithm`` section).

    verl's own ``algorithm.norm_adv_by_std_in_grpo`` must agree with ``algorithm.p_grpo.norm_adv_by_std``
    when it is set: p_grpo never ignores it silently, a conflict is an error naming both.
    """
    try:
        cfg = read_section(PGRPOConfig, _setting(config, "p_grpo"), "algorithm.p_grpo")
    except ConfigError as e:
        raise PGRPOError(str(e)) from e
    verl_std = _setting(config, "norm_adv_by_std_in_grpo")
    if verl_std is not None and bool(verl_std) != cfg.norm_adv_by_std:
        raise PGRPOError(
            f"algorithm.norm_adv_by_std_in_grpo={bool(verl_std)} conflicts with "
            f"algorithm.p_grpo.norm_adv_by_std={cfg.norm_adv_by_std}: set both false for ThreadWeaver's "
            "mean-centred advantages (configs/threadweaver/pgrpo.yaml does; verl's default is true) "
            "or both true to divide by the group's std"
        )
    return cfg


def compute_p_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **_: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl estimator entry point: (advantages, returns), both ``A[row] * response_mask``."""
    keys = _ROW_KEYS.get()
    if keys is None:
        raise PGRPOError(
            "algorithm.adv_estimator=p_grpo needs each row's trajectory, which verl does not pass to an "
            "estimator: select the ThreadWeaver trainer (trainer.v1.trainer_mode=threadweaver), or use "
            "adv_estimator=grpo with algorithm.norm_adv_by_std_in_grpo=False on the stock trainer"
        )
    rows = token_level_rewards.shape[0]
    if len(keys) != rows:
        raise PGRPOError(
            f"p_grpo got {rows} rows but {len(keys)} row keys: the batch was reordered or filtered "
            "between the trainer and the estimator"
        )
    if index is not None:
        for i, key in enumerate(keys):
            if parse_row_key(key)[0] != str(index[i]):
                raise PGRPOError(
                    f"row {i}: key {key!r} does not belong to uid {index[i]!r}: rows and keys are out of order"
                )
    cfg = read_config(config)
    adv = trajectory_advantages(token_level_rewards.sum(dim=-1), keys, cfg).to(token_level_rewards.dtype)
    adv = adv.unsqueeze(-1) * response_mask.to(token_level_rewards.dtype)
    return adv, adv


def register() -> None:
    """Register ``p_grpo`` with verl's estimator registry (idempotent; loud when the name is taken)."""
    from verl.trainer.ppo import core_algos

    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR_NAME) is compute_p_grpo_advantage:
        return
    core_algos.register_adv_est(ESTIMATOR_NAME)(compute_p_grpo_advantage)
