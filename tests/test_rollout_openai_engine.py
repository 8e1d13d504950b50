"""The /v1/completions engine adapter: request fields and answer parsing for vLLM- and
SGLang-shaped answers, over a real HTTP server on loopback; and the same adapter on vLLM's
CPU build (slow): token-id prompts, returned token ids, log-probs and prefix-cache counters all
travel through the ``openai`` SDK."""

from __future__ import annotations

import asyncio

import pytest
from _scripted_openai import Answer, ScriptedOpenAI, Status, in_order

from threadweaver_verl.rollout.engine import EngineError, Finish
from threadweaver_verl.rollout.http import OpenAIHTTPConfig
from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine, OpenAIEngineConfig


def answer(ids, finish="stop", logprobs=True, cached=None, **choice):
    c = {"index": 0, "text": "", "finish_reason": finish, "token_ids": ids, **choice}
    if logprobs:
        c["logprobs"] = {"token_logprobs": [-1.0 - i for i in range(len(ids))]}
    usage = {"prompt_tokens": 10, "completion_tokens": len(ids), "total_tokens": 10 + len(ids)}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return Answer({"id": "c", "object": "text_completion", "created": 0, "model": "m", "choices": [c], "usage": usage})


def complete(url, server="vllm", **kw):
    async def go():
        cfg = OpenAIEngineConfig(http=OpenAIHTTPConfig(base_url=url), server=server)
        async with OpenAICompletionsEngine(cfg) as e:
            return await e.complete([1, 2, 3], max_tokens=8, stop_token_ids=[7, 9], routing_key="traj-9", **kw)

    return asyncio.run(go())


def test_vllm_request_and_answer():
    with ScriptedOpenAI(completions=in_order(answer([4, 5, 7], stop_reason=7, cached=8))) as server:
        comp = complete(server.url, sampling={"temperature": 0.5, "top_k": 3})
        request = server.requests[0]
    assert comp.token_ids == [4, 5, 7] and comp.finish == Finish.STOP
    assert comp.logprobs == [-1.0, -2.0, -3.0] and comp.cached_tokens == 8
    body, headers = request.body, request.headers
    assert request.path == "/v1/completions"
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 8 and body["stop_token_ids"] == [7, 9]
    assert body["return_token_ids"] is True and body["logprobs"] == 0 and body["skip_special_tokens"] is False
    assert body["user"] == "traj-9" and headers["X-Routing-Key"] == "traj-9"
    assert body["temperature"] == 0.5 and body["top_k"] == 3 and "no_stop_trim" not in body
    assert "model" not in body


def test_sglang_trimmed_stop_token_is_restored():
    with ScriptedOpenAI(completions=in_order(answer([4, 5], matched_stop=9))) as server:
        comp = complete(server.url, server="sglang", sampling={"logprobs": False})
        body = server.requests[0].body
    assert comp.token_ids == [4, 5, 9] and comp.logprobs is None and comp.extra["stop_token_restored"]
    assert body["no_stop_trim"] is True and "logprobs" not in body


def test_length_and_missing_cache_report():
    with ScriptedOpenAI(completions=in_order(answer([1] * 8, finish="length", logprobs=False))) as server:
        comp = complete(server.url, sampling={"logprobs": False})
    assert comp.finish == Finish.LENGTH and comp.cached_tokens is None and comp.logprobs is None


def test_answer_without_token_ids_is_a_clear_error():
    with ScriptedOpenAI(completions=in_order(Answer({"choices": [{"text": "hi", "finish_reason": "stop"}]}))) as server:
        with pytest.raises(EngineError, match="return_token_ids"):
            complete(server.url)


def test_server_errors_become_engine_errors():
    with ScriptedOpenAI(completions=in_order(Status(503, "overloaded"))) as server:
        with pytest.raises(EngineError, match="HTTP 503"):
            complete(server.url)
        assert len(server.requests) == 1 + OpenAIHTTPConfig().max_retries  # 1 try + the default retries


@pytest.mark.parametrize("finish", ["content_filter", None])
def test_unknown_finish_reason_is_an_error_not_a_stop(finish):
    with ScriptedOpenAI(completions=in_order(answer([4, 5], finish=finish))) as server:
        with pytest.raises(EngineError, match=f"finish_reason={finish!r}"):
            complete(server.url)


@pytest.mark.parametrize(
    "logprobs",
    [None, {"token_logprobs": None}, {"token_logprobs": [-1.0]}, {"token_logprobs": [-1.0, None]}],
    ids=["absent", "null", "too few", "a null one"],
)
def test_asked_for_logprobs_must_come_back_one_per_token(logprobs):
    reply = answer([4, 5], logprobs=False)
    if logprobs is not None:
        reply.body["choices"][0]["logprobs"] = logprobs
    with ScriptedOpenAI(completions=in_order(reply)) as server:
        with pytest.raises(EngineError, match="log-prob"):
            complete(server.url)


def test_trimmed_stop_token_with_logprobs_asked_for_is_an_error():
    with ScriptedOpenAI(completions=in_order(answer([4, 5], matched_stop=9))) as server:
        with pytest.raises(EngineError, match="trimmed the stop token 9"):
            complete(server.url, server="sglang")


def test_sampling_may_not_override_owned_fields():
    engine = OpenAICompletionsEngine(base_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="max_tokens"):
        engine.request([1], max_tokens=2, stop_token_ids=[], routing_key="k", sampling={"max_tokens": 3})
    with pytest.raises(ValueError, match="server"):
        OpenAIEngineConfig(server="tgi")


def test_engine_settings_nest_the_client_settings():
    """One place per default: the engine's connection settings are the client's own dataclass."""
    cfg = OpenAIEngineConfig()
    assert cfg.http == OpenAIHTTPConfig()
    engine = OpenAICompletionsEngine(cfg, base_url="http://127.0.0.1:1/v1")
    assert engine.http.config == OpenAIHTTPConfig(base_url="http://127.0.0.1:1/v1")
    assert engine.http.client.max_retries == OpenAIHTTPConfig().max_retries
    assert cfg.http.base_url == OpenAIHTTPConfig().base_url  # the given config is not changed


@pytest.mark.slow
def test_vllm_answers_carry_token_ids_logprobs_and_cached_tokens(vllm_server, tiny_tokenizer):
    """The measurement behind rollout/http.py's docstring: through the SDK, vLLM takes a token-id
    prompt and returns the token ids, one log-prob per token and the prefix-cache counter."""
    prompt = tiny_tokenizer.encode("Multiply 4821 by 37 and add the carry of each partial product. " * 8)

    async def go():
        async with OpenAICompletionsEngine(base_url=vllm_server.url) as engine:
            sampling = {"temperature": 0.0, "ignore_eos": True}
            first = await engine.complete(prompt, max_tokens=6, stop_token_ids=[], routing_key="m", sampling=sampling)
            again = await engine.complete(prompt, max_tokens=6, stop_token_ids=[], routing_key="m", sampling=sampling)
            return first, again

    first, again = asyncio.run(go())
    assert first.finish == Finish.LENGTH and len(first.token_ids) == 6 and again.token_ids == first.token_ids
    assert all(isinstance(i, int) for i in first.token_ids)
    assert first.logprobs is not None and len(first.logprobs) == 6 and all(lp <= 0.0 for lp in first.logprobs)
    assert again.cached_tokens is not None and again.cached_tokens >= len(prompt) // 2
