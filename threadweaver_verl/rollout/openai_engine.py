"""The :class:`~threadweaver_verl.rollout.engine.Engine` over an OpenAI-compatible ``/v1/completions``
route with token-id prompts: vLLM's and SGLang's servers, or anything else that speaks it. A thin
adapter over the ``openai`` SDK's client (:class:`~threadweaver_verl.rollout.http.OpenAIHTTP`): the
OpenAI fields go by name, the server's own fields and the sampling settings in ``extra_body``.

Request fields sent (one choice, no streaming)::

    prompt          list[int]      the context ids (no re-tokenization anywhere)
    max_tokens      int            from the controller's budgets
    stop_token_ids  list[int]      the controller's stops (</Outlines>, </Thread>, EOS)
    logprobs        0              when log-probs are wanted: the sampled token's log-prob only
    user            routing key    (also sent as the ``routing_header`` HTTP header)
    return_token_ids true          vLLM >= 0.10.2 and SGLang both return ``choices[0].token_ids``
    skip_special_tokens false      keep the tags / EOS in the text too (the ids are what counts)
    + every sampling setting given (temperature, top_p, top_k, min_p, repetition_penalty, ...)

Server specifics (``server`` setting):

- ``vllm``: the stop token id is the last returned id; ``stop_reason`` names it.
  Cached prompt tokens come back in ``usage.prompt_tokens_details.cached_tokens`` when the
  server runs with ``--enable-prompt-tokens-details`` (and ``--enable-prefix-caching``).
- ``sglang``: also sends ``no_stop_trim: true`` so the stop token is kept; ``matched_stop``
  names it (appended when a version still trims it, if no log-probs were asked for: the
  trimmed token's log-prob is missing). Cached tokens need ``--enable-cache-report``.
- ``generic``: only the standard fields plus ``stop_token_ids`` and ``return_token_ids``.

Nothing is dropped or guessed: an answer without one log-prob per token id when log-probs were asked
for, or with a ``finish_reason`` other than ``stop``, ``length`` or ``abort``, is an
:class:`~threadweaver_verl.rollout.engine.EngineError` naming what came back.

Do not set ``X-Request-Id`` for routing: vLLM uses it as the request id, and the threads of one
trajectory are in flight at once. The routing key goes in ``user`` and ``routing_header``.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import openai
from openai.types import Completion as OpenAICompletion
from openai.types import CompletionChoice

from threadweaver_verl.config import ConfigError
from threadweaver_verl.rollout.engine import Completion, EngineError, Finish
from threadweaver_verl.rollout.http import OpenAIHTTP, OpenAIHTTPConfig


class Server(enum.StrEnum):
    """``OpenAIEngineConfig.server``: which server's own request fields are sent (see the module doc)."""

    VLLM = "vllm"
    SGLANG = "sglang"
    GENERIC = "generic"


# Settings the engine itself owns; a sampling dict may not override them.
_OWNED = frozenset({"prompt", "max_tokens", "stop_token_ids", "n", "stream", "echo", "model", "user"})


@dataclass
class OpenAIEngineConfig:
    """Where and how to reach the server, and what to ask it for."""

    http: OpenAIHTTPConfig = field(default_factory=OpenAIHTTPConfig)
    """Server URL (``/v1`` suffix optional), API-key variable, concurrency, timeout and retries."""
    model: str | None = None
    """Served model name; None sends no ``model`` field (vLLM and SGLang then use the one they serve)."""
    server: str = Server.VLLM.value
    """``vllm``, ``sglang`` or ``generic``: which extra request fields are sent (see the module doc)."""
    routing_header: str | None = "X-Routing-Key"
    """HTTP header carrying the trajectory's routing key (for a sticky router); None: only ``user``."""
    logprobs: bool = True
    """Ask for the sampled tokens' log-probs (``logprobs: 0``); the answer must then carry one per token."""

    def __post_init__(self) -> None:
        if self.server not in tuple(Server):
            raise ConfigError(f"OpenAIEngineConfig.server={self.server!r}: choose one of {[s.value for s in Server]}")


# The finish_reason values of /v1/completions the engine knows (the server names them as Finish does).
_FINISH = {f.value: f for f in (Finish.STOP, Finish.LENGTH, Finish.ABORT)}


class OpenAICompletionsEngine:
    """Engine over ``/v1/completions``. One instance per event loop; ``await aclose()`` when done."""

    def __init__(
        self, config: OpenAIEngineConfig | None = None, *, base_url: str | None = None, http: OpenAIHTTP | None = None
    ):
        """``base_url`` replaces ``config.http.base_url``; ``http`` shares a client (its settings then win)."""
        cfg = config or OpenAIEngineConfig()
        if base_url is not None:
            cfg = replace(cfg, http=replace(cfg.http, base_url=base_url))
        self.config = cfg
        self.http = http or OpenAIHTTP(cfg.http)

    def request(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        stop_token_ids: Sequence[int],
        routing_key: str,
        sampling: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The arguments of ``completions.create`` for one request (public for tests and debugging)."""
        sampling = dict(sampling or {})
        clash = sorted(_OWNED & set(sampling))
        if clash:
            raise ValueError(f"sampling sets {clash}, which the engine sets itself per request; remove them")
        want_logprobs = sampling.pop("logprobs", self.config.logprobs)
        extra_body: dict[str, Any] = {"stop_token_ids": [int(i) for i in stop_token_ids], "return_token_ids": True}
        if self.config.server in (Server.VLLM, Server.SGLANG):
            extra_body["skip_special_tokens"] = False
        if self.config.server == Server.SGLANG:
            extra_body["no_stop_trim"] = True
        extra_body.update(sampling)
        params: dict[str, Any] = {
            "model": self.config.model or openai.omit,
            "prompt": [int(i) for i in prompt_ids],
            "max_tokens": int(max_tokens),
            "n": 1,
            "stream": False,
            "user": routing_key,
            "extra_body": extra_body,
        }
        if want_logprobs is not None and want_logprobs is not False:
            params["logprobs"] = 0
        if self.config.routing_header:
            params["extra_headers"] = {self.config.routing_header: routing_key}
        return params

    async def complete(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        stop_token_ids: Sequence[int],
        routing_key: str,
        sampling: dict[str, Any] | None = None,
    ) -> Completion:
        params = self.request(
            prompt_ids, max_tokens=max_tokens, stop_token_ids=stop_token_ids, routing_key=routing_key, sampling=sampling
        )
        answer = await self.http.completion(**params)
        return self.parse(answer, stop_token_ids, logprobs="logprobs" in params)

    def parse(self, answer: OpenAICompletion, stop_token_ids: Sequence[int], *, logprobs: bool) -> Completion:
        """Turn a ``/v1/completions`` answer into a Completion; ``logprobs``: whether they were asked for."""
        if not isinstance(answer, OpenAICompletion):
            raise EngineError(f"the server answered {type(answer).__name__}, not a completion object: {answer!r:.300}")
        if not answer.choices:
            raise EngineError(f"the server's answer has no choices[0]: {answer.to_json(indent=None)[:300]}")
        choice = answer.choices[0]
        server_fields = choice.model_extra or {}  # vLLM's and SGLang's own: token_ids, stop_reason, matched_stop
        ids = server_fields.get("token_ids")
        if ids is None:
            raise EngineError(
                "the server returned no choices[0].token_ids. The engine needs token ids back: vLLM >= 0.10.2 and "
                "SGLang support `return_token_ids`; for another server, pick one that returns them "
                f"(server setting is {self.config.server!r})"
            )
        ids = [int(i) for i in ids]
        finish_raw = choice.finish_reason
        if finish_raw not in _FINISH:
            raise EngineError(
                f"the server ended a completion with finish_reason={finish_raw!r}; the engine knows "
                f"{sorted(_FINISH)}. A server that reports another reason is not supported "
                f"(server setting is {self.config.server!r})"
            )
        finish = _FINISH[finish_raw]
        matched = server_fields.get("stop_reason", server_fields.get("matched_stop"))
        extra: dict[str, Any] = {"finish_reason": finish_raw}
        if (
            finish == Finish.STOP
            and isinstance(matched, int)
            and matched in set(stop_token_ids)
            and (not ids or ids[-1] != matched)
        ):
            if logprobs:
                raise EngineError(
                    f"the server trimmed the stop token {matched} from its answer, so that token's log-prob is "
                    "missing; use a server that keeps it (SGLang with no_stop_trim) or ask for no log-probs"
                )
            ids.append(matched)  # a server that trimmed the stop token: put it back
            extra["stop_token_restored"] = True
        cached = None
        details = answer.usage.prompt_tokens_details if answer.usage else None
        if details is not None and details.cached_tokens is not None:
            cached = int(details.cached_tokens)
        return Completion(
            token_ids=ids,
            finish=finish,
            logprobs=_logprobs(choice, len(ids)) if logprobs else None,
            cached_tokens=cached,
            extra=extra,
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> OpenAICompletionsEngine:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def _logprobs(choice: CompletionChoice, n_ids: int) -> list[float]:
    """The sampled tokens' log-probs, one per token id; anything else is an EngineError."""
    values = choice.logprobs.token_logprobs if choice.logprobs is not None else None
    if values is None:
        raise EngineError(
            "log-probs were asked for (logprobs: 0), but the answer has no choices[0].logprobs.token_logprobs; "
            "set logprobs=false (engine config or sampling) for a server that cannot return them"
        )
    missing = sum(v is None for v in values)
    if len(values) != n_ids or missing:
        raise EngineError(
            f"the answer has {len(values)} log-probs ({missing} of them null) for {n_ids} token ids; "
            "the engine needs one per token id"
        )
    return [float(v) for v in values]
