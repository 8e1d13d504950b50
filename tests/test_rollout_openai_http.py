"""The OpenAI-compatible client (the ``openai`` SDK's, with our config, concurrency limit and errors)
against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest
from _scripted_openai import Answer, ScriptedOpenAI, Slow, Status, TokenReply, in_order

from threadweaver_verl.rollout.engine import EngineError
from threadweaver_verl.rollout.http import OpenAIHTTP, OpenAIHTTPConfig, OpenAIHTTPError

REQUEST = {"model": "m", "prompt": [1, 2], "max_tokens": 4}


def _run(coro):
    return asyncio.run(coro)


def test_retries_transient_statuses_then_succeeds():
    with ScriptedOpenAI(completions=in_order(Status(429), Status(503, "down"), TokenReply([5, 6]))) as server:

        async def go():
            async with OpenAIHTTP(server.url, max_retries=3) as http:
                return await http.completion(**REQUEST)

        answer = _run(go())
        assert answer.choices[0].model_extra["token_ids"] == [5, 6]
        assert server.statuses == [429, 503, 200]
        assert [r.body for r in server.requests] == [REQUEST] * 3


def test_gives_up_after_last_retry_with_clear_error():
    with ScriptedOpenAI(completions=in_order(Status(500, '{"error": "boom"}'))) as server:

        async def go():
            async with OpenAIHTTP(server.url, max_retries=2) as http:
                await http.completion(**REQUEST)

        with pytest.raises(OpenAIHTTPError) as info:
            _run(go())
        assert isinstance(info.value, EngineError)
        assert info.value.status == 500 and info.value.attempts == 3
        assert "after 3 attempt(s)" in str(info.value) and "boom" in str(info.value)
        assert len(server.requests) == 3


def test_client_errors_are_not_retried():
    with ScriptedOpenAI(completions=in_order(Status(400, '{"error": "bad prompt"}'))) as server:

        async def go():
            async with OpenAIHTTP(server.url, max_retries=5) as http:
                await http.completion(**REQUEST)

        with pytest.raises(OpenAIHTTPError, match="HTTP 400 .*not retried.*bad prompt"):
            _run(go())
        assert len(server.requests) == 1


def test_timeout_is_retried_then_reported():
    with ScriptedOpenAI(completions=in_order(Slow(1.0, TokenReply([1])))) as server:

        async def go():
            async with OpenAIHTTP(server.url, max_retries=1, timeout_s=0.2) as http:
                await http.completion(**REQUEST)

        with pytest.raises(OpenAIHTTPError, match="after 2 attempt.*timed out after 0.2 s"):
            _run(go())
        assert len(server.requests) == 2


def test_connection_refused_is_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        async with OpenAIHTTP(f"http://127.0.0.1:{port}", max_retries=1) as http:
            await http.completion(**REQUEST)

    with pytest.raises(OpenAIHTTPError, match="connection error.*Check that the server is up"):
        _run(go())


def test_an_answer_that_is_not_json_is_a_clear_error():
    with ScriptedOpenAI(completions=in_order(Answer("<html>proxy error</html>"))) as server:

        async def go():
            async with OpenAIHTTP(server.url) as http:
                await http.completion(**REQUEST)

        with pytest.raises(OpenAIHTTPError, match="not JSON.*proxy error"):
            _run(go())


def test_concurrency_limit_holds():
    with ScriptedOpenAI(completions=in_order(Slow(0.15, TokenReply([1])))) as server:

        async def go():
            async with OpenAIHTTP(server.url, max_concurrency=2) as http:
                return await asyncio.gather(*(http.completion(**REQUEST, user=f"u{i}") for i in range(6)))

        assert len(_run(go())) == 6
        assert server.max_in_flight == 2


def test_api_key_from_env_headers_and_v1_base(monkeypatch):
    monkeypatch.setenv("TW_TEST_KEY", "sekret")
    with ScriptedOpenAI(completions=in_order(TokenReply([1]))) as server:
        root = server.url.removesuffix("/v1")

        async def go(base_url, **kw):
            cfg = OpenAIHTTPConfig(base_url=base_url, **kw)
            async with OpenAIHTTP(cfg) as http:
                await http.completion(**REQUEST)

        _run(go(root + "/v1/", api_key_env="TW_TEST_KEY", headers={"X-Team": "tw"}))
        _run(go(root))  # no key: the placeholder, which local servers ignore
        first, second = server.requests
        assert first.path == second.path == "/v1/completions"
        assert first.headers["Authorization"] == "Bearer sekret" and first.headers["X-Team"] == "tw"
        assert second.headers["Authorization"] == "Bearer EMPTY"


def test_missing_api_key_env_is_an_error(monkeypatch):
    monkeypatch.delenv("TW_TEST_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="TW_TEST_MISSING_KEY.*not set"):
        OpenAIHTTP(OpenAIHTTPConfig(api_key_env="TW_TEST_MISSING_KEY"))


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError, match="unknown OpenAIHTTP settings"):
        OpenAIHTTP("http://127.0.0.1:1", max_concurency=3)
