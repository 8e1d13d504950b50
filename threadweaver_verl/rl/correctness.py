"""Is a response's final answer right? math-verify, bounded in time, safe in Ray actors.

verl 0.9.1 scores rewards inside ``RewardLoopWorker`` Ray actors, from a
thread pool: math-verify's own timeouts use ``signal.alarm`` and cannot run
there (and a signal cannot interrupt a long C-level bignum operation anyway,
e.g. ``117`` vs ``9^{9^{9^{9}}}``). So math-verify runs with its timeouts OFF
in a persistent child process (:mod:`threadweaver_verl.rl.verify_worker`),
one JSON line per check (~0.1 ms of transport on top of math-verify's
1-3 ms). The parent waits with a deadline (``CorrectnessConfig.timeout_s``);
a child that misses it is killed and restarted on the next call, and the
answer scores as wrong with status ``timeout``. A crash scores wrong with
status ``error``. Nothing here raises into the trainer: every outcome is an
:class:`AnswerCheck`, and :func:`verifier_counters` counts them per process.

The child is started with ``subprocess`` (fork+exec, thread-safe), never with
``multiprocessing`` (whose ``fork`` is unsafe in a threaded Ray actor and whose
``spawn`` re-imports the actor's ``__main__``). It exits when its stdin
closes or its parent dies. Pools are per process (a forked copy starts its own).

Answer rules (``CorrectnessConfig.answer_rule``):

* ``boxed_after_think`` (default): the last complete ``\\boxed{...}`` in the
  text after the first ``</think>``. A response without ``</think>`` has NOT
  given a final answer (it was truncated or never finished reasoning), so it
  scores ``no_answer``: a ``\\boxed{}`` inside the reasoning is a draft, and
  paying it would reward running out of budget.
* ``last_boxed_anywhere``: the last complete ``\\boxed{...}`` in the whole
  response (for models that do not think in ``<think>`` tags).

"Complete" means its braces close; ``\\{`` and ``\\}`` are literal braces and
do not count. Nested boxes resolve to the outermost of the last one.
Extraction is a single linear pass, so huge responses cost O(length).
"""

from __future__ import annotations

import atexit
import enum
import json
import logging
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from threadweaver_verl.config import ConfigError

logger = logging.getLogger(__name__)


class AnswerRule(enum.StrEnum):
    """Where the final answer is looked for (see the module docstring)."""

    BOXED_AFTER_THINK = "boxed_after_think"
    LAST_BOXED_ANYWHERE = "last_boxed_anywhere"


THINK_CLOSE = "</think>"


class AnswerStatus(enum.StrEnum):
    """Every ``AnswerCheck.status``."""

    OK = "ok"  # math-verify judged the answer (correct or not)
    NO_ANSWER = "no_answer"  # no complete \boxed{} where the rule looks (or no </think>)
    UNPARSEABLE = "unparseable"  # math-verify could not read the boxed answer
    ANSWER_TOO_LONG = "answer_too_long"  # boxed content longer than max_answer_chars: not sent to math-verify
    TIMEOUT = "timeout"  # math-verify missed the deadline; the worker was killed
    ERROR = "error"  # math-verify raised, or the worker crashed / could not start
    BAD_GROUND_TRUTH = "bad_ground_truth"  # the dataset's ground truth is empty or unreadable by math-verify


@dataclass
class CorrectnessConfig:
    """How the final answer is found and judged."""

    answer_rule: str = AnswerRule.BOXED_AFTER_THINK.value
    """``boxed_after_think`` or ``last_boxed_anywhere``; see the module docstring."""
    timeout_s: float = 5.0
    """Wall-clock bound of one math-verify check (parse both + verify)."""
    max_answer_chars: int = 1000
    """Longer boxed contents are not sent to math-verify (status answer_too_long)."""
    num_workers: int = 1
    """Verifier processes per Python process (verl runs several reward actors already)."""
    startup_timeout_s: float = 120.0
    """Bound on starting a verifier process (imports sympy); not per call."""
    float_rounding: int = 6
    """Passed to math_verify.verify."""
    numeric_precision: int = 15
    """Passed to math_verify.verify."""
    strict: bool = True
    """Passed to math_verify.verify."""

    def __post_init__(self) -> None:
        if self.answer_rule not in tuple(AnswerRule):
            raise ConfigError(
                f"CorrectnessConfig.answer_rule={self.answer_rule!r}: choose one of {[r.value for r in AnswerRule]}"
            )
        if not self.timeout_s > 0:
            raise ConfigError(f"CorrectnessConfig.timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.num_workers < 1:
            raise ConfigError(f"CorrectnessConfig.num_workers must be >= 1, got {self.num_workers}")
        if self.max_answer_chars < 1:
            raise ConfigError(f"CorrectnessConfig.max_answer_chars must be >= 1, got {self.max_answer_chars}")


@dataclass(frozen=True)
class AnswerCheck:
    correct: bool
    extracted: str | None  # the boxed content the rule found (None when there is none)
    status: AnswerStatus
    detail: str = ""  # human-readable reason for a non-ok status


# ---------------------------------------------------------------- extraction
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE = re.compile(r"(?<!\\)[{}]")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (outermost if nested), in one linear pass."""
    starts = {m.end() - 1 for m in _BOXED.finditer(text)}
    if not starts:
        return None
    stack: list[int] = []
    best: tuple[int, int] | None = None  # (open, close) of the box that closes last
    for m in _BRACE.finditer(text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            open_pos = stack.pop()
            if open_pos in starts:
                best = (open_pos, m.start())
    if best is None:
        return None
    return text[best[0] + 1 : best[1]]


def answer_region(text: str, rule: str) -> str | None:
    """The part of the response the answer rule looks in (None: no final answer section)."""
    if rule == AnswerRule.BOXED_AFTER_THINK:
        cut = text.find(THINK_CLOSE)
        return None if cut < 0 else text[cut + len(THINK_CLOSE) :]
    if rule == AnswerRule.LAST_BOXED_ANYWHERE:
        return text
    raise ValueError(f"unknown answer rule {rule!r}; choose one of {[r.value for r in AnswerRule]}")


def extract_answer(text: str, rule: str = AnswerRule.BOXED_AFTER_THINK) -> str | None:
    region = answer_region(text, rule)
    return None if region is None else last_boxed(region)


# ---------------------------------------------------------------- verifier processes
class _WorkerDied(Exception):
    pass


class _Verifier:
    """One child process running verify_worker; restarted lazily after a kill or crash."""

    def __init__(self, startup_timeout_s: float):
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        self._buf = b""
        self._ready = False

    def _spawn(self) -> None:
        """Start the child without waiting: after a kill, its warm-up overlaps the caller's other work."""
        env = dict(os.environ)
        pkg_root = str(Path(__file__).resolve().parents[2])  # so the child imports this very package
        env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "threadweaver_verl.rl.verify_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=env,
            close_fds=True,
        )
        self._buf = b""
        self._ready = False
        _COUNTERS.bump("starts")

    def _wait_ready(self) -> None:
        try:
            reply = self._read_line(time.monotonic() + self.startup_timeout_s)
        except _WorkerDied:
            self.kill()
            raise
        if reply is None or not reply.get("ready"):
            self.kill()
            raise _WorkerDied(f"verifier process did not start within {self.startup_timeout_s}s")
        self._ready = True

    def _read_line(self, deadline: float) -> dict | None:
        """One JSON line from the child, or None at the deadline. Raises _WorkerDied on EOF."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _WorkerDied(f"verifier process exited (code {self.proc.poll()})")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None:
            try:
                self.proc.kill()
                self.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001 - best effort; the child also exits when we die
                pass
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f and f.close()
                except Exception:  # noqa: BLE001
                    pass
        self.proc = None
        self._buf = b""
        self._ready = False

    def check(self, request: dict, timeout_s: float) -> dict | None:
        """The child's reply, or None on timeout (child killed). Raises _WorkerDied on a crash."""
        if not self.alive():
            if self.proc is not None:  # died between calls: not this input's fault
                _COUNTERS.bump("restarts")
                self.kill()
            self._spawn()
        if not self._ready:
            self._wait_ready()
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            self.kill()
            raise _WorkerDied(f"verifier process gone: {e}") from e
        try:
            reply = self._read_line(time.monotonic() + timeout_s)
        except _WorkerDied:
            self.kill()
            raise
        if reply is None:
            self.kill()
            self._spawn()  # warm up the replacement now
        return reply


class _Pool:
    def __init__(self, size: int, startup_timeout_s: float):
        self.pid = os.getpid()
        self.size = size
        self.all = [_Verifier(startup_timeout_s) for _ in range(size)]
        self.free: queue.Queue[_Verifier] = queue.Queue()
        for v in self.all:
            self.free.put(v)

    def close(self) -> None:
        for v in self.all:
            if v.proc is not None and v.proc.stdin is not None:
                try:
                    v.proc.stdin.close()  # polite: the child exits on EOF
                    v.proc.wait(timeout=2)
                except Exception:  # noqa: BLE001
                    pass
            v.kill()


class _Counters:
    """Per-process tallies of verifier outcomes (statuses, starts, restarts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: dict[str, int] = {}

    def bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._c[key] = self._c.get(key, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._c)

    def reset(self) -> None:
        with self._lock:
            self._c.clear()


_COUNTERS = _Counters()
_POOLS: dict[tuple, _Pool] = {}
_POOLS_LOCK = threading.Lock()


def _pool_for(cfg: CorrectnessConfig) -> _Pool:
    key = (cfg.num_workers, cfg.startup_timeout_s)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None or pool.pid != os.getpid():  # a forked copy must not share the parent's pipes
            pool = _Pool(cfg.num_workers, cfg.startup_timeout_s)
            _POOLS[key] = pool
        return pool


def shutdown_verifiers() -> None:
    """Stop every verifier process of this Python process (also run at exit)."""
    with _POOLS_LOCK:
        pools = [p for p in _POOLS.values() if p.pid == os.getpid()]
        _POOLS.clear()
    for p in pools:
        p.close()


atexit.register(shutdown_verifiers)


def verifier_counters() -> dict[str, int]:
    """Counts in this process: one key per AnswerCheck status, plus ``starts`` and ``restarts``."""
    return _COUNTERS.snapshot()


def reset_verifier_counters() -> None:
    _COUNTERS.reset()


def verifier_pids() -> list[int]:
    """Process ids of the live verifier processes of this process (for diagnostics and tests)."""
    with _POOLS_LOCK:
        return [v.proc.pid for p in _POOLS.values() for v in p.all if v.alive() and v.proc is not None]


# ---------------------------------------------------------------- the check
def _gold_request(ground_truth: str) -> tuple[str, str | None]:
    gt = ground_truth.strip()
    if "\\boxed" in gt or "$" in gt:
        return gt, None
    return f"\\boxed{{{gt}}}", gt


def _finish(check: AnswerCheck) -> AnswerCheck:
    _COUNTERS.bump(str(check.status))
    return check


def check_answer(response_text: str, ground_truth: str, config: CorrectnessConfig | None = None) -> AnswerCheck:
    """Judge the final answer of ``response_text`` against ``ground_truth``. Never raises on model output."""
    cfg = config or CorrectnessConfig()
    if not isinstance(response_text, str):
        return _finish(
            AnswerCheck(False, None, AnswerStatus.ERROR, f"response is {type(response_text).__name__}, not str")
        )
    if ground_truth is None or not str(ground_truth).strip():
        return _finish(AnswerCheck(False, None, AnswerStatus.BAD_GROUND_TRUTH, "empty ground truth"))
    extracted = extract_answer(response_text, cfg.answer_rule)
    if extracted is None:
        why = (
            "no </think> in the response (rule boxed_after_think)"
            if cfg.answer_rule == AnswerRule.BOXED_AFTER_THINK and THINK_CLOSE not in response_text
            else "no complete \\boxed{} where the answer rule looks"
        )
        return _finish(AnswerCheck(False, None, AnswerStatus.NO_ANSWER, why))
    if not extracted.strip():
        return _finish(AnswerCheck(False, extracted, AnswerStatus.UNPARSEABLE, "empty \\boxed{}"))
    if len(extracted) > cfg.max_answer_chars:
        return _finish(
            AnswerCheck(
                False,
                extracted[: cfg.max_answer_chars],
                AnswerStatus.ANSWER_TOO_LONG,
                f"boxed answer has {len(extracted)} chars > max_answer_chars={cfg.max_answer_chars}",
            )
        )
    gold, gold_fallback = _gold_request(str(ground_truth))
    request = {
        "gold": gold,
        "gold_fallback": gold_fallback,
        "pred": f"\\boxed{{{extracted}}}",
        "float_rounding": cfg.float_rounding,
        "numeric_precision": cfg.numeric_precision,
        "strict": cfg.strict,
    }

    pool = _pool_for(cfg)
    verifier = pool.free.get()
    try:
        reply = verifier.check(request, cfg.timeout_s)
    except _WorkerDied as e:
        logger.warning("math-verify worker failed on answer %.80r: %s", extracted, e)
        return _finish(AnswerCheck(False, extracted, AnswerStatus.ERROR, str(e)))
    except Exception as e:  # noqa: BLE001 - never raise into the trainer
        verifier.kill()
        logger.warning("math-verify check failed on answer %.80r: %s", extracted, e)
        return _finish(AnswerCheck(False, extracted, AnswerStatus.ERROR, f"{type(e).__name__}: {e}"))
    finally:
        pool.free.put(verifier)

    if reply is None:
        logger.warning("math-verify exceeded %.1fs on answer %.80r; worker killed", cfg.timeout_s, extracted)
        return _finish(AnswerCheck(False, extracted, AnswerStatus.TIMEOUT, f"math-verify exceeded {cfg.timeout_s}s"))
    if "error" in reply:
        return _finish(AnswerCheck(False, extracted, AnswerStatus.ERROR, reply["error"]))
    if not reply["gold_parsed"]:
        logger.warning("math-verify cannot read the ground truth %.80r", ground_truth)
        return _finish(
            AnswerCheck(
                False,
                extracted,
                AnswerStatus.BAD_GROUND_TRUTH,
                f"math-verify cannot parse ground truth {ground_truth!r}",
            )
        )
    if not reply["pred_parsed"]:
        return _finish(
            AnswerCheck(False, extracted, AnswerStatus.UNPARSEABLE, "math-verify could not parse the boxed answer")
        )
    return _finish(AnswerCheck(bool(reply["correct"]), extracted, AnswerStatus.OK))
