"""The small async engine interface the fork/join controller talks to.

Adapters: :mod:`threadweaver_verl.rollout.openai_engine` (any server speaking
``/v1/completions`` with token-id prompts: vLLM, SGLang, ...) and the verl
agent loop's adapter over verl's server manager. Tests may add scripted ones.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


class Finish(enum.StrEnum):
    """Why a completion ended. An engine reports STOP, LENGTH or ABORT (the controller decides from
    the returned ids too: verl reports "completed" for both a stop hit and the length limit); the
    controller's Requests also carry EOS and FORCED."""

    STOP = "stop"  # ended on one of stop_token_ids (the last returned id)
    LENGTH = "length"  # max_tokens reached
    ABORT = "abort"  # the engine gave up on the request
    EOS = "eos"  # (controller) the completion ended on EOS
    FORCED = "forced"  # (controller) no engine call: the completion is only controller-inserted closing ids


@dataclass
class Completion:
    token_ids: list[int]
    finish: Finish
    logprobs: list[float] | None = None  # one per token_id when the engine returns them (else None)
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache, if reported
    extra: dict[str, Any] = field(default_factory=dict)


class EngineError(RuntimeError):
    """The engine failed a request (after any retries the adapter does)."""


@runtime_checkable
class Engine(Protocol):
    async def complete(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        stop_token_ids: Sequence[int],
        routing_key: str,
        sampling: dict[str, Any] | None = None,
    ) -> Completion:
        """Generate after ``prompt_ids``; stop on any of ``stop_token_ids`` (kept as the last id)
        or after ``max_tokens``. Requests sharing ``routing_key`` belong to one trajectory and
        should reach one replica (prefix-cache affinity). ``sampling`` holds temperature,
        top_p, logprobs and the like."""
        ...
