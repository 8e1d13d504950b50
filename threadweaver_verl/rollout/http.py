"""The client for OpenAI-compatible servers (vLLM, SGLang, hosted APIs): the ``openai`` SDK's
``AsyncOpenAI``, built from one config, shared by the rollout engine
(:mod:`threadweaver_verl.rollout.openai_engine`, ``/v1/completions`` with token-id prompts) and the
data generator's chat client (:mod:`threadweaver_verl.generator.llm`, ``/v1/chat/completions``).

The SDK does the transport: per-request timeouts, retries with exponential backoff and jitter on
transient failures (HTTP 408/409/429/5xx, timeouts, connection errors; it honours ``Retry-After``
up to two minutes), typed errors, and ``extra_body`` / ``extra_headers`` for fields the OpenAI spec
does not name. This module adds:

- :class:`OpenAIHTTPConfig`, the connection settings (the one place their defaults live);
- the API key read from an environment variable only (never from a config value, so no secret lands
  in a config or a log);
- a concurrency limit (one semaphore per client, shared by every call); the SDK has none;
- one clear :class:`OpenAIHTTPError` after the last try, naming the URL, the attempts made, the HTTP
  status and the start of the server's answer. It subclasses the rollout's ``EngineError``, so the
  controller fails a trajectory on it without knowing about HTTP.

vLLM's own fields travel through the SDK unchanged (checked against vLLM's CPU build in
``tests/test_rollout_openai_engine.py``): a token-id prompt is the SDK's ``prompt: list[int]``;
``return_token_ids``, ``stop_token_ids`` and the sampling extras go in ``extra_body``; the answer's
``choices[0].token_ids`` and ``stop_reason`` stay on the SDK's objects as extra fields
(``choice.model_extra``); the prefix-cache counter is the typed
``usage.prompt_tokens_details.cached_tokens``.

    http = OpenAIHTTP(OpenAIHTTPConfig(base_url="http://127.0.0.1:8000", max_concurrency=32))
    answer = await http.completion(model="m", prompt=[1, 2], max_tokens=8, extra_body={"return_token_ids": True})
    await http.aclose()
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import openai
from openai.types import Completion
from openai.types.chat import ChatCompletion

from threadweaver_verl.config import ConfigError
from threadweaver_verl.rollout.engine import EngineError

# HTTP statuses the SDK tries again: request timeout, conflict (some servers use it while loading),
# rate limit, and every server-side error. (Used to word the error; the SDK decides.)
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))

# The key sent when no api_key_env is set: local vLLM and SGLang servers ignore it (the SDK needs one).
NO_API_KEY = "EMPTY"

T = TypeVar("T")


@dataclass
class OpenAIHTTPConfig:
    """Connection settings of one OpenAI-compatible server."""

    base_url: str = "http://127.0.0.1:8000"
    """Server root, with or without a trailing ``/v1`` (``/v1`` is added when missing)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (sent as ``Authorization: Bearer``).
    None: no key (local vLLM/SGLang; the placeholder ``EMPTY`` is sent). Set but the variable missing:
    an error at construction."""
    max_concurrency: int = 64
    """Most requests in flight at once through this client (the rest wait on a semaphore)."""
    timeout_s: float = 600.0
    """Per-attempt timeout (connect, read, write, pool) in seconds."""
    max_retries: int = 4
    """Extra attempts after the first on a transient failure (0 = try once). The SDK waits between
    tries: 0.5 s doubling up to 8 s, less up to 25 % jitter, or what the server's ``Retry-After`` asks."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra headers sent with every request."""

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ConfigError(f"OpenAIHTTPConfig.max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_retries < 0:
            raise ConfigError(f"OpenAIHTTPConfig.max_retries must be >= 0 (0: try once), got {self.max_retries}")
        if self.timeout_s <= 0:
            raise ConfigError(f"OpenAIHTTPConfig.timeout_s must be > 0 seconds, got {self.timeout_s}")


class OpenAIHTTPError(EngineError):
    """A request failed for good: a non-retryable status, or the last retry failed."""

    def __init__(self, message: str, *, url: str, status: int | None = None, attempts: int = 1, body: str = ""):
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts
        self.body = body


def v1_url(base_url: str) -> str:
    """``base_url`` ending in ``/v1`` (the SDK appends ``/completions``, ``/chat/completions``, ...)."""
    base = base_url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class OpenAIHTTP:
    """``AsyncOpenAI`` with a concurrency limit and :class:`OpenAIHTTPError`. One per server and event loop."""

    def __init__(self, config: OpenAIHTTPConfig | str | None = None, **overrides: Any):
        """``config`` may be an :class:`OpenAIHTTPConfig`, or a base URL string; keyword overrides
        (``max_concurrency=8``, ``timeout_s=30``, ...) replace single fields."""
        if config is None:
            config = OpenAIHTTPConfig()
        elif isinstance(config, str):
            config = OpenAIHTTPConfig(base_url=config)
        if overrides:
            unknown = set(overrides) - set(OpenAIHTTPConfig.__dataclass_fields__)
            if unknown:
                raise TypeError(
                    f"unknown OpenAIHTTP settings {sorted(unknown)}; known: "
                    f"{sorted(OpenAIHTTPConfig.__dataclass_fields__)}"
                )
            config = OpenAIHTTPConfig(**{**config.__dict__, **overrides})
        self.config = config
        api_key = NO_API_KEY
        if config.api_key_env:
            api_key = os.environ.get(config.api_key_env, "")
            if not api_key:
                raise ConfigError(
                    f"api_key_env={config.api_key_env!r} names an environment variable that is not set; "
                    f"export {config.api_key_env}=... or set api_key_env=null for a server without a key"
                )
        self.base_url = v1_url(config.base_url)
        self.client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=self.base_url,
            timeout=config.timeout_s,
            max_retries=config.max_retries,
            default_headers=dict(config.headers) or None,
        )
        self._semaphore = asyncio.Semaphore(config.max_concurrency)

    async def completion(self, **params: Any) -> Completion:
        """``client.completions.create(**params)`` (``POST /v1/completions``)."""
        return await self._call(self.client.completions.create, "/completions", **params)

    async def chat_completion(self, **params: Any) -> ChatCompletion:
        """``client.chat.completions.create(**params)`` (``POST /v1/chat/completions``)."""
        return await self._call(self.client.chat.completions.create, "/chat/completions", **params)

    async def _call(self, create: Callable[..., Awaitable[T]], path: str, **params: Any) -> T:
        """Run one SDK call under the concurrency limit; its failures become :class:`OpenAIHTTPError`."""
        url = self.base_url + path
        async with self._semaphore:
            try:
                answer = await create(**params)
            except openai.APIStatusError as e:
                raise self._status_error(url, e) from e
            except openai.APITimeoutError as e:
                raise self._gave_up(url, e, f"timed out after {self.config.timeout_s:g} s") from e
            except openai.APIConnectionError as e:
                cause = e.__cause__
                raise self._gave_up(url, e, f"connection error: {type(cause).__name__}: {cause}") from e
            except json.JSONDecodeError as e:  # a JSON content type with a body that is not JSON
                raise OpenAIHTTPError(
                    f"POST {url} answered with a body that is not JSON: {e.doc[:300]!r}", url=url
                ) from e
        if isinstance(answer, str):  # the SDK hands back a body of another content type as text
            raise OpenAIHTTPError(f"POST {url} answered with a body that is not JSON: {answer[:300]!r}", url=url)
        return answer

    def _status_error(self, url: str, e: openai.APIStatusError) -> OpenAIHTTPError:
        status, text = e.status_code, e.response.text
        attempts = _attempts(e.response.request)
        if status not in RETRY_STATUSES:
            message = f"POST {url} failed with HTTP {status} (not retried): {text[:500]}"
        else:
            message = (
                f"POST {url} failed after {attempts} attempt(s); last error: HTTP {status}: {text[:500]}. "
                f"Check that the server is up at {self.config.base_url} (or raise max_retries/timeout_s)."
            )
        return OpenAIHTTPError(message, url=url, status=status, attempts=attempts, body=text)

    def _gave_up(self, url: str, e: openai.APIConnectionError, last: str) -> OpenAIHTTPError:
        attempts = _attempts(e.request)
        return OpenAIHTTPError(
            f"POST {url} failed after {attempts} attempt(s); last error: {last}. "
            f"Check that the server is up at {self.config.base_url} (or raise max_retries/timeout_s).",
            url=url,
            attempts=attempts,
        )

    async def aclose(self) -> None:
        await self.client.close()

    async def __aenter__(self) -> OpenAIHTTP:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def _attempts(request: Any) -> int:
    """Tries made for ``request``: the SDK numbers its retries in the ``x-stainless-retry-count`` header."""
    return int(request.headers.get("x-stainless-retry-count", 0)) + 1
