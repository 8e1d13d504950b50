"""An engine whose main line is scripted, for tests and benchmarks on a real server: the script
decides where the trajectory forks (a fixed outline block) and, optionally, that it ends after the
join (EOS); the real engine writes every thread.

Used by tests/test_rollout_vllm.py and benchmarks/bench_rollout.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from threadweaver_verl.rollout.engine import Completion, Engine, Finish


class SteeredEngine:
    """``real``, except the main line's first answers: they are ``main_answers``, in order. A main-line
    request is one whose stops lack ``thread_close_id`` (a thread stops on ``</Thread>``); once the
    answers are used up, the real engine writes the main line too.

    ``prefill``: before each scripted answer, send a one-token request on context + answer, so the
    server reads the answer and its prefix cache holds it exactly as if the model had written it."""

    def __init__(self, real: Engine, main_answers: Sequence[Sequence[int]], *, thread_close_id: int, prefill: bool):
        self.real = real
        self.main_answers = [list(a) for a in main_answers]
        self.thread_close_id = thread_close_id
        self.prefill = prefill

    async def complete(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        stop_token_ids: Sequence[int],
        routing_key: str,
        sampling: dict[str, Any] | None = None,
    ) -> Completion:
        if self.thread_close_id not in stop_token_ids and self.main_answers:
            answer = self.main_answers.pop(0)
            if self.prefill:
                await self.real.complete(
                    [*prompt_ids, *answer], max_tokens=1, stop_token_ids=[], routing_key=routing_key, sampling=sampling
                )
            return Completion(list(answer), Finish.STOP)
        return await self.real.complete(
            prompt_ids, max_tokens=max_tokens, stop_token_ids=stop_token_ids, routing_key=routing_key, sampling=sampling
        )
