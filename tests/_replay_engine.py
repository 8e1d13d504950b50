"""An engine that replays finished trajectories, request by request, as fork/join inference asks for them:
each request's context gets, at once, the completion :func:`split_requests` gives for that context.

Used by tests/test_rollout_controller.py (the controller rebuilds each trajectory and issues exactly the
splitter's requests) and benchmarks/bench_controller.py (the controller's own CPU time: answering costs
the engine one dict lookup).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from threadweaver_verl.format import TokenFormat, split_requests
from threadweaver_verl.rollout.engine import Completion, EngineError, Finish

_KEY_TAIL = 16


def _key(routing_key: str, context: Sequence[int]) -> tuple[str, int, tuple[int, ...]]:
    """The trajectory, the context's length and its last ids: enough to tell a trajectory's requests apart
    (checked when the engine is built), and cheap, so that the engine's time stays negligible next to the
    controller's."""
    return routing_key, len(context), tuple(context[-_KEY_TAIL:])


class ReplayEngine:
    """Answers the requests of the trajectories it was given, ``routing key -> (prompt_ids, response_ids)``
    (each a valid trajectory in the layout inference produces, run with that routing key); a request it
    does not know is an :class:`EngineError`. ``requests[routing key]`` are the splitter's requests."""

    def __init__(self, fmt: TokenFormat, trajectories: Mapping[str, tuple[Sequence[int], Sequence[int]]]):
        self.answers: dict[tuple[str, int, tuple[int, ...]], list[int]] = {}
        self.requests = {k: split_requests(list(p), list(r), fmt) for k, (p, r) in trajectories.items()}
        for routing_key, requests in self.requests.items():
            for req in requests:
                key = _key(routing_key, req.context_ids)
                if self.answers.setdefault(key, list(req.completion_ids)) != list(req.completion_ids):
                    raise ValueError(
                        f"trajectory {routing_key!r}: two requests end their contexts with the same {_KEY_TAIL} "
                        "ids at the same length but want different completions"
                    )
        self.calls = 0

    async def complete(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        stop_token_ids: Sequence[int],
        routing_key: str,
        sampling: dict[str, Any] | None = None,
    ) -> Completion:
        self.calls += 1
        ids = self.answers.get(_key(routing_key, prompt_ids))
        if ids is None:
            raise EngineError(
                f"replay: trajectory {routing_key!r} has no request with this context ({len(prompt_ids)} ids)"
            )
        if len(ids) > max_tokens:
            return Completion(ids[:max_tokens], Finish.LENGTH)
        return Completion(list(ids), Finish.STOP if ids and ids[-1] in stop_token_ids else Finish.LENGTH)
