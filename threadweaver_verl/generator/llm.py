"""Stage 1's chat client: any OpenAI-compatible ``/v1/chat/completions`` API.

Transport is the ``openai`` SDK's client as the rollout uses it,
:class:`threadweaver_verl.rollout.http.OpenAIHTTP` (concurrency limit, timeouts,
retries with backoff on 429/5xx and timeouts, the API key from an environment
variable). The request body on the wire is :meth:`ChatLLM.payload` (model and
messages by name, every other field in the SDK's ``extra_body``). This module adds:

* a persistent request cache (sqlite, one committed row per answered call):
  the key is a hash of model + messages + every other request parameter, so a
  rerun, or a resumed run after a crash, never pays twice for the same call;
  identical calls in flight at the same time are sent once;
* usage accounting: calls, cache hits, prompt/completion tokens (and the tokens
  the cache saved), and the cost when prices are given.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openai.types.chat import ChatCompletion

from threadweaver_verl.config import ConfigError
from threadweaver_verl.rollout.http import OpenAIHTTP, OpenAIHTTPConfig


def _default_http() -> OpenAIHTTPConfig:
    return OpenAIHTTPConfig(
        base_url="https://api.openai.com/v1",
        api_key_env="OPENAI_API_KEY",
        max_concurrency=8,
        timeout_s=300.0,
        max_retries=6,
    )


@dataclass
class LLMConfig:
    """The rewriting LLM and how it is called."""

    model: str = ""
    """Model name sent to the API (required)."""
    http: OpenAIHTTPConfig = field(default_factory=_default_http)
    """Server URL, API-key environment variable, concurrency, timeout and retries (see rollout.http)."""
    temperature: float | None = None
    """Sampling temperature; None: not sent (some reasoning models reject it)."""
    max_tokens: int | None = None
    """Answer length limit; None: not sent. Sent under the name ``max_tokens_field``."""
    max_tokens_field: str = "max_tokens"
    """``max_tokens`` for most servers; ``max_completion_tokens`` for OpenAI reasoning models."""
    json_mode: bool = False
    """Send ``response_format: {type: json_object}`` (only for servers that support it)."""
    extra_params: dict[str, Any] = field(default_factory=dict)
    """Further request fields, sent as they are (e.g. ``reasoning_effort``). Part of the cache key."""
    cache_path: str | None = None
    """Request cache file (sqlite); None: ``llm_cache.sqlite`` in the output folder. Share it between runs
    to never pay twice."""
    price_prompt_per_mtok: float | None = None
    """Price of one million prompt tokens; with the completion price, the summary reports the cost."""
    price_completion_per_mtok: float | None = None
    """Price of one million completion tokens."""

    def __post_init__(self) -> None:
        clash = sorted(k for k in self.extra_params if k == "messages" or k in self.request_fields())
        if clash:
            raise ConfigError(f"llm.extra_params sets {clash}, which have their own settings; set them there instead")

    def request_fields(self) -> dict[str, Any]:
        """The request fields these settings set themselves (``messages`` and ``extra_params`` aside)."""
        body: dict[str, Any] = {"model": self.model}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            body[self.max_tokens_field] = self.max_tokens
        if self.json_mode:
            body["response_format"] = {"type": "json_object"}
        return body


class LLMError(RuntimeError):
    """The API answered, but not with a chat completion (after the transport's retries)."""


@dataclass
class ChatReply:
    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached: bool  # served from the request cache (nothing paid)


@dataclass
class Usage:
    """Counts for one run (cache hits cost nothing and are counted apart)."""

    calls: int = 0  # answered API calls (paid)
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    saved_prompt_tokens: int = 0  # tokens the cache hits would have cost
    saved_completion_tokens: int = 0
    price_prompt_per_mtok: float | None = None
    price_completion_per_mtok: float | None = None

    def add(self, reply: ChatReply) -> None:
        if reply.cached:
            self.cache_hits += 1
            self.saved_prompt_tokens += reply.prompt_tokens
            self.saved_completion_tokens += reply.completion_tokens
        else:
            self.calls += 1
            self.prompt_tokens += reply.prompt_tokens
            self.completion_tokens += reply.completion_tokens

    def _cost(self, prompt: int, completion: int) -> float | None:
        if self.price_prompt_per_mtok is None or self.price_completion_per_mtok is None:
            return None
        return (prompt * self.price_prompt_per_mtok + completion * self.price_completion_per_mtok) / 1e6

    @property
    def cost(self) -> float | None:
        return self._cost(self.prompt_tokens, self.completion_tokens)

    @property
    def saved_cost(self) -> float | None:
        return self._cost(self.saved_prompt_tokens, self.saved_completion_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "cache_hits": self.cache_hits,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "saved_prompt_tokens": self.saved_prompt_tokens,
            "saved_completion_tokens": self.saved_completion_tokens,
            "cost": self.cost,
            "saved_cost": self.saved_cost,
        }


class RequestCache:
    """model+messages+params -> answer, in sqlite (each put is one committed transaction)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=60.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, request TEXT NOT NULL, "
            "answer TEXT NOT NULL, created REAL NOT NULL)"
        )

    @staticmethod
    def key(payload: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT answer FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, payload: dict[str, Any], answer: dict[str, Any]) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?)",
            (key, json.dumps(payload, ensure_ascii=False), json.dumps(answer, ensure_ascii=False), time.time()),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def _reply_of(answer: dict[str, Any], cached: bool) -> ChatReply:
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise LLMError(f"the API answer has no choices: {json.dumps(answer)[:300]}")
    message = choices[0].get("message") or {}
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise LLMError(f"the API answer's message content is {type(content).__name__}, not a string")
    usage = answer.get("usage") or {}
    return ChatReply(
        content or "",
        choices[0].get("finish_reason"),
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or 0),
        cached,
    )


class ChatLLM:
    """``await llm.chat(messages)`` -> :class:`ChatReply`; cached, retried, accounted."""

    def __init__(self, config: LLMConfig, cache_path: str | Path, http: OpenAIHTTP | None = None):
        if not config.model:
            raise ConfigError("llm.model is not set: name the model to call, e.g. llm.model=gpt-5")
        self.config = config
        self.http = http or OpenAIHTTP(config.http)
        self.cache = RequestCache(cache_path)
        self.usage = Usage(
            price_prompt_per_mtok=config.price_prompt_per_mtok,
            price_completion_per_mtok=config.price_completion_per_mtok,
        )
        self._inflight: dict[str, asyncio.Future] = {}

    def payload(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        return {**self.config.request_fields(), "messages": messages, **self.config.extra_params}

    async def chat(self, messages: list[dict[str, str]]) -> ChatReply:
        body = self.payload(messages)
        key = RequestCache.key(body)
        hit = self.cache.get(key)
        if hit is not None:
            reply = _reply_of(hit, cached=True)
            self.usage.add(reply)
            return reply
        if key in self._inflight:  # the same call is already on its way: share its answer
            answer = await asyncio.shield(self._inflight[key])
            reply = _reply_of(answer, cached=True)
            self.usage.add(reply)
            return reply
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            answer = await self._send(body)
            reply = _reply_of(answer, cached=False)  # checks the shape before it is cached
            self.cache.put(key, body, answer)
            fut.set_result(answer)
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            del self._inflight[key]
        self.usage.add(reply)
        return reply

    async def _send(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` as it is; the answer as the server sent it (a JSON object)."""
        rest = dict(body)
        completion = await self.http.chat_completion(
            model=rest.pop("model"), messages=rest.pop("messages"), extra_body=rest
        )
        if not isinstance(completion, ChatCompletion):
            raise LLMError(f"the API answered {type(completion).__name__}, not a chat completion object")
        return completion.to_dict(mode="json")

    async def aclose(self) -> None:
        await self.http.aclose()
        self.cache.close()
