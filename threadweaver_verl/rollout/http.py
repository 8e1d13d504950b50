"""A small async HTTP client for OpenAI-compatible servers (vLLM, SGLang, hosted APIs).

It is transport only: callers build the JSON payload for the route they use
(``/v1/completions`` in :mod:`threadweaver_verl.rollout.openai_engine`,
``/v1/chat/completions`` in the data generator) and read the JSON answer.

What it adds over a bare ``httpx.AsyncClient``:

- a concurrency limit (one semaphore per client, shared by every call);
- a per-request timeout;
- retries with exponential backoff and full jitter on transient failures
  (HTTP 408/409/429/5xx, timeouts, connection errors), honouring ``Retry-After``;
- one clear :class:`OpenAIHTTPError` after the last try, naming the URL, the
  attempts made, the HTTP status and the start of the server's answer;
- an optional API key read from an environment variable (never from a file or
  a config value, so no secret lands in a config or a log).

    http = OpenAIHTTP(OpenAIHTTPConfig(base_url="http://127.0.0.1:8000", max_concurrency=32))
    answer = await http.post_json("/v1/completions", {"model": "m", "prompt": [1, 2], "max_tokens": 8})
    await http.aclose()

``OpenAIHTTPError`` subclasses the rollout's ``EngineError`` so the controller
fails a trajectory on it without knowing about HTTP.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from threadweaver_verl.rollout.engine import EngineError

# HTTP statuses worth another try: request timeout, conflict (some servers use it
# while loading), rate limit, and every server-side error.
RETRY_STATUSES = frozenset({408, 409, 429}) | frozenset(range(500, 600))


@dataclass
class OpenAIHTTPConfig:
    """Connection settings of one OpenAI-compatible server."""

    base_url: str = "http://127.0.0.1:8000"
    """Server root, with or without a trailing ``/v1`` (paths passed to ``post_json`` start with ``/v1/...``;
    a base ending in ``/v1`` is accepted and the duplicate dropped)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key (sent as ``Authorization: Bearer``).
    None: no key (local vLLM/SGLang). Set but the variable missing: an error at construction."""
    max_concurrency: int = 64
    """Most requests in flight at once through this client (the rest wait on a semaphore)."""
    timeout_s: float = 600.0
    """Per-attempt timeout (connect, read, write, pool) in seconds."""
    max_retries: int = 4
    """Extra attempts after the first on a transient failure (0 = try once)."""
    backoff_s: float = 0.5
    """Base of the exponential backoff: before retry i (1-based) sleep uniform(0, backoff_s * 2**(i-1)),
    capped at ``max_backoff_s``; a server's ``Retry-After`` is honoured when longer."""
    max_backoff_s: float = 30.0
    """Upper bound of one backoff sleep."""
    headers: dict[str, str] = field(default_factory=dict)
    """Extra headers sent with every request."""


class OpenAIHTTPError(EngineError):
    """A request failed for good: a non-retryable status, or the last retry failed."""

    def __init__(self, message: str, *, url: str, status: int | None = None, attempts: int = 1, body: str = ""):
        super().__init__(message)
        self.url = url
        self.status = status
        self.attempts = attempts
        self.body = body


def _join_url(base_url: str, path: str) -> str:
    base = base_url.rstrip("/")
    if not path.startswith("/"):
        path = "/" + path
    if base.endswith("/v1") and path.startswith("/v1/"):
        path = path[3:]
    return base + path


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIHTTP:
    """Async JSON client with a concurrency limit, timeouts and retries. Use one per server and event loop."""

    def __init__(
        self,
        config: OpenAIHTTPConfig | str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **overrides: Any,
    ):
        """``config`` may be an :class:`OpenAIHTTPConfig`, or a base URL string; keyword overrides
        (``max_concurrency=8``, ``timeout_s=30``, ...) replace single fields. ``transport`` is for
        tests that serve the API in-process."""
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
        if config.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {config.max_concurrency}")
        if config.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {config.max_retries}")
        if config.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {config.timeout_s}")
        self.config = config
        headers = {"Content-Type": "application/json", **config.headers}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ValueError(
                    f"api_key_env={config.api_key_env!r} names an environment variable that is not set; "
                    f"export {config.api_key_env}=... or set api_key_env=null for a server without a key"
                )
            headers["Authorization"] = f"Bearer {key}"
        self._semaphore = asyncio.Semaphore(config.max_concurrency)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s),
            headers=headers,
            transport=transport,
            limits=httpx.Limits(
                max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency
            ),
        )
        self.attempts = 0  # every HTTP attempt made (retries included)
        self.retries = 0  # attempts that were retries

    def url(self, path: str) -> str:
        return _join_url(self.config.base_url, path)

    def _backoff(self, retry: int, response: httpx.Response | None) -> float:
        cap = min(self.config.max_backoff_s, self.config.backoff_s * (2 ** (retry - 1)))
        delay = random.uniform(0.0, cap)
        if response is not None:
            hinted = _retry_after_s(response)
            if hinted is not None:
                delay = max(delay, min(hinted, self.config.max_backoff_s))
        return delay

    async def request_json(
        self, method: str, path: str, payload: Any = None, headers: Mapping[str, str] | None = None
    ) -> Any:
        """Send one request (retrying transient failures) and return the decoded JSON answer."""
        url = self.url(path)
        attempts = self.config.max_retries + 1
        last: str = ""
        last_status: int | None = None
        last_body = ""
        for attempt in range(1, attempts + 1):
            response: httpx.Response | None = None
            try:
                async with self._semaphore:
                    self.attempts += 1
                    if attempt > 1:
                        self.retries += 1
                    response = await self._client.request(method, url, json=payload, headers=dict(headers or {}))
            except httpx.TimeoutException as e:
                last, last_status, last_body = (
                    f"timed out after {self.config.timeout_s:g} s ({type(e).__name__})",
                    None,
                    "",
                )
            except httpx.TransportError as e:  # connection refused/reset, protocol errors
                last, last_status, last_body = f"connection error: {type(e).__name__}: {e}", None, ""
            else:
                if response.status_code < 400:
                    try:
                        return response.json()
                    except ValueError as e:
                        raise OpenAIHTTPError(
                            f"{method} {url} answered {response.status_code} with a body that is not JSON: "
                            f"{response.text[:300]!r}",
                            url=url,
                            status=response.status_code,
                            attempts=attempt,
                            body=response.text,
                        ) from e
                last_status, last_body = response.status_code, response.text
                last = f"HTTP {response.status_code}: {response.text[:500]}"
                if response.status_code not in RETRY_STATUSES:
                    raise OpenAIHTTPError(
                        f"{method} {url} failed with HTTP {response.status_code} (not retried): {response.text[:500]}",
                        url=url,
                        status=response.status_code,
                        attempts=attempt,
                        body=response.text,
                    )
            if attempt < attempts:
                await asyncio.sleep(self._backoff(attempt, response))
        raise OpenAIHTTPError(
            f"{method} {url} failed after {attempts} attempt(s); last error: {last}. "
            f"Check that the server is up at {self.config.base_url} (or raise max_retries/timeout_s).",
            url=url,
            status=last_status,
            attempts=attempts,
            body=last_body,
        )

    async def post_json(self, path: str, payload: Any, headers: Mapping[str, str] | None = None) -> Any:
        """POST ``payload`` as JSON to ``path`` (e.g. ``/v1/completions``); return the JSON answer."""
        return await self.request_json("POST", path, payload, headers)

    async def get_json(self, path: str, headers: Mapping[str, str] | None = None) -> Any:
        """GET ``path`` (e.g. ``/v1/models``); return the JSON answer."""
        return await self.request_json("GET", path, None, headers)

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> OpenAIHTTP:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
