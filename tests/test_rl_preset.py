"""The Hydra presets in configs/: composed on verl 0.9.1's own ppo_trainer config, every key they set
exists in verl's schema (or is one of our documented additions), their values arrive, verl's own
config validation passes, and verl's loaders find our reward function and dataset class."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRIMARY = ("threadweaver_pgrpo", "threadweaver_pgrpo_qwen3_8b", "sequential_baseline_qwen3_8b")
# Sections the preset adds to verl's schema (each read by our own config dataclass)
ADDED = ("reward.custom_reward_function.reward_kwargs", "data.threadweaver", "algorithm.p_grpo")


def compose(name: str, overrides: list[str] | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return hydra_compose(config_name=name, overrides=overrides or [])


@pytest.fixture(scope="module")
def stock():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="verl.trainer.config", version_base=None):
        return hydra_compose(config_name="ppo_trainer")


def leaves(node, prefix=""):
    """(dotted path, value) of every leaf of a plain YAML mapping (lists are leaves)."""
    for k, v in node.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            yield from leaves(v, path)
        else:
            yield path, v


def has_key(cfg, path: str) -> bool:
    """Whether verl's config defines ``path`` (mandatory '???' values included)."""
    node = cfg
    for part in path.split("."):
        if not OmegaConf.is_dict(node) or part not in list(node.keys()):
            return False
        node = node._get_node(part)
    return True


def own_settings(name: str) -> dict:
    """What a YAML file itself sets (without hydra: / defaults:)."""
    raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text()) or {}
    return {k: v for k, v in raw.items() if k not in ("hydra", "defaults")}


FILES = ("threadweaver/pgrpo", "threadweaver/qwen3_8b_node", "sequential_baseline_qwen3_8b")


@pytest.mark.parametrize("name", FILES)
def test_every_key_exists_in_verl_or_is_a_documented_addition(stock, name):
    assert has_key(stock, "actor_rollout_ref.rollout.name") and not has_key(stock, "actor_rollout_ref.rollout.nn")
    unknown = []
    for path, _ in leaves(own_settings(name)):
        if path.startswith(ADDED):
            continue
        if not has_key(stock, path):
            unknown.append(path)
    assert not unknown, f"{name}.yaml sets keys verl 0.9.1's ppo_trainer does not have: {unknown}"


@pytest.mark.parametrize(
    "primary,pieces",
    [
        ("threadweaver_pgrpo", ["threadweaver/pgrpo"]),
        ("threadweaver_pgrpo_qwen3_8b", ["threadweaver/pgrpo", "threadweaver/qwen3_8b_node"]),
        (
            "sequential_baseline_qwen3_8b",
            ["threadweaver/pgrpo", "threadweaver/qwen3_8b_node", "sequential_baseline_qwen3_8b"],
        ),
    ],
)
def test_values_arrive_in_the_composed_config(primary, pieces):
    cfg = compose(primary)
    expected: dict = {}
    for piece in pieces:  # later files win, as in the defaults list
        expected.update(dict(leaves(own_settings(piece))))
    for path, value in expected.items():
        got = OmegaConf.select(cfg, path)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        assert got == value, f"{primary}: {path} = {got!r}, the preset says {value!r}"


def test_reference_settings():
    cfg = compose("threadweaver_pgrpo")
    rollout = cfg.actor_rollout_ref.rollout
    assert (rollout.n, rollout.temperature, rollout.calculate_log_probs) == (8, 1.0, True)
    assert rollout.agent.default_agent_loop == "threadweaver" and cfg.data.threadweaver.agent_name == "threadweaver"
    assert rollout.response_length == cfg.data.max_response_length  # verl's interpolation follows ours
    assert (cfg.algorithm.adv_estimator, cfg.algorithm.norm_adv_by_std_in_grpo) == ("p_grpo", False)
    assert cfg.algorithm.p_grpo.norm_adv_by_std is False
    assert cfg.trainer.use_v1 is True


@pytest.mark.parametrize("name", PRIMARY)
def test_verl_validate_config_passes(name):
    from verl.trainer.main_ppo import validate_config
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import omega_conf_to_dataclass

    cfg = compose(name, ["actor_rollout_ref.model.path=/models/qwen3-8b-threadweaver"])
    if name == "threadweaver_pgrpo":  # the bare preset leaves batch sizes to the user, as stock verl does
        cfg = compose(
            name,
            [
                "actor_rollout_ref.model.path=/m",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
                "actor_rollout_ref.actor.ppo_mini_batch_size=16",
                "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
            ],
        )
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    rollout = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert rollout.n == 8 and rollout.calculate_log_probs


@pytest.mark.parametrize("name", PRIMARY)
def test_verl_loads_our_reward_and_dataset(name):
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.utils.dataset.rl_dataset import get_dataset_class

    from threadweaver_verl.integrations.verl.rl_dataset import ThreadWeaverRLDataset, dataset_config
    from threadweaver_verl.rl.reward import config_from_kwargs

    cfg = compose(name)
    fn = get_custom_reward_fn(cfg)
    out = fn(data_source="x", solution_str="<think>a</think>\\boxed{4}", ground_truth="4", extra_info={})
    assert out["score"] == 1.0 and out["correct"] is True
    assert get_dataset_class(cfg.data) is ThreadWeaverRLDataset
    # our own sections parse with our dataclasses
    rc = config_from_kwargs(dict(cfg.reward.custom_reward_function.reward_kwargs))
    assert rc.correctness.answer_rule == "boxed_after_think"
    assert dataset_config(cfg.data).agent_name == cfg.data.threadweaver.agent_name


def test_our_estimator_and_trainer_names_match_the_code():
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn
    from verl.trainer.ppo.v1 import get_trainer_cls

    from threadweaver_verl.integrations.verl import plugin
    from threadweaver_verl.integrations.verl.advantage import read_config

    cfg = compose("threadweaver_pgrpo")
    plugin.require("adv_estimator:p_grpo")
    plugin.require("trainer:threadweaver")
    assert get_adv_estimator_fn(cfg.algorithm.adv_estimator) is not None  # verl's own lookups
    assert get_trainer_cls(cfg.trainer.v1.trainer_mode) is not None
    assert read_config(cfg.algorithm).norm_adv_by_std is False


def test_agent_loop_file_names_the_default_agent():
    cfg = compose("threadweaver_pgrpo")
    path = CONFIGS.parent / cfg.actor_rollout_ref.rollout.agent.agent_loop_config_path
    assert path.is_file(), f"{path} (the agent loop list the preset points at) is missing"
    entries = yaml.safe_load(path.read_text())
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop in [e["name"] for e in entries]


def test_added_keys_override_without_plus():
    cfg = compose(
        "threadweaver_pgrpo",
        [
            "reward.custom_reward_function.reward_kwargs.wrong_score=-1.0",
            "data.threadweaver.agent_name=single_turn_agent",
            "algorithm.p_grpo.norm_adv_by_std=true",
        ],
    )
    assert cfg.reward.custom_reward_function.reward_kwargs.wrong_score == -1.0
    assert cfg.data.threadweaver.agent_name == "single_turn_agent"
    assert cfg.algorithm.p_grpo.norm_adv_by_std is True


def test_unknown_override_is_refused():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException):
        compose("threadweaver_pgrpo", ["actor_rollout_ref.rollout.nn=8"])


def test_sequential_baseline_is_stock_grpo():
    cfg = compose("sequential_baseline_qwen3_8b")
    assert (cfg.algorithm.adv_estimator, cfg.algorithm.norm_adv_by_std_in_grpo) == ("grpo", False)
    assert cfg.trainer.v1.trainer_mode == "sync"
    assert cfg.actor_rollout_ref.rollout.agent.default_agent_loop == "single_turn_agent"
    assert cfg.data.threadweaver.agent_name == "single_turn_agent"
    assert cfg.reward.custom_reward_function.reward_kwargs.acceleration == "none"
    pgrpo = compose("threadweaver_pgrpo_qwen3_8b")
    for same in (
        "data.train_batch_size",
        "data.max_response_length",
        "actor_rollout_ref.rollout.n",
        "actor_rollout_ref.actor.optim.lr",
        "reward.custom_reward_function.reward_kwargs.wrong_score",
    ):
        assert OmegaConf.select(cfg, same) == OmegaConf.select(pgrpo, same), same


SCRIPTS = sorted((CONFIGS.parent / "examples").glob("run_qwen3_8b_*.sh"))


def test_example_scripts_exist():
    assert {p.name for p in SCRIPTS} == {
        "run_qwen3_8b_pgrpo.sh",
        "run_qwen3_8b_pgrpo_multinode.sh",
        "run_qwen3_8b_sequential_baseline.sh",
    }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_example_script_overrides_are_verl_keys(script):
    import re
    import subprocess

    text = script.read_text()
    assert "NOT RUN on the machines this project was built on" in "\n".join(text.splitlines()[:8])
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    name = re.search(r"--config-name (\S+)", text).group(1)
    cfg = compose(name)
    overrides = re.findall(r"^[ \t]+([A-Za-z_][\w.]*)=", text, flags=re.M)
    assert "actor_rollout_ref.model.path" in overrides and "data.train_files" in overrides
    missing = [k for k in overrides if not has_key(cfg, k)]
    assert not missing, f"{script.name} overrides keys the composed {name} config lacks: {missing}"
