"""The /v1/completions engine adapter: request fields and answer parsing for vLLM- and
SGLang-shaped answers, over a real HTTP server on loopback (the real vLLM server is
exercised in test_rollout_vllm.py)."""

from __future__ import annotations

import asyncio

import pytest
from _scripted_http import served  # noqa: F401  (fixture)

from threadweaver_verl.rollout.engine import EngineError
from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine, OpenAIEngineConfig


def answer(ids, finish="stop", logprobs=True, cached=None, **choice):
    c = {"index": 0, "text": "", "finish_reason": finish, "token_ids": ids, **choice}
    if logprobs:
        c["logprobs"] = {"token_logprobs": [-1.0 - i for i in range(len(ids))]}
    usage = {"prompt_tokens": 10, "completion_tokens": len(ids)}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {"choices": [c], "usage": usage}


def complete(url, server="vllm", **kw):
    async def go():
        async with OpenAICompletionsEngine(OpenAIEngineConfig(base_url=url, server=server, backoff_s=0.01)) as e:
            return await e.complete([1, 2, 3], max_tokens=8, stop_token_ids=[7, 9], routing_key="traj-9", **kw)

    return asyncio.run(go())


def test_vllm_request_and_answer(served):
    script, url = served
    script.answers["/v1/completions"] = [(200, answer([4, 5, 7], stop_reason=7, cached=8), 0)]
    comp = complete(url, sampling={"temperature": 0.5, "top_k": 3})
    assert comp.token_ids == [4, 5, 7] and comp.finish == "stop"
    assert comp.logprobs == [-1.0, -2.0, -3.0] and comp.cached_tokens == 8
    path, body, headers = script.seen[0]
    assert path == "/v1/completions"
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 8 and body["stop_token_ids"] == [7, 9]
    assert body["return_token_ids"] is True and body["logprobs"] == 0 and body["skip_special_tokens"] is False
    assert body["user"] == "traj-9" and headers["X-Routing-Key"] == "traj-9"
    assert body["temperature"] == 0.5 and body["top_k"] == 3 and "no_stop_trim" not in body
    assert "model" not in body


def test_sglang_trimmed_stop_token_is_restored(served):
    script, url = served
    script.answers["/v1/completions"] = [(200, answer([4, 5], matched_stop=9), 0)]
    comp = complete(url, server="sglang", sampling={"logprobs": False})
    assert comp.token_ids == [4, 5, 9] and comp.logprobs is None and comp.extra["stop_token_restored"]
    body = script.seen[0][1]
    assert body["no_stop_trim"] is True and "logprobs" not in body


def test_length_and_missing_cache_report(served):
    script, url = served
    script.answers["/v1/completions"] = [(200, answer([1] * 8, finish="length", logprobs=False), 0)]
    comp = complete(url)
    assert comp.finish == "length" and comp.cached_tokens is None and comp.logprobs is None


def test_answer_without_token_ids_is_a_clear_error(served):
    script, url = served
    script.answers["/v1/completions"] = [(200, {"choices": [{"text": "hi", "finish_reason": "stop"}]}, 0)]
    with pytest.raises(EngineError, match="return_token_ids"):
        complete(url)


def test_server_errors_become_engine_errors(served):
    script, url = served
    script.answers["/v1/completions"] = [(503, "overloaded", 0)]
    with pytest.raises(EngineError, match="HTTP 503"):
        complete(url)
    assert len(script.seen) == 4  # 1 try + 3 retries (the default)


def test_sampling_may_not_override_owned_fields():
    engine = OpenAICompletionsEngine(base_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="max_tokens"):
        engine.payload([1], max_tokens=2, stop_token_ids=[], routing_key="k", sampling={"max_tokens": 3})
    with pytest.raises(ValueError, match="server"):
        OpenAIEngineConfig(server="tgi")
