"""The ThreadWeaver trainer: verl 0.9.1's V1 trainer plus what P-GRPO needs.

Selected by config only, through verl's trainer registry::

    trainer.v1.trainer_mode=threadweaver                  # = verl's "sync" trainer
    trainer.v1.trainer_mode=threadweaver_colocate_async   # = verl's "colocate_async"
    trainer.v1.trainer_mode=threadweaver_separate_async   # = verl's "separate_async"

Each subclass changes two things and inherits everything else:

1. ``_compute_advantage`` runs verl's own method unchanged, inside
   :func:`threadweaver_verl.integrations.verl.advantage.row_keys`, so the ``p_grpo`` estimator
   sees each row's ``{uid}_{session}_{index}`` key (verl passes an estimator only
   the uid). Other estimators run exactly as in stock verl.
   It also logs ``threadweaver/advantage_spread/max`` (0 when every row of a trajectory got the
   trajectory's advantage).
2. ``_compute_metrics`` adds the rollout's fork/join statistics of the step's
   trajectories (from each session's final row): ``threadweaver/speedup`` (T/L),
   ``threadweaver/parallel_ratio``, ``threadweaver/threads_per_block``, ...

verl compares ``trainer_mode`` with ``"sync"`` in several places (replay buffer
choice, refill policy, checkpointing). The subclasses therefore set
``self.trainer_mode`` back to their base mode before verl builds the replay
buffer (``PPOTrainer.__init__`` calls ``_build_replay_buffer`` right after reading
the mode), and read ``trainer.v1.<base mode>`` settings such as
``parameter_sync_step``. (verl's rollout-skip utility still reads
``trainer.v1.<trainer_mode>.parameter_sync_step`` from the config: it sees 1.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from verl.trainer.ppo.v1 import PPOTrainerColocateAsync, PPOTrainerSeparateAsync, PPOTrainerSync
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer

from threadweaver_verl.integrations.verl.advantage import ESTIMATOR_NAME, read_config, row_keys
from threadweaver_verl.rl.advantage import final_rows, parse_row_key
from threadweaver_verl.rl.reward import STATS_KEY  # the agent loop's per-trajectory stats in the final row

METRIC_KEYS = (
    "speedup",
    "parallel_ratio",
    "total_tokens",
    "critical_path",
    "num_blocks",
    "num_threads",
    "num_requests",
    "format_ok",
    "wall_time_s",  # the trajectory's latency: from its first request to its answer (the controller's clock)
)


def trajectory_metrics(stats: Sequence[dict[str, Any] | None]) -> dict[str, float]:
    """Mean/max/min of the fork/join statistics over trajectories (``None`` entries: not a ThreadWeaver row)."""
    rows = [s for s in stats if isinstance(s, dict)]
    out: dict[str, float] = {}
    if not rows:
        return out
    series: dict[str, list[float]] = {k: [float(s[k]) for s in rows if s.get(k) is not None] for k in METRIC_KEYS}
    tpb = [float(n) for s in rows for n in (s.get("threads_per_block") or [])]
    if tpb:
        series["threads_per_block"] = tpb
    for name, values in series.items():
        if values:
            out[f"{STATS_KEY}/{name}/mean"] = sum(values) / len(values)
            out[f"{STATS_KEY}/{name}/max"] = max(values)
            out[f"{STATS_KEY}/{name}/min"] = min(values)
    return out


def advantage_spread(keys: Sequence[str], advantages: Sequence[Any], masks: Sequence[Any]) -> dict[str, float]:
    """Max over trajectories of (max - min) of the advantages at trained tokens of all its rows."""
    lo: dict[tuple[str, str], float] = {}
    hi: dict[tuple[str, str], float] = {}
    for key, adv, mask in zip(keys, advantages, masks):
        values = adv[mask.bool()]
        if values.numel() == 0:
            continue
        uid, session, _ = parse_row_key(key)
        traj = (uid, session)
        lo[traj] = min(lo.get(traj, float("inf")), float(values.min()))
        hi[traj] = max(hi.get(traj, float("-inf")), float(values.max()))
    if not lo:
        return {}
    return {f"{STATS_KEY}/advantage_spread/max": max(hi[t] - lo[t] for t in lo)}


class ThreadWeaverTrainerMixin:
    """Put before a verl V1 trainer class; see the module docstring."""

    base_mode: str = "sync"

    def _build_replay_buffer(self):  # called from PPOTrainer.__init__ right after trainer_mode is read
        if str(self.config.algorithm.get("adv_estimator")) == ESTIMATOR_NAME:
            read_config(self.config.algorithm)  # bad or conflicting p_grpo settings fail here, before any rollout
        self.trainer_mode = self.base_mode
        self.parameter_sync_step = self.config.trainer.v1.get(self.base_mode, {}).get("parameter_sync_step", 1)
        return super()._build_replay_buffer()

    def _compute_advantage(self, batch, metrics):
        if str(self.config.algorithm.adv_estimator) != ESTIMATOR_NAME:
            return super()._compute_advantage(batch, metrics)
        with row_keys(batch.keys):
            out = super()._compute_advantage(batch, metrics)
        metrics.update(self._advantage_spread_metrics(batch))
        return out

    def _advantage_spread_metrics(self, batch) -> dict[str, float]:
        """``threadweaver/advantage_spread/max``: over trajectories, the largest difference between the
        advantages of its rows' trained tokens. P-GRPO gives every row of a trajectory the trajectory's
        scalar, so this is 0 when the estimator and verl's row bookkeeping agree."""
        import transfer_queue as tq

        keep = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)]
        if not keep:
            return {}
        keys = [batch.keys[i] for i in keep]
        data = tq.kv_batch_get(
            keys=keys, partition_id=batch.partition_id, select_fields=["advantages", "response_mask"]
        )
        return advantage_spread(keys, list(data["advantages"].unbind(0)), list(data["response_mask"].unbind(0)))

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        super()._compute_metrics(batch, metrics, timing_raw, global_steps=global_steps, epoch=epoch)
        metrics.update(self._threadweaver_metrics(batch))

    def _threadweaver_metrics(self, batch) -> dict[str, float]:
        import transfer_queue as tq

        padding = [bool(tag.get("is_padding", False)) for tag in batch.tags]
        finals = sorted(final_rows(batch.keys, padding).values())
        if not finals:
            return {}
        keys = [batch.keys[i] for i in finals]
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        extra = [getattr(e, "data", e) for e in list(data["extra_fields"])]
        return trajectory_metrics([e.get(STATS_KEY) if isinstance(e, dict) else None for e in extra])


class ThreadWeaverTrainerSync(ThreadWeaverTrainerMixin, PPOTrainerSync):
    """verl's ``sync`` V1 trainer with ThreadWeaver's P-GRPO hooks (``trainer_mode=threadweaver``)."""

    base_mode = "sync"


class ThreadWeaverTrainerColocateAsync(ThreadWeaverTrainerMixin, PPOTrainerColocateAsync):
    """verl's ``colocate_async`` V1 trainer with ThreadWeaver's P-GRPO hooks."""

    base_mode = "colocate_async"


class ThreadWeaverTrainerSeparateAsync(ThreadWeaverTrainerMixin, PPOTrainerSeparateAsync):
    """verl's ``separate_async`` V1 trainer with ThreadWeaver's P-GRPO hooks."""

    base_mode = "separate_async"


TRAINERS: dict[str, type] = {
    "threadweaver": ThreadWeaverTrainerSync,
    "threadweaver_colocate_async": ThreadWeaverTrainerColocateAsync,
    "threadweaver_separate_async": ThreadWeaverTrainerSeparateAsync,
}
TRAINER_MODES: dict[str, str] = {name: cls.base_mode for name, cls in TRAINERS.items()}  # name -> verl's mode


def register() -> None:
    """Register the trainers with verl's trainer registry (idempotent; loud when a name is taken)."""
    for name, cls in TRAINERS.items():
        if TRAINER_REGISTRY.get(name) is not cls:
            register_trainer(name)(cls)


def trainer_class(name: str = "threadweaver") -> type:
    """The ThreadWeaver trainer class registered as ``name`` (a key of :data:`TRAINERS`)."""
    if name not in TRAINERS:
        raise KeyError(f"unknown ThreadWeaver trainer {name!r}; choose one of {list(TRAINERS)}")
    register()
    return TRAINERS[name]


# At import, whatever the order in which verl and this module are imported: when this module imports verl
# first, the plugin's hook on verl's V1 trainer package finds this module half-imported and leaves it to us.
register()
