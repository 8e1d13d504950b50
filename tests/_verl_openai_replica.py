"""A stand-in for verl's vLLM replica server actor that forwards to a real vLLM OpenAI server.

verl 0.9.1 launches vLLM inside its own Ray actors (``vLLMHttpServer``), placed on the GPUs of a
worker group: that cannot start on a machine without accelerators. This Ray actor answers the same
``generate(prompt_ids, sampling_params, request_id, ...) -> TokenOutput`` call the way
``vLLMHttpServer.generate`` does (max_tokens popped and clamped to the context window, ``logprobs``
flag turned into the sampled token's log-prob, ``stop_reason`` "completed"/"aborted",
``extra_fields`` with ``global_steps`` and ``num_cached_tokens``), by sending the request to a real
vLLM server through the project's OpenAI-compatible engine. verl's own ``LLMServerClient`` and
router sit in front of it, unchanged. It also records every prompt it served (for routing checks).
"""

from __future__ import annotations

from typing import Any

from verl.workers.rollout.replica import TokenOutput

from threadweaver_verl.rollout.engine import Finish
from threadweaver_verl.rollout.openai_engine import OpenAICompletionsEngine, OpenAIEngineConfig


class OpenAIReplica:
    def __init__(self, base_url: str, max_model_len: int):
        self.base_url = base_url
        self.max_model_len = int(max_model_len)
        self.engine: OpenAICompletionsEngine | None = None
        self.global_steps: int | None = None
        self.served: list[list[int]] = []

    async def set_global_steps(self, global_steps: int) -> None:
        self.global_steps = global_steps

    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data=None,
        video_data=None,
        audio_data=None,
        mm_processor_kwargs=None,
        priority: int = 0,
        **kwargs: Any,
    ) -> TokenOutput:
        if self.engine is None:  # created in the actor's own event loop
            self.engine = OpenAICompletionsEngine(OpenAIEngineConfig(logprobs=False), base_url=self.base_url)
        params = dict(sampling_params)
        room = self.max_model_len - len(prompt_ids)
        if room < 1:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens leaves no room in max_model_len={self.max_model_len}")
        max_tokens = max(1, min(int(params.pop("max_tokens", room)), room))
        stops = params.pop("stop_token_ids", [])
        params["logprobs"] = bool(params.pop("logprobs", False))
        self.served.append([int(i) for i in prompt_ids])
        comp = await self.engine.complete(
            prompt_ids, max_tokens=max_tokens, stop_token_ids=stops, routing_key=request_id, sampling=params
        )
        extra = {"global_steps": self.global_steps, "num_cached_tokens": comp.cached_tokens}
        if comp.finish == Finish.ABORT:
            return TokenOutput(token_ids=[], stop_reason="aborted", extra_fields=extra)
        return TokenOutput(
            token_ids=comp.token_ids,
            log_probs=comp.logprobs if params["logprobs"] else None,
            stop_reason="completed",
            extra_fields=extra,
        )

    async def served_prompts(self) -> list[list[int]]:
        return self.served
