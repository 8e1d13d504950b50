"""The P-GRPO reward: correctness plus an acceleration bonus paid only when correct.

Load it in verl 0.9.1 with::

    reward.custom_reward_function.path=pkg://threadweaver_verl.rl.reward
    reward.custom_reward_function.name=compute_score
    +reward.custom_reward_function.reward_kwargs.wrong_score=-1.0     # any RewardConfig field

verl (``verl/trainer/ppo/reward.py``) merges ``reward_kwargs`` into every call's
keyword arguments, so settings arrive as flat keyword arguments named like
:class:`RewardConfig`'s fields; ``correctness`` takes a dict of
:class:`~threadweaver_verl.rl.correctness.CorrectnessConfig` fields. Unknown
keys are an error. ``configs/threadweaver_pgrpo.yaml`` sets the defaults below.

Score (T = response tokens, L = critical-path tokens, both from token ids)::

    correct:  correct_score + bonus,  bonus = factor * min(1 - L/T, clip)   ("one_minus_ratio")
                                         or  factor * min(T/L - 1, clip)    ("ratio_minus_one")
    wrong:    wrong_score
    minus format_penalty when the trajectory's format is invalid.

Defaults and their sources (ThreadWeaver, arXiv 2512.07843, and its reference code):

* ``acceleration="one_minus_ratio"``, factor 0.5, clip 0.2: the reference CODE (what
  produced the paper's numbers); at most +0.1, saturating at T/L = 1.25. The
  reference README's form is ``"ratio_minus_one"`` (at most +0.1 from T/L = 1.2).
* ``wrong_score=0.0``: the reference README (its code uses -1.0; set it to match).
* ``format_penalty=0.0`` and ``bonus_requires_format_ok=True``: this project's choices
  (no published setting); a malformed trajectory's T/L is not a speedup fork/join
  inference realised, so it earns no bonus.

Where T and L come from (never from decoded-then-re-encoded text, never prompt tokens):

1. ``extra_info["threadweaver"]``: the stats the ThreadWeaver agent loop puts in its
   final output's ``extra_fields["threadweaver"]`` (verl copies the final output's
   extra_fields into ``extra_info``). Keys (see :data:`STATS_KEYS`):
   ``total_tokens``, ``critical_path``, ``num_blocks``, ``num_threads``, ``format_ok``
   are required; ``termination`` (why the rollout ended), ``response_text`` (the whole
   response decoded WITH tags, used for the answer instead of ``solution_str``) and
   ``response_ids`` are optional.
2. Else the whole trajectory's response token ids, from ``extra_info["threadweaver"]
   ["response_ids"]`` or a ``response_ids`` keyword, measured with the format module
   (needs ``tokenizer=<model path>`` to know the tag ids).
3. Else no bonus is paid, and ``stats_source="none"`` says so in the extras.

The answer is read from ``response_text`` when the agent loop gives it, because
verl's naive reward manager decodes ``solution_str`` with ``skip_special_tokens=True``,
which drops ``</think>`` for tokenizers that register the tags as special tokens.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from threadweaver_verl.config import ConfigError, read_section
from threadweaver_verl.rl.correctness import AnswerCheck, AnswerStatus, CorrectnessConfig, check_answer


class Acceleration(enum.StrEnum):
    """``RewardConfig.acceleration``: the form of the acceleration bonus (see the module docstring)."""

    ONE_MINUS_RATIO = "one_minus_ratio"  # factor * min(1 - L/T, clip): the reference code
    RATIO_MINUS_ONE = "ratio_minus_one"  # factor * min(T/L - 1, clip): the reference README
    NONE = "none"  # no bonus


class AnswerSource(enum.StrEnum):
    """The extras' ``answer_source``: the text the final answer was read from."""

    SOLUTION_STR = "solution_str"  # verl's decoded response (tags dropped)
    RESPONSE_TEXT = "response_text"  # the agent loop's response text, tags kept
    RESPONSE_IDS = "response_ids"  # decoded from the response ids


class StatsSource(enum.StrEnum):
    """The extras' ``stats_source``: where T, L and the format check came from."""

    EXTRA_FIELDS = "extra_fields"  # the agent loop's per-trajectory stats
    RESPONSE_IDS = "response_ids"  # measured from the response ids
    NONE = "none"  # no stats: no bonus


STATS_KEY = "threadweaver"  # extra_info[STATS_KEY]: the agent loop's per-trajectory stats (the one definition)
STATS_KEYS = ("total_tokens", "critical_path", "num_blocks", "num_threads", "format_ok")  # required in it
# Keyword arguments verl itself may add to a compute_score call; accepted and ignored.
_VERL_KWARGS = frozenset({"reward_router_address", "reward_model_tokenizer"})


@dataclass
class RewardConfig:
    """Every knob of the P-GRPO reward (see the module docstring for sources)."""

    correct_score: float = 1.0
    """Paid for a correct final answer."""
    wrong_score: float = 0.0
    """Wrong / missing / unverifiable answer; the reference code uses -1.0."""
    acceleration: str = Acceleration.ONE_MINUS_RATIO.value
    """The bonus form: ``one_minus_ratio`` (reference code), ``ratio_minus_one`` (reference README) or ``none``."""
    acceleration_factor: float = 0.5
    """Multiplies the (clipped) ratio term: the bonus is at most factor * clip."""
    acceleration_clip: float = 0.2
    """Cap on the ratio term before the factor."""
    bonus_requires_format_ok: bool = True
    """No bonus for a trajectory whose format is invalid."""
    format_penalty: float = 0.0
    """Subtracted (correct or not) when the format is invalid; 0 = off."""
    tokenizer: str | None = None
    """Model/tokenizer path, only needed to measure stats from response ids."""
    correctness: CorrectnessConfig = field(default_factory=CorrectnessConfig)
    """How the final answer is found and judged."""

    def __post_init__(self) -> None:
        if isinstance(self.correctness, dict):
            self.correctness = CorrectnessConfig(**self.correctness)
        if self.acceleration not in tuple(Acceleration):
            raise ConfigError(
                f"RewardConfig.acceleration={self.acceleration!r}: choose one of {[a.value for a in Acceleration]}"
            )
        if self.acceleration_clip < 0 or self.acceleration_factor < 0:
            raise ConfigError("RewardConfig.acceleration_factor and acceleration_clip must be >= 0")
        if self.format_penalty < 0:
            raise ConfigError(f"RewardConfig.format_penalty is subtracted; give it as >= 0, got {self.format_penalty}")


def acceleration_bonus(total_tokens: int, critical_path: int, cfg: RewardConfig) -> float:
    """The bonus for a correct answer with T = ``total_tokens`` and L = ``critical_path``."""
    t, cp = int(total_tokens), int(critical_path)
    if cfg.acceleration == Acceleration.NONE or t <= 0 or cp <= 0:
        return 0.0
    if cp > t:
        raise ValueError(f"critical path L={cp} exceeds total tokens T={t}: the stats are inconsistent")
    ratio = 1.0 - cp / t if cfg.acceleration == Acceleration.ONE_MINUS_RATIO else t / cp - 1.0
    return cfg.acceleration_factor * min(ratio, cfg.acceleration_clip)


# ------------------------------------------------------------------ config from verl kwargs
def _plain(value: Any) -> Any:
    """OmegaConf containers (verl passes reward_kwargs values as DictConfig) to plain Python."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(value, (DictConfig, ListConfig)):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        pass
    return value


REWARD_KWARGS = "reward.custom_reward_function.reward_kwargs"


@functools.lru_cache(maxsize=64)
def _config_from_json(blob: str) -> RewardConfig:
    return read_section(RewardConfig, json.loads(blob), REWARD_KWARGS)


def config_from_kwargs(kwargs: dict[str, Any]) -> RewardConfig:
    """A RewardConfig from compute_score's keyword arguments (cached per distinct setting); an unknown
    keyword is an error naming it and the nearest setting."""
    settings: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key not in _VERL_KWARGS and key != "response_ids":
            value = _plain(value)
            settings[key] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return _config_from_json(json.dumps(settings, sort_keys=True))


# ------------------------------------------------------------------ stats
@functools.lru_cache(maxsize=4)
def _token_format(tokenizer_path: str):
    from transformers import AutoTokenizer

    from threadweaver_verl.format import TokenFormat

    return TokenFormat.from_tokenizer(AutoTokenizer.from_pretrained(tokenizer_path))


def _stats_from_fields(tw: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in STATS_KEYS if k not in tw]
    if missing:
        raise ValueError(
            f"extra_info[{STATS_KEY!r}] lacks {missing}: the agent loop must put all of {list(STATS_KEYS)} "
            f"in its final output's extra_fields[{STATS_KEY!r}] (got keys {sorted(tw)})"
        )
    return {
        "T": int(tw["total_tokens"]),
        "L": int(tw["critical_path"]),
        "blocks": int(tw["num_blocks"]),
        "threads": int(tw["num_threads"]),
        "format_ok": bool(tw["format_ok"]),
        "termination": str(tw.get("termination") or "unknown"),
    }


def _stats_from_ids(ids: Sequence[int], cfg: RewardConfig) -> tuple[dict[str, Any], str]:
    """Stats and the tag-preserving text of a whole trajectory's response ids (prompt excluded)."""
    if not cfg.tokenizer:
        raise ValueError(
            "response ids were given but RewardConfig.tokenizer is unset: set "
            "+reward.custom_reward_function.reward_kwargs.tokenizer=<model path> so the tag ids are known"
        )
    fmt = _token_format(cfg.tokenizer)
    ids = [int(i) for i in ids]
    traj = fmt.parse(ids)
    stats = fmt.stats(traj)
    ended = bool(ids) and ids[-1] in fmt.eos_ids
    return (
        {
            "T": stats.total_tokens,
            "L": stats.critical_path,
            "blocks": stats.num_blocks,
            "threads": stats.num_threads,
            "format_ok": not fmt.validate(traj),
            "termination": "eos" if ended else "no_eos",
        },
        fmt.decode(ids),
    )


# ------------------------------------------------------------------ the reward
def _no_stats() -> dict[str, Any]:
    return {"T": None, "L": None, "blocks": None, "threads": None, "format_ok": None, "termination": "unknown"}


def score_response(
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None,
    cfg: RewardConfig,
    response_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """The reward and its extras for one trajectory (see the module docstring)."""
    tw = (extra_info or {}).get(STATS_KEY)
    if tw is not None and not isinstance(tw, dict):
        raise ValueError(f"extra_info[{STATS_KEY!r}] must be a dict of trajectory stats, got {type(tw).__name__}")
    tw = tw or {}
    answer_text, answer_source = solution_str, AnswerSource.SOLUTION_STR
    if tw.get("response_text") is not None:
        answer_text, answer_source = str(tw["response_text"]), AnswerSource.RESPONSE_TEXT

    ids = tw.get("response_ids", response_ids)
    if any(k in tw for k in STATS_KEYS):
        stats, stats_source = _stats_from_fields(tw), StatsSource.EXTRA_FIELDS
    elif ids is not None:
        stats, decoded = _stats_from_ids(ids, cfg)
        stats_source = StatsSource.RESPONSE_IDS
        if answer_source == AnswerSource.SOLUTION_STR:
            answer_text, answer_source = decoded, AnswerSource.RESPONSE_IDS
    else:
        stats, stats_source = _no_stats(), StatsSource.NONE

    check: AnswerCheck = check_answer(answer_text, "" if ground_truth is None else str(ground_truth), cfg.correctness)

    bonus = 0.0
    if check.correct and stats_source != StatsSource.NONE and (stats["format_ok"] or not cfg.bonus_requires_format_ok):
        bonus = acceleration_bonus(stats["T"], stats["L"], cfg)
    penalty = cfg.format_penalty if stats["format_ok"] is False else 0.0
    score = (cfg.correct_score + bonus if check.correct else cfg.wrong_score) - penalty

    t, cp = stats["T"], stats["L"]
    speedup = (t / cp if cp else 1.0) if t is not None and cp is not None else None
    return {
        "score": float(score),
        "acc": 1.0 if check.correct else 0.0,  # verl's val-core metric key
        "correct": bool(check.correct),
        "pred": check.extracted if check.extracted is not None else "",  # verl's majority-vote key
        "answer_status": str(check.status),
        "answer_source": str(answer_source),
        "verify_timeout": 1.0 if check.status == AnswerStatus.TIMEOUT else 0.0,
        "verify_error": 1.0 if check.status == AnswerStatus.ERROR else 0.0,
        "acceleration_bonus": float(bonus),
        "format_penalty": float(penalty),
        "T": t,
        "L": cp,
        "speedup": speedup,
        "blocks": stats["blocks"],
        "threads": stats["threads"],
        "format_ok": stats["format_ok"],
        "termination": stats["termination"],
        "stats_source": str(stats_source),
    }


def compute_score(
    data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs: Any
) -> dict[str, Any]:
    """verl's custom reward function entry point: ``{"score": ..., **extras}``."""
    cfg = config_from_kwargs(kwargs)
    result = score_response(solution_str, ground_truth, extra_info, cfg, response_ids=kwargs.get("response_ids"))
    if not math.isfinite(result["score"]):  # pragma: no cover - guarded by the config checks
        raise ValueError(f"non-finite reward {result['score']} for data_source {data_source!r}")
    return result
