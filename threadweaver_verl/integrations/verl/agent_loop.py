"""The verl agent loop ``threadweaver``: fork/join rollout inside verl 0.9.1's V1 trainer.

Selected by config only: the RL dataset sets ``agent_name=threadweaver`` on every
row (or ``actor_rollout_ref.rollout.agent.default_agent_loop=threadweaver``), and
``actor_rollout_ref.rollout.agent.agent_loop_config_path=configs/agent_loop.yaml``
passes the controller's settings (``controller:``, a
:class:`~threadweaver_verl.rollout.controller.ControllerConfig`). The class also
registers itself under ``threadweaver`` when the plugin imports this module.

One trajectory = one call of :meth:`ForkJoinController.run` over
:class:`VerlServerEngine`, a thin engine adapter over verl's
``server_manager.generate``: it copies ``sampling_params`` for every request,
passes explicit ``max_tokens`` and ``stop_token_ids``, gives every request of the
trajectory ONE ``request_id`` (verl's router is sticky by request_id, so they all
reach one replica and share its prefix cache), and decides the finish from the
returned ids (verl reports ``completed`` for both a stop hit and the length limit).

Outputs (verl V1's multi-output contract: a list, each element one training row
keyed ``{uid}_{session}_{index}``, the reward computed on the LAST element and copied
to all, the last counted as the trajectory's final output):

- one output per THREAD request, in the order the requests were issued:
  ``prompt_ids`` = the request's context (shared prefix + thread header),
  ``response_ids`` = its completion, mask 1 on the sampled ids, rollout log-probs
  when returned;
- last, the final joined trajectory: ``prompt_ids`` = the prompt, ``response_ids`` =
  the whole response, with ``response_mask`` = 1 exactly on the ids the MAIN-LINE
  requests sampled (0 on thread tokens, thread headers and the ids fork/join
  inserts).

Ids the controller inserted to close an unfinished structure (``Request.forced``,
the last ids of a completion) were not sampled: mask 0, log-prob 0.

So the outputs are one per Request except that the main-line Requests share one
row, the final one. Why: every main-line request's context is a prefix of prompt +
response (the joined text is exactly what the next main-line request was sent), so
under a causal model each main-line token has the same context, hence the same
log-prob and gradient, in the final row as in its own request row. A row per
main-line request PLUS the final trajectory would train those tokens twice; a row
per main-line request plus a mask-free final row would recompute every shared
prefix once more, and a final row with an all-zero mask gets advantage 0 from
verl's V1 ``grpo`` path (it reads the advantage at the mask's first 1). Result:
every sampled token is trained exactly once, in a row whose context equals what
the engine saw, and a sequential trajectory (no block) is one row, exactly like
verl's single-turn loop.

The final row must hold the whole response: verl's reward manager decodes the
last output's response (``solution_str``) and reads its ``extra_fields``. It is
also the longest row of the trajectory, which verl's scoring needs: it pads all
outputs of a trajectory together and reads the last one's response length off
that shared attention mask (``AgentLoopWorker._compute_score`` + naive reward
manager), which is only right for the longest row.
A thread request that sampled nothing (its completion only forced closing ids)
has nothing to train and gets no row.

The final output's ``extra_fields["threadweaver"]`` carries the trajectory stats for
the reward (:mod:`threadweaver_verl.rl.reward`) and for the ThreadWeaver trainer's
metrics: T (``total_tokens``), L (``critical_path``), ``speedup`` T/L,
``parallel_ratio``, blocks, threads (per block), ``format_ok``, termination reasons,
request count and the response text with its tags (verl's reward manager decodes
``solution_str`` without special tokens, which drops the tags). Every output carries
``extra_fields["threadweaver_request"]`` (kind, path, finish, forced) and the
global-step range verl's TransferQueue tags need. verl's V1 trainer logs no
per-trajectory agent-loop metrics itself: the ThreadWeaver trainer
(:mod:`threadweaver_verl.integrations.verl.trainer`) logs ``threadweaver/speedup``,
``threadweaver/parallel_ratio``, ``threadweaver/threads_per_block`` etc. from these
stats, and the reward's extras (T, L, speedup, threads, ...) appear in verl's
validation metrics.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Sequence
from typing import Any

from verl.experimental.agent_loop.agent_loop import (
    AgentLoopBase,
    AgentLoopMetrics,
    AgentLoopOutput,
)
from verl.experimental.agent_loop.agent_loop import (
    register as _register_agent_loop,
)

from threadweaver_verl.config import ConfigError, read_section
from threadweaver_verl.data.chat import prompt_ids as chat_prompt_ids
from threadweaver_verl.data.schema import AGENT_NAME
from threadweaver_verl.format import Request, RequestKind, TokenFormat
from threadweaver_verl.rl.reward import STATS_KEY  # final output's extra_fields[STATS_KEY]: what the reward reads
from threadweaver_verl.rollout.engine import Completion, EngineError, Finish

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "WARN"))

REQUEST_KEY = "threadweaver_request"  # every output's extra_fields[REQUEST_KEY]: kind, path, finish


class AgentLoopOutputError(RuntimeError):
    """The controller's result does not match its requests (a bug, never a model error)."""


class VerlServerEngine:
    """The rollout :class:`~threadweaver_verl.rollout.engine.Engine` over verl's ``server_manager``."""

    def __init__(self, server_manager: Any, priority: int = 0):
        self.server_manager = server_manager
        self.priority = int(priority)
        self.min_global_steps: int | None = None
        self.max_global_steps: int | None = None
        self.num_preempted = 0
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
        if int(max_tokens) < 1:
            raise EngineError(
                f"max_tokens={max_tokens}: a request must allow at least one token "
                "(verl's server would silently raise it to 1)"
            )
        params = dict(sampling or {})  # verl shares one sampling dict between sessions, and its server pops keys
        params["max_tokens"] = int(max_tokens)
        params["stop_token_ids"] = [int(t) for t in stop_token_ids]
        kwargs = {"priority": self.priority} if self.priority else {}
        try:
            out = await self.server_manager.generate(
                request_id=routing_key, prompt_ids=[int(t) for t in prompt_ids], sampling_params=params, **kwargs
            )
        except Exception as e:  # noqa: BLE001 - re-raised as the engine error the controller expects
            raise EngineError(f"verl server_manager.generate failed: {type(e).__name__}: {e}") from e
        self.calls += 1
        ids = [int(t) for t in out.token_ids]
        if out.stop_reason == "aborted":
            finish = Finish.ABORT
        elif ids and ids[-1] in params["stop_token_ids"]:
            finish = Finish.STOP
        else:  # the length limit, or the server's context window (verl clamps max_tokens to it)
            finish = Finish.LENGTH
        extra = dict(out.extra_fields or {})
        for key, pick in (("min_global_steps", min), ("max_global_steps", max)):
            value = extra.get(key)
            if value is not None:
                current = getattr(self, key)
                setattr(self, key, int(value) if current is None else pick(current, int(value)))
        if out.num_preempted:
            self.num_preempted += int(out.num_preempted)
        logprobs = [float(x) for x in out.log_probs] if out.log_probs else None
        return Completion(
            token_ids=ids, finish=finish, logprobs=logprobs, cached_tokens=extra.get("num_cached_tokens"), extra=extra
        )


def _trained(r: Request) -> tuple[list[int], list[float] | None]:
    """(mask, log-probs) over one request's completion: the ids the controller inserted (``forced``, the
    completion's last ids) carry no loss and no log-prob."""
    n, forced = len(r.completion_ids), int(r.forced)
    mask = [1] * (n - forced) + [0] * forced
    if r.logprobs is None:
        return mask, None
    if len(r.logprobs) != n - forced:
        raise AgentLoopOutputError(f"request {list(r.path)}: {len(r.logprobs)} log-probs for {n - forced} sampled ids")
    return mask, list(r.logprobs) + [0.0] * forced


def is_main_line(r: Request) -> bool:
    return r.kind == RequestKind.SEQUENTIAL and not r.path


def main_line_mask(
    prompt_ids: Sequence[int], response_ids: Sequence[int], requests: Sequence[Request], with_logprobs: bool = False
):
    """(mask, per-position log-probs or None) over ``response_ids``: 1 where a main-line request sampled the id."""
    n_prompt, full = len(prompt_ids), list(prompt_ids) + list(response_ids)
    mask = [0] * len(response_ids)
    main = [r for r in requests if is_main_line(r) and r.completion_ids]
    logprobs = [0.0] * len(response_ids) if with_logprobs else None
    for r in main:
        start, end = len(r.context_ids), len(r.context_ids) + len(r.completion_ids)
        if start < n_prompt or end > len(full) or list(r.context_ids) + list(r.completion_ids) != full[:end]:
            raise AgentLoopOutputError(
                f"a main-line request is not a prefix of the trajectory "
                f"(context {len(r.context_ids)} + completion {len(r.completion_ids)} tokens)"
            )
        if any(mask[start - n_prompt : end - n_prompt]):
            raise AgentLoopOutputError("two main-line requests cover the same response position")
        r_mask, r_lp = _trained(r)
        mask[start - n_prompt : end - n_prompt] = r_mask
        if logprobs is not None and r_lp is not None:
            logprobs[start - n_prompt : end - n_prompt] = r_lp
    return mask, logprobs


def trajectory_stats(result: Any, fmt: TokenFormat) -> dict[str, Any]:
    """The final output's ``extra_fields["threadweaver"]`` for a controller result."""
    stats = result.stats.as_dict()
    terminations = [str(t) for t in result.terminations]
    stats.update(
        format_ok=not result.format_errors,
        format_errors=[str(e) for e in result.format_errors[:10]],
        terminations=terminations,
        termination=";".join(terminations) if terminations else ("eos" if result.ended_normally else "complete"),
        num_requests=len(result.requests),
        wall_time_s=float(result.wall_time_s),
        response_text=fmt.decode(result.response_ids),
    )
    return stats


def build_outputs(
    result: Any,
    fmt: TokenFormat,
    *,
    extra_fields: dict[str, Any] | None = None,
    metrics: AgentLoopMetrics | None = None,
    response_length: int | None = None,
    num_turns: int | None = None,
) -> list[AgentLoopOutput]:
    """verl multi-output rows for one controller result (see the module docstring). ``[]`` when empty."""
    prompt, response = list(result.prompt_ids), list(result.response_ids)
    if not response:
        return []
    if response_length is not None and len(response) > response_length:
        raise AgentLoopOutputError(
            f"the trajectory has {len(response)} response tokens, more than "
            f"rollout.response_length={response_length}: lower the controller's budget"
        )
    requests = list(result.requests)
    with_lp = [r.logprobs is not None for r in requests if len(r.completion_ids) > r.forced]
    if any(with_lp) and not all(with_lp):
        raise AgentLoopOutputError("the engine returned log-probs for some requests of a trajectory but not all")
    mask, final_logprobs = main_line_mask(prompt, response, requests, with_logprobs=any(with_lp))
    base_extra = dict(extra_fields or {})
    metrics = metrics or AgentLoopMetrics()
    turns = num_turns if num_turns is not None else len(requests) + 1
    outputs = []
    for r in requests:
        if is_main_line(r) or len(r.completion_ids) <= r.forced:  # in the final row / nothing sampled
            continue
        r_mask, r_lp = _trained(r)
        extra = {
            **base_extra,
            STATS_KEY: None,
            REQUEST_KEY: {"kind": r.kind, "path": list(r.path), "finish": r.finish, "forced": r.forced},
        }
        outputs.append(
            AgentLoopOutput(
                prompt_ids=list(r.context_ids),
                response_ids=list(r.completion_ids),
                response_mask=r_mask,
                response_logprobs=r_lp,
                num_turns=turns,
                metrics=metrics.model_copy(),
                extra_fields=extra,
            )
        )
    final_extra = {
        **base_extra,
        STATS_KEY: trajectory_stats(result, fmt),
        REQUEST_KEY: {"kind": "trajectory", "path": [], "finish": None, "forced": 0},
    }
    outputs.append(
        AgentLoopOutput(
            prompt_ids=prompt,
            response_ids=response,
            response_mask=mask,
            response_logprobs=final_logprobs,
            num_turns=turns,
            metrics=metrics.model_copy(),
            extra_fields=final_extra,
        )
    )
    return outputs


_FORMATS: dict[tuple[int, str], TokenFormat] = {}


def _token_format(tokenizer: Any, model_path: str) -> TokenFormat:
    """The format of the served model: its tokenizer's tags, and as EOS ids the tokenizer's and those of
    the model's generation config, every id vLLM stops on (read from the model's folder, which may
    differ from the tokenizer's)."""
    key = (id(tokenizer), model_path)
    fmt = _FORMATS.get(key)
    if fmt is None:
        from verl.utils.fs import copy_to_local

        fmt = _FORMATS[key] = TokenFormat.from_tokenizer(tokenizer, generation_config=copy_to_local(model_path))
    return fmt


@_register_agent_loop(AGENT_NAME)
class ThreadWeaverAgentLoop(AgentLoopBase):
    """verl agent loop running ThreadWeaver's fork/join controller (see the module docstring).

    Extra constructor keyword (from the agent-loop YAML): ``controller``, a dict of
    ``ControllerConfig`` fields.
    """

    def __init__(self, *args: Any, controller: Any = None, **kwargs: Any):
        from threadweaver_verl.integrations.verl import plugin
        from threadweaver_verl.rollout.controller import ForkJoinController

        plugin.require(f"agent_loop:{AGENT_NAME}")
        super().__init__(*args, **kwargs)
        self.fmt = _token_format(self.tokenizer, str(self.config.actor_rollout_ref.model.path))
        self.controller_config = controller_config(controller, self.rollout_config.response_length)
        self.controller = ForkJoinController(self.fmt, self.controller_config)

    async def run(self, sampling_params: dict[str, Any], **kwargs: Any) -> list[AgentLoopOutput]:
        messages = list(kwargs["raw_prompt"])
        prompt = chat_prompt_ids(self.tokenizer, messages)
        if len(prompt) > self.rollout_config.prompt_length:
            raise ValueError(
                f"prompt of {len(prompt)} tokens exceeds rollout.prompt_length="
                f"{self.rollout_config.prompt_length}: set data.filter_overlong_prompts=True "
                "or raise data.max_prompt_length"
            )
        engine = VerlServerEngine(self.server_manager, priority=int(kwargs.get("priority", 0) or 0))
        routing_key = f"tw-{uuid.uuid4().hex}"  # one request_id for every request of this trajectory
        result = await self.controller.run(engine, prompt, routing_key=routing_key, sampling=dict(sampling_params))
        metrics = AgentLoopMetrics(
            generate_sequences=float(result.wall_time_s), num_preempted=engine.num_preempted if engine.calls else -1
        )
        extra = {"min_global_steps": engine.min_global_steps, "max_global_steps": engine.max_global_steps}
        outputs = build_outputs(
            result, self.fmt, extra_fields=extra, metrics=metrics, response_length=self.rollout_config.response_length
        )
        if not outputs:
            logger.warning(
                "threadweaver agent loop: empty response for uid=%s session=%s (terminations %s); "
                "the session gives no training rows",
                kwargs.get("uid"),
                kwargs.get("session_id"),
                list(result.terminations),
            )
        return outputs


def controller_config(settings: Any, response_length: int):
    """``ControllerConfig`` from the agent-loop YAML's ``controller:`` (unknown keys are an error).

    ``max_response_tokens`` defaults to ``rollout.response_length``; a larger value is an error (verl's
    rows and the actor's buffers are sized by it)."""
    from omegaconf import OmegaConf

    from threadweaver_verl.rollout.controller import ControllerConfig

    base = OmegaConf.to_container(settings, resolve=True) if OmegaConf.is_config(settings) else dict(settings or {})
    if base.get("max_response_tokens") is None:
        base["max_response_tokens"] = int(response_length)
    elif int(base["max_response_tokens"]) > int(response_length):
        raise ConfigError(
            f"agent loop {AGENT_NAME!r}: controller.max_response_tokens={base['max_response_tokens']} "
            f"exceeds actor_rollout_ref.rollout.response_length={response_length}; lower it or raise "
            "response_length"
        )
    return read_section(ControllerConfig, base, f"the {AGENT_NAME!r} agent loop's controller")


def register() -> None:
    """The plugin's registration (idempotent). verl's decorator above registered the class when this module was
    imported; this registers it again with that decorator if the entry is gone, and leaves an entry that is
    there alone (an agent-loop YAML's entry carries its own keyword arguments)."""
    from threadweaver_verl.integrations.verl.plugin import Kind, verl_private_registry

    if AGENT_NAME not in verl_private_registry(Kind.AGENT_LOOP):
        _register_agent_loop(AGENT_NAME)(ThreadWeaverAgentLoop)
