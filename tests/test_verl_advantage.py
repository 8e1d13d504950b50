"""P-GRPO advantages through verl 0.9.1's own V1 code.

These call verl's real ``compute_advantage_for_multi_trajectories`` (the
function V1's ``_compute_advantage`` calls) on a batch whose trajectories have
1 to 9 rows each. ``tests/test_verl_rollout.py`` runs V1's ``_compute_advantage``
itself on rows stored in a real TransferQueue, after verl's real batch padding.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from threadweaver_verl.integrations.verl import advantage as adv
from threadweaver_verl.integrations.verl.advantage import row_keys
from threadweaver_verl.rl.advantage import PGRPOConfig, PGRPOError, trajectory_advantages

# uid -> per session: (reward, number of rows the trajectory produced)
GROUPS = {
    "uA": [(1.0, 9), (0.0, 1), (1.1, 3)],
    "uB": [(0.0, 2), (1.0, 1)],
    "uC": [(1.0, 4), (1.0, 1), (1.0, 2)],  # all equal
    "uD": [(0.7, 5)],  # a group of one trajectory
}


def _batch(groups=GROUPS, seed: int = 0, pad_rows: int = 0):
    """A V1-shaped advantage batch: rows keyed {uid}_{session}_{index} in shuffled order, the reward copied to
    every row at its last response token (as AgentLoopOutput.as_dict builds rm_scores), ragged response masks.
    ``pad_rows`` appends rows shaped like verl's synthetic padding (own uid, zero reward, zero mask)."""
    from verl import DataProto

    rng = random.Random(seed)
    rows = []
    for uid, sessions in groups.items():
        for s, (reward, n_rows) in enumerate(sessions):
            for i in range(n_rows):
                rows.append((f"{uid}_{s}_{i}", uid, reward, rng.randint(1, 12)))
    rng.shuffle(rows)
    pad_uid = "pad0123456789abcdef"
    rows += [(f"{pad_uid}_{i}_0", pad_uid, 0.0, 0) for i in range(pad_rows)]
    width = 12
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    scores = torch.zeros(len(rows), width)
    for r, (_, _, reward, length) in enumerate(rows):
        mask[r, :length] = 1
        scores[r, max(length, 1) - 1] = reward
    data = DataProto.from_dict(
        tensors={"response_mask": mask, "token_level_rewards": scores, "token_level_scores": scores.clone()},
        non_tensors={"uid": np.array([u for _, u, _, _ in rows], dtype=object)},
    )
    return data, [k for k, _, _, _ in rows]


def _algo(estimator: str, norm_adv_by_std_in_grpo: bool | None = None, **p_grpo):
    """verl's algorithm section; its norm_adv_by_std_in_grpo agrees with p_grpo's unless given."""
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(p_grpo.get("norm_adv_by_std", False))
    cfg = {"adv_estimator": estimator, "gamma": 1.0, "lam": 1.0, "norm_adv_by_std_in_grpo": norm_adv_by_std_in_grpo}
    if p_grpo:
        cfg["p_grpo"] = p_grpo
    return OmegaConf.create(cfg)


def _v1_advantages(data, keys, estimator: str, algo=None, norm_adv_by_std_in_grpo: bool = False):
    """verl's V1 advantage step, as PPOTrainer._compute_advantage calls it."""
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    adv.register()
    algo = algo if algo is not None else _algo(estimator)
    with row_keys(keys):
        out = compute_advantage_for_multi_trajectories(
            data,
            batch_keys=keys,
            adv_estimator=estimator,
            gamma=1.0,
            lam=1.0,
            num_repeat=3,
            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
            config=algo,
        )
    return out.batch["advantages"]


def _expected(groups=GROUPS, std: bool = False) -> dict[tuple[str, int], float]:
    out = {}
    for uid, sessions in groups.items():
        r = torch.tensor([s[0] for s in sessions])
        a = torch.zeros_like(r) if len(r) == 1 else r - r.mean()
        if std and len(r) > 1:
            a = a / (r.std() + 1e-6)
        for s, value in enumerate(a.tolist()):
            out[(uid, s)] = value
    return out


def _session(key: str) -> tuple[str, int]:
    uid, s, _ = key.rsplit("_", 2)
    return uid, int(s)


def test_p_grpo_through_v1_weighs_trajectories_not_rows_and_broadcasts_exactly():
    data, keys = _batch()
    mask = data.batch["response_mask"].clone()
    out = _v1_advantages(data, keys, "p_grpo")
    expected = _expected()
    for r, key in enumerate(keys):
        want = torch.full((mask.shape[1],), expected[_session(key)]) * mask[r]
        torch.testing.assert_close(out[r], want, rtol=0, atol=1e-6, msg=f"row {key}")
    # uA's trajectory with 9 rows and the one with 1 row count once each: mean(1.0, 0.0, 1.1) = 0.7
    row_weighted = (9 * 1.0 + 0.0 + 3 * 1.1) / 13
    ua9 = next(r for r, k in enumerate(keys) if k == "uA_0_0")
    assert out[ua9][0].item() == pytest.approx(1.0 - 0.7, abs=1e-6)
    assert out[ua9][0].item() != pytest.approx(1.0 - row_weighted, abs=1e-3)
    # equal rewards and a group of one give zero
    for r, key in enumerate(keys):
        if key.startswith(("uC_", "uD_")):
            assert torch.count_nonzero(out[r].abs() > 1e-6) == 0


def test_stock_v1_grpo_without_std_matches_p_grpo_on_groups_of_two_or_more():
    groups = {k: v for k, v in GROUPS.items() if len(v) > 1}
    data, keys = _batch(groups, seed=1)
    ours = _v1_advantages(data, keys, "p_grpo")
    data2, keys2 = _batch(groups, seed=1)
    stock = _v1_advantages(data2, keys2, "grpo", norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-6)
    # they differ only on a group of one: verl's grpo gives it A = r, P-GRPO A = 0
    data3, keys3 = _batch({"uD": GROUPS["uD"]})
    assert _v1_advantages(data3, keys3, "grpo")[0, 0].item() == pytest.approx(0.7)
    data4, keys4 = _batch({"uD": GROUPS["uD"]})
    assert _v1_advantages(data4, keys4, "p_grpo").abs().max().item() == 0.0


def test_v1_padding_rows_do_not_shift_group_means():
    data, keys = _batch(seed=2)
    plain = _v1_advantages(data, keys, "p_grpo")
    padded_data, padded_keys = _batch(seed=2, pad_rows=3)
    padded = _v1_advantages(padded_data, padded_keys, "p_grpo")
    torch.testing.assert_close(padded[: len(keys)], plain, rtol=0, atol=0)
    assert padded[len(keys) :].abs().max().item() == 0.0


def test_std_normalisation_and_equal_group_settings():
    data, keys = _batch(seed=3)
    out = _v1_advantages(data, keys, "p_grpo", algo=_algo("p_grpo", norm_adv_by_std=True))
    expected = _expected(std=True)
    for r, key in enumerate(keys):
        want = torch.full((out.shape[1],), expected[_session(key)]) * data.batch["response_mask"][r]
        torch.testing.assert_close(out[r], want, rtol=1e-5, atol=1e-5)
    # seven equal rewards of 0.7: their float32 mean is not exactly 0.7, so std division blows the rounding
    # noise up to a sizeable advantage; zero_equal_groups gives exact zeros
    scores = torch.full((7,), 0.7)
    keys7 = [f"u_{s}_0" for s in range(7)]
    noisy = trajectory_advantages(scores, keys7, PGRPOConfig(norm_adv_by_std=True))
    assert noisy.abs().max().item() > 1e-3
    exact = trajectory_advantages(scores, keys7, PGRPOConfig(norm_adv_by_std=True, zero_equal_groups=True))
    assert exact.abs().max().item() == 0.0


def test_verl_norm_adv_by_std_in_grpo_is_never_silently_ignored():
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    from threadweaver_verl.integrations.verl.trainer import trainer_class

    data, keys = _batch()
    adv.register()
    for verl_std, ours in ((True, {}), (False, {"norm_adv_by_std": True})):
        algo = _algo("p_grpo", norm_adv_by_std_in_grpo=verl_std, **ours)
        with row_keys(keys), pytest.raises(PGRPOError, match="norm_adv_by_std_in_grpo=.* conflicts with"):
            compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator="p_grpo", config=algo)
    # verl's default (true) against p_grpo's (false): the ThreadWeaver trainer refuses it when it is built
    t = object.__new__(trainer_class("threadweaver"))
    t.config = OmegaConf.create({"algorithm": {"adv_estimator": "p_grpo", "norm_adv_by_std_in_grpo": True}})
    with pytest.raises(PGRPOError, match="set both false"):
        t._build_replay_buffer()
    # agreeing settings are honoured: both true divides by the std (checked against the expected values above)
    assert adv.read_config(_algo("p_grpo", norm_adv_by_std=True)).norm_adv_by_std is True


def test_final_row_reward_is_the_trajectory_reward():
    # a session's reward is read from its highest-index row, as verl's V1 grpo does
    scores = torch.tensor([5.0, 1.0, 0.0])
    out = trajectory_advantages(scores, ["u_0_0", "u_0_1", "u_1_0"])
    assert out.tolist() == pytest.approx([0.5, 0.5, -0.5])


def test_p_grpo_without_row_keys_fails_loudly():
    data, keys = _batch()
    adv.register()
    from verl.trainer.ppo.v1.utils import compute_advantage_for_multi_trajectories

    with pytest.raises(PGRPOError, match="trainer_mode=threadweaver"):
        compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator="p_grpo", config=_algo("p_grpo"))
    with row_keys(list(reversed(keys))), pytest.raises(PGRPOError, match="out of order"):
        compute_advantage_for_multi_trajectories(data, batch_keys=keys, adv_estimator="p_grpo", config=_algo("p_grpo"))
    with row_keys(keys), pytest.raises(PGRPOError, match="algorithm.p_grpo"):
        compute_advantage_for_multi_trajectories(
            data, batch_keys=keys, adv_estimator="p_grpo", config=_algo("p_grpo", norm_by_std=True)
        )
    with pytest.raises(PGRPOError, match="uid"):
        trajectory_advantages(torch.zeros(1), ["no-session-key"])


def test_registration_is_idempotent_and_found_by_verl():
    from verl.trainer.ppo import core_algos

    adv.register()
    adv.register()
    assert core_algos.get_adv_estimator_fn("p_grpo") is adv.compute_p_grpo_advantage


def test_threadweaver_trainers_registered_with_their_base_modes():
    from verl.trainer.ppo.v1 import PPOTrainerColocateAsync, PPOTrainerSync, get_trainer_cls

    from threadweaver_verl.integrations.verl import trainer as tw_trainer

    tw_trainer.register()
    tw_trainer.register()
    sync_cls = get_trainer_cls("threadweaver")
    assert issubclass(sync_cls, PPOTrainerSync) and sync_cls.base_mode == "sync"
    assert issubclass(get_trainer_cls("threadweaver_colocate_async"), PPOTrainerColocateAsync)
    # verl's PPOTrainer.__init__ sets trainer_mode from the config, then builds the replay buffer: ours resets
    # the mode first, so verl picks the sync replay buffer and the sync refill rules
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    t = object.__new__(sync_cls)
    t.config = OmegaConf.create(
        {
            "trainer": {
                "v1": {
                    "trainer_mode": "threadweaver",
                    "sync": {},
                    "sampler": {
                        "max_off_policy_threshold": None,
                        "max_off_policy_strategy": "drop",
                        "sampler_kwargs": {},
                    },
                }
            },
            "algorithm": {},
            "data": {"train_batch_size": 2},
            "reward": {"reward_model": {"enable": False}},
        }
    )
    t.trainer_mode = "threadweaver"
    buffer = t._build_replay_buffer()
    assert t.trainer_mode == "sync" and type(buffer) is ReplayBuffer


def test_trajectory_metrics_use_each_sessions_final_row():
    from threadweaver_verl.integrations.verl.trainer import trajectory_metrics
    from threadweaver_verl.rl.advantage import final_rows

    keys = ["u_0_0", "u_0_1", "u_1_0", "padx_0_0"]
    assert final_rows(keys, [False, False, False, True]) == {("u", "0"): 1, ("u", "1"): 2}
    assert final_rows(["u_0_2", "u_0_0", "u_0_1"]) == {("u", "0"): 0}  # the highest index, wherever it sits
    m = trajectory_metrics(
        [
            {"speedup": 2.0, "threads_per_block": [2, 4], "format_ok": True, "wall_time_s": 0.5},
            {"speedup": 1.0, "threads_per_block": [], "format_ok": False, "wall_time_s": 1.5},
            None,
        ]
    )
    assert m["threadweaver/speedup/mean"] == 1.5
    assert m["threadweaver/threads_per_block/mean"] == 3.0
    assert m["threadweaver/format_ok/mean"] == 0.5
    assert (m["threadweaver/wall_time_s/mean"], m["threadweaver/wall_time_s/max"]) == (1.0, 1.5)  # latency


def test_advantage_spread_is_zero_only_when_every_row_has_its_trajectorys_advantage():
    from threadweaver_verl.integrations.verl.trainer import advantage_spread

    keys = ["u_0_0", "u_0_1", "u_1_0"]
    masks = [torch.tensor([1, 1, 0]), torch.tensor([0, 1]), torch.tensor([1])]
    same = [torch.tensor([0.5, 0.5, 9.0]), torch.tensor([7.0, 0.5]), torch.tensor([-0.5])]  # masked-out values ignored
    assert advantage_spread(keys, same, masks) == {"threadweaver/advantage_spread/max": 0.0}
    differ = [torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.0, 0.25]), torch.tensor([-0.5])]
    assert advantage_spread(keys, differ, masks)["threadweaver/advantage_spread/max"] == pytest.approx(0.25)
    assert advantage_spread(keys[:1], [torch.zeros(2)], [torch.zeros(2)]) == {}  # no trained token
