"""The generic OpenAI-compatible HTTP client against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest
from _scripted_http import served  # noqa: F401  (fixture)

from threadweaver_verl.rollout.engine import EngineError
from threadweaver_verl.rollout.http import OpenAIHTTP, OpenAIHTTPConfig, OpenAIHTTPError


def _run(coro):
    return asyncio.run(coro)


def test_retries_transient_statuses_then_succeeds(served):
    script, url = served
    script.answers["/v1/completions"] = [(429, {"error": "slow down"}, 0), (503, "down", 0), (200, {"ok": 1}, 0)]

    async def go():
        async with OpenAIHTTP(url, max_retries=3, backoff_s=0.01) as http:
            answer = await http.post_json("/v1/completions", {"prompt": [1, 2]})
            return answer, http.attempts, http.retries

    answer, attempts, retries = _run(go())
    assert answer == {"ok": 1}
    assert (attempts, retries) == (3, 2)
    assert [s[1] for s in script.seen] == [{"prompt": [1, 2]}] * 3


def test_gives_up_after_last_retry_with_clear_error(served):
    script, url = served
    script.answers["/v1/completions"] = [(500, {"error": "boom"}, 0)]

    async def go():
        async with OpenAIHTTP(url, max_retries=2, backoff_s=0.01) as http:
            await http.post_json("/v1/completions", {})

    with pytest.raises(OpenAIHTTPError) as info:
        _run(go())
    assert isinstance(info.value, EngineError)
    assert info.value.status == 500 and info.value.attempts == 3
    assert "after 3 attempt(s)" in str(info.value) and "boom" in str(info.value)
    assert len(script.seen) == 3


def test_client_errors_are_not_retried(served):
    script, url = served
    script.answers["/v1/completions"] = [(400, {"error": "bad prompt"}, 0)]

    async def go():
        async with OpenAIHTTP(url, max_retries=5, backoff_s=0.01) as http:
            await http.post_json("/v1/completions", {})

    with pytest.raises(OpenAIHTTPError, match="HTTP 400 .*not retried.*bad prompt"):
        _run(go())
    assert len(script.seen) == 1


def test_timeout_is_retried_then_reported(served):
    script, url = served
    script.answers["/slow"] = [(200, {"late": True}, 1.0)]

    async def go():
        async with OpenAIHTTP(url, max_retries=1, backoff_s=0.01, timeout_s=0.2) as http:
            await http.post_json("/slow", {})

    with pytest.raises(OpenAIHTTPError, match="timed out after 0.2 s"):
        _run(go())
    assert len(script.seen) == 2


def test_connection_refused_is_reported():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def go():
        async with OpenAIHTTP(f"http://127.0.0.1:{port}", max_retries=1, backoff_s=0.01) as http:
            await http.get_json("/v1/models")

    with pytest.raises(OpenAIHTTPError, match="connection error.*Check that the server is up"):
        _run(go())


def test_concurrency_limit_holds(served):
    script, url = served
    script.answers["/v1/completions"] = [(200, {"ok": 1}, 0.15)]

    async def go():
        async with OpenAIHTTP(url, max_concurrency=2) as http:
            return await asyncio.gather(*(http.post_json("/v1/completions", {"i": i}) for i in range(6)))

    assert _run(go()) == [{"ok": 1}] * 6
    assert script.max_in_flight == 2


def test_api_key_from_env_and_v1_base(served, monkeypatch):
    script, url = served
    script.answers["/v1/models"] = [(200, {"data": []}, 0)]
    monkeypatch.setenv("TW_TEST_KEY", "sekret")

    async def go():
        cfg = OpenAIHTTPConfig(base_url=url + "/v1/", api_key_env="TW_TEST_KEY")
        async with OpenAIHTTP(cfg) as http:
            return await http.get_json("/v1/models")

    assert _run(go()) == {"data": []}
    path, _, headers = script.seen[0]
    assert path == "/v1/models"
    assert headers["Authorization"] == "Bearer sekret"


def test_missing_api_key_env_is_an_error(monkeypatch):
    monkeypatch.delenv("TW_TEST_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="TW_TEST_MISSING_KEY.*not set"):
        OpenAIHTTP(OpenAIHTTPConfig(api_key_env="TW_TEST_MISSING_KEY"))


def test_unknown_override_is_an_error():
    with pytest.raises(TypeError, match="unknown OpenAIHTTP settings"):
        OpenAIHTTP("http://127.0.0.1:1", max_concurency=3)
