"""The verl adapter of the fork/join rollout: engine calls over verl's server manager, and the rows it returns.

The real controller runs against a scripted stand-in for verl's ``LLMServerClient`` (it answers
``generate(request_id, prompt_ids=..., sampling_params=...)`` with verl's own ``TokenOutput``), so the
row layout can be checked token by token. ``tests/test_verl_rollout.py`` runs the same agent loop inside
verl's real V1 rollout path against a real vLLM server.
"""

from __future__ import annotations

import asyncio
import copy
import json

import pytest
from transformers import AutoTokenizer
from verl.workers.rollout.replica import TokenOutput

from threadweaver_verl.format import BlockLayout, RequestKind, Tag, TokenFormat
from threadweaver_verl.integrations.verl.agent_loop import (
    REQUEST_KEY,
    STATS_KEY,
    VerlServerEngine,
    build_outputs,
    controller_config,
)
from threadweaver_verl.rl.reward import compute_score
from threadweaver_verl.rollout.controller import ControllerConfig, ForkJoinController, Reason
from threadweaver_verl.rollout.engine import EngineError, Finish


def logprob_of(token: int, position: int) -> float:
    """A distinct, recognisable log-prob per (token, position in its completion)."""
    return -round(0.001 * token + 0.0001 * position + 0.01, 6)


class ScriptedServerManager:
    """Answers like verl's LLMServerClient.generate, from a script keyed on the request's context:
    the main line opens a block with two outlines, thread n writes ``thread_text[n]``, and after the
    join the main line answers and ends with EOS."""

    def __init__(
        self,
        fmt: TokenFormat,
        prompt: list[int],
        thread_text: dict[int, str],
        blocks: bool = True,
        fail: bool = False,
        abort: bool = False,
    ):
        self.fmt, self.prompt, self.thread_text = fmt, prompt, thread_text
        self.blocks, self.fail, self.abort = blocks, fail, abort
        self.calls: list[dict] = []
        t = fmt.tag_id
        e = fmt.encode
        self.opening = [t(Tag.THINK_OPEN)] + e("\nsplit it") + fmt.atom_ids(BlockLayout.outline_atoms(["a", "b"]))
        self.answer = e("\nso ") + e("\\boxed{3}") + [t(Tag.THINK_CLOSE)] + e(" \\boxed{3}") + list(fmt.eos_ids[:1])
        self.sequential = [t(Tag.THINK_OPEN)] + e("\nno fork \\boxed{3}") + [t(Tag.THINK_CLOSE)] + list(fmt.eos_ids[:1])

    def script(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        for n, text in self.thread_text.items():
            header = self.fmt.thread_header(n)
            if prompt_ids[-len(header) :] == header:
                ids = self.fmt.encode(text)
                return ids if text.endswith("...") else ids + [self.fmt.tag_id(Tag.THREAD_CLOSE)]
        if prompt_ids == self.prompt:
            return self.opening if self.blocks else self.sequential
        return self.answer

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        self.calls.append(
            {
                "request_id": request_id,
                "prompt_ids": list(prompt_ids),
                "sampling_params": sampling_params,
                "sampling_copy": copy.deepcopy(sampling_params),
                "kwargs": kwargs,
            }
        )
        if self.fail:
            raise RuntimeError("replica died")
        if self.abort:
            return TokenOutput(token_ids=[], stop_reason="aborted", extra_fields={"global_steps": 3})
        ids = self.script(list(prompt_ids), sampling_params["max_tokens"])[: sampling_params["max_tokens"]]
        stops = set(sampling_params["stop_token_ids"])
        cut = next((i for i, x in enumerate(ids) if x in stops), None)
        ids = ids if cut is None else ids[: cut + 1]
        sampling_params.pop("max_tokens")  # verl's vLLM server pops keys of the dict it is given
        return TokenOutput(
            token_ids=ids,
            log_probs=[logprob_of(x, i) for i, x in enumerate(ids)],
            stop_reason="completed",
            num_preempted=0,
            extra_fields={
                "global_steps": 3,
                "min_global_steps": 3,
                "max_global_steps": 3,
                "num_cached_tokens": len(prompt_ids) - 1,
            },
        )


def run_trajectory(fmt, manager, prompt, config=None, sampling=None):
    sampling = (
        sampling
        if sampling is not None
        else {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    )
    engine = VerlServerEngine(manager)
    controller = ForkJoinController(fmt, config or ControllerConfig(max_response_tokens=256))
    result = asyncio.run(controller.run(engine, prompt, routing_key="traj-1", sampling=sampling))
    outputs = build_outputs(
        result,
        fmt,
        extra_fields={"min_global_steps": engine.min_global_steps, "max_global_steps": engine.max_global_steps},
        response_length=256,
    )
    return result, outputs, sampling


def test_engine_calls_copy_sampling_params_pass_budgets_and_share_one_request_id(fmt):
    prompt = fmt.encode("What is 1+2?")
    manager = ScriptedServerManager(fmt, prompt, {1: "one", 2: "two"})
    _, _, sampling = run_trajectory(fmt, manager, prompt)
    assert len(manager.calls) == 4  # main line, two threads, main line after the join
    assert {c["request_id"] for c in manager.calls} == {"traj-1"}  # sticky routing key
    assert sampling == {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    dicts = [c["sampling_params"] for c in manager.calls]
    assert len({id(d) for d in dicts}) == len(dicts) and all(d is not sampling for d in dicts)
    for call in manager.calls:
        sent = call["sampling_copy"]
        assert isinstance(sent["max_tokens"], int) and sent["max_tokens"] >= 1
        assert sent["temperature"] == 1.0 and sent["logprobs"] is True
    main_stops = set(fmt.sequential_stop_ids)
    thread_stops = set(fmt.thread_stop_ids)
    assert set(manager.calls[0]["sampling_copy"]["stop_token_ids"]) == main_stops
    assert set(manager.calls[1]["sampling_copy"]["stop_token_ids"]) == thread_stops


def test_outputs_thread_rows_then_final_trajectory_each_token_trained_once(fmt):
    prompt = fmt.encode("What is 1+2?")
    manager = ScriptedServerManager(fmt, prompt, {1: "one", 2: "two"})
    result, outputs, _ = run_trajectory(fmt, manager, prompt)
    assert result.valid and not result.terminations
    threads = [r for r in result.requests if r.path]
    main = [r for r in result.requests if r.kind == RequestKind.SEQUENTIAL and not r.path]
    assert len(threads) == 2 and len(main) == 2
    assert len(outputs) == 3
    for out, req in zip(outputs[:-1], threads):
        assert out.prompt_ids == list(req.context_ids) and out.response_ids == list(req.completion_ids)
        assert out.response_mask == [1] * len(req.completion_ids)
        assert out.response_logprobs == [logprob_of(x, i) for i, x in enumerate(req.completion_ids)]
        assert out.extra_fields[STATS_KEY] is None
        assert out.extra_fields[REQUEST_KEY]["path"] == list(req.path)
    final = outputs[-1]
    assert final.prompt_ids == prompt and final.response_ids == result.response_ids
    full = prompt + result.response_ids
    expected_mask = [0] * len(result.response_ids)
    expected_lp = [0.0] * len(result.response_ids)
    for r in main:  # main-line contexts are prefixes of the trajectory: same context in the final row
        assert full[: len(r.context_ids)] == list(r.context_ids)
        start = len(r.context_ids) - len(prompt)
        for i, x in enumerate(r.completion_ids):
            assert result.response_ids[start + i] == x
            expected_mask[start + i] = 1
            expected_lp[start + i] = logprob_of(x, i)
    assert final.response_mask == expected_mask
    assert final.response_logprobs == expected_lp
    # thread tokens and the ids fork/join inserted (headers, gaps, </Parallel>) are not trained in the final row
    sampled = sum(len(r.completion_ids) - r.forced for r in result.requests)
    assert sum(sum(o.response_mask) for o in outputs) == sampled
    assert sum(final.response_mask) < len(final.response_ids)
    stats = final.extra_fields[STATS_KEY]
    assert stats["total_tokens"] == len(result.response_ids) and stats["num_blocks"] == 1
    assert stats["num_threads"] == 2 and stats["threads_per_block"] == [2] and stats["format_ok"] is True
    assert stats["critical_path"] < stats["total_tokens"] and stats["speedup"] > 1.0
    assert stats["num_requests"] == 4 and stats["termination"] == "eos"
    assert "</Outlines>" in stats["response_text"] and stats["response_text"].endswith("<|im_end|>")
    # one field set for every row: verl's TransferQueue stores the rows of a trajectory in one batch
    key_sets = {tuple(sorted(o.as_dict())) for o in outputs}
    assert len(key_sets) == 1 and "rollout_log_probs" in next(iter(key_sets))
    assert all(o.extra_fields["min_global_steps"] == 3 for o in outputs)


def test_forced_closing_ids_carry_no_loss_and_no_logprob(fmt):
    prompt = fmt.encode("What is 1+2?")
    manager = ScriptedServerManager(fmt, prompt, {1: "one", 2: "7 7 7 7 7 7 7 7 7 7 7 7 ..."})
    result, outputs, _ = run_trajectory(
        fmt, manager, prompt, ControllerConfig(max_response_tokens=256, max_thread_tokens=10)
    )
    assert "truncated" in result.terminations
    truncated = next(r for r in result.requests if r.path and r.forced)
    row = next(o for o in outputs[:-1] if o.extra_fields[REQUEST_KEY]["path"] == list(truncated.path))
    assert row.response_ids[-1] == fmt.tag_id(Tag.THREAD_CLOSE)
    assert row.response_mask[-truncated.forced :] == [0] * truncated.forced
    assert row.response_logprobs[-truncated.forced :] == [0.0] * truncated.forced
    assert sum(row.response_mask) == len(truncated.completion_ids) - truncated.forced
    assert "truncated" in outputs[-1].extra_fields[STATS_KEY]["termination"]


def test_sequential_trajectory_is_one_row_like_verls_single_turn_loop(fmt):
    prompt = fmt.encode("What is 1+2?")
    manager = ScriptedServerManager(fmt, prompt, {}, blocks=False)
    result, outputs, _ = run_trajectory(fmt, manager, prompt)
    assert len(outputs) == 1
    (only,) = outputs
    assert only.prompt_ids == prompt and only.response_ids == manager.sequential
    assert only.response_mask == [1] * len(manager.sequential)


def test_finish_is_decided_from_the_returned_ids(fmt):
    prompt = fmt.encode("x")

    class OneShot:
        def __init__(self, ids, stop_reason="completed"):
            self.ids, self.stop_reason = ids, stop_reason

        async def generate(self, request_id, *, prompt_ids, sampling_params, **kw):
            return TokenOutput(token_ids=self.ids, stop_reason=self.stop_reason)

    eos = fmt.eos_ids[0]
    stop = asyncio.run(
        VerlServerEngine(OneShot([5, eos])).complete(prompt, max_tokens=8, stop_token_ids=[eos], routing_key="k")
    )
    assert stop.finish == Finish.STOP
    length = asyncio.run(
        VerlServerEngine(OneShot([5, 6])).complete(prompt, max_tokens=2, stop_token_ids=[eos], routing_key="k")
    )
    assert length.finish == Finish.LENGTH and length.logprobs is None
    aborted = asyncio.run(
        VerlServerEngine(OneShot([], "aborted")).complete(prompt, max_tokens=2, stop_token_ids=[eos], routing_key="k")
    )
    assert aborted.finish == Finish.ABORT
    with pytest.raises(EngineError, match="at least one token"):
        asyncio.run(VerlServerEngine(OneShot([])).complete(prompt, max_tokens=0, stop_token_ids=[eos], routing_key="k"))


class VLLMLikeServerManager:
    """Answers one completion and stops like vLLM: at the request's stop ids AND at every EOS id of the
    model's generation config (vLLM adds those to each request itself); verl reports "completed"."""

    def __init__(self, answer: list[int], model_eos: set[int]):
        self.answer, self.model_eos = answer, model_eos

    async def generate(self, request_id, *, prompt_ids, sampling_params, **kwargs) -> TokenOutput:
        stops = set(sampling_params["stop_token_ids"]) | self.model_eos
        ids = self.answer[: sampling_params["max_tokens"]]
        cut = next((i for i, x in enumerate(ids) if x in stops), None)
        ids = ids if cut is None else ids[: cut + 1]
        return TokenOutput(token_ids=ids, log_probs=[-0.5] * len(ids), stop_reason="completed")


def test_a_stop_on_the_generation_configs_second_eos_is_an_eos_stop(tok, tmp_path):
    # a model folder like Qwen3's: the tokenizer's EOS is <|im_end|>, the generation config adds <|endoftext|>
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_end, endoftext]}))
    fmt = TokenFormat.from_tokenizer(AutoTokenizer.from_pretrained(tmp_path))
    prompt = fmt.encode("What is 6*7?")

    answer = fmt.fragment_ids("<think>\nsix sevens</think>\n\\boxed{42}") + [endoftext]
    result, outputs, _ = run_trajectory(fmt, VLLMLikeServerManager(answer, {im_end, endoftext}), prompt)
    assert result.response_ids == answer  # nothing forced after the EOS
    assert [r.finish for r in result.requests] == [Finish.EOS]  # an EOS stop, not a length stop
    assert result.ended_normally and result.terminations == []
    stats = outputs[-1].extra_fields[STATS_KEY]
    assert stats["termination"] == "eos"
    for extra, kwargs in (({STATS_KEY: stats}, {}), ({}, {"response_ids": answer, "tokenizer": str(tmp_path)})):
        score = compute_score("math", "", "42", extra, **kwargs)
        assert score["correct"] and score["termination"] == "eos", score

    # with <think> still open, </think> goes before the EOS, never after it
    answer = fmt.fragment_ids("<think>\nhmm 42") + [endoftext]
    result, _, _ = run_trajectory(fmt, VLLMLikeServerManager(answer, {im_end, endoftext}), prompt)
    assert fmt.decode(result.response_ids) == "<think>\nhmm 42</think><|endoftext|>"
    assert result.terminations == [Reason.CLOSED_AT_EOS] and result.requests[-1].finish == Finish.EOS


def test_engine_failures_fail_the_trajectory_loudly(fmt):
    prompt = fmt.encode("What is 1+2?")
    with pytest.raises(EngineError, match="replica died"):
        run_trajectory(fmt, ScriptedServerManager(fmt, prompt, {}, fail=True), prompt)
    with pytest.raises(EngineError, match="aborted"):
        run_trajectory(fmt, ScriptedServerManager(fmt, prompt, {}, abort=True), prompt)


def test_controller_settings_from_the_agent_loop_yaml():
    from pathlib import Path

    from omegaconf import OmegaConf

    from threadweaver_verl.config import ConfigError

    entry = OmegaConf.load(Path(__file__).parents[1] / "configs" / "agent_loop.yaml")[0]
    assert entry.name == "threadweaver"
    assert entry._target_ == "threadweaver_verl.integrations.verl.agent_loop.ThreadWeaverAgentLoop"
    cfg = controller_config(entry.controller, response_length=300)
    assert cfg.max_response_tokens == 300 and cfg.fork is True
    with pytest.raises(ValueError, match="exceeds actor_rollout_ref.rollout.response_length"):
        controller_config({"max_response_tokens": 400}, response_length=300)
    with pytest.raises(ConfigError, match="max_thread_token"):
        controller_config({"max_thread_token": 4}, response_length=300)


def test_agent_loop_is_registered_with_verl():
    import verl  # noqa: F401  (loads the plugin)
    from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

    from threadweaver_verl.integrations.verl import plugin

    plugin.require("agent_loop:threadweaver")
    assert (
        _agent_loop_registry["threadweaver"]["_target_"]
        == "threadweaver_verl.integrations.verl.agent_loop.ThreadWeaverAgentLoop"
    )
