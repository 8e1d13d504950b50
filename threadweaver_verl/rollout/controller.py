"""The fork/join controller: the one state machine of ThreadWeaver inference.

It turns a prompt into a trajectory by issuing plain completion requests to an
:class:`~threadweaver_verl.rollout.engine.Engine`, in the five phases of the
method:

1. **sequential** - decode the main line until ``</Outlines>`` or EOS;
2. **parse** the outline numbers of the block just opened;
3. **fork** - one request per outline, prompt = :meth:`TokenFormat.fork_context`,
   stop at ``</Thread>`` / ``</Outlines>`` (a nested block) / EOS, all in flight at
   once (``asyncio.gather``);
4. **join** - :meth:`TokenFormat.join` of the threads in outline order;
5. **continue** sequentially from the joined context; repeat until EOS or a budget.

A thread runs the same loop as the main line (a *line*), so a thread may open
its own block, up to ``max_depth``. Every line returns its ids and its
:class:`~threadweaver_verl.format.Request` list in exactly the order
:func:`~threadweaver_verl.format.split_requests` gives, so for a format-valid
result ``result.requests == split_requests(prompt, response, fmt)`` unless an
intervention in :data:`LINE_SPLITTING` cut one line into several requests.

Model output is untrusted. Whatever it writes, every path ends in a trajectory
whose structure is closed (the validator reports no ``unclosed`` element), and
every intervention is recorded (``events`` with the path, and the distinct
reasons in ``terminations``):

- a line cut by a length limit, an empty completion or a budget gets the closing
  tags of whatever it left open appended: ``</Outline>``, ``</Outlines>``,
  ``</Thread>``, ``</Parallel>`` and, on the main line, ``</think>`` (a block left
  with no thread closes in the layout of an empty join);
- a tag that would end an open element without its closing tag (``<Outline>`` in
  an open outline, ``<Thread>`` in an open outline list, ...) is cut off, the
  missing closing tags are added and the line goes on (``implicit_close``); a
  thread writing ``<Thread>`` or ``</Parallel>`` of its own block is cut there and
  closed (``thread_breakout``);
- EOS inside a thread is replaced by the thread's closing (``eos_in_thread``) and
  the main line continues after the join;
- EOS on the main line with structure still open: the closing goes before a final EOS;
- outline numbers that are not numbers, out of 1..n, or repeated are dropped
  (policy ``as_written``) or every outline gets its position (``by_position``);
- a stop id that opened no block and closed no thread (e.g. ``</Outlines>`` with
  no block open) is kept and generation goes on (``stray_stop``).

Inserted closing ids are the last ids of a Request's completion and are counted
in ``Request.forced``; they have no log-prob and should carry no loss.

Budgets (all in :class:`ControllerConfig`) bound everything: the response never
exceeds ``max_response_tokens`` (closing included; generated ids are trimmed if
the model left more open than there is room to close), each thread its
``max_thread_tokens``, the engine sees at most ``max_requests`` calls. The
threads of one block share the response budget left at the fork equally.

An engine exception, an ``abort`` finish or a request exceeding
``request_timeout_s`` fails the trajectory with :class:`RolloutError`; there is
no fallback to plain generation.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

from threadweaver_verl.config import ConfigError
from threadweaver_verl.format import (
    Block,
    FormatError,
    Marker,
    Outline,
    Outlines,
    Request,
    RequestKind,
    Tag,
    Thread,
    TokenFormat,
    TrajectoryStats,
    outline_numbers,
)
from threadweaver_verl.format.tree import Parser, id_atoms
from threadweaver_verl.rollout.engine import Completion, Engine, EngineError, Finish


class Reason(enum.StrEnum):
    """Why the controller intervened (``ControllerEvent.reason``, ``RolloutResult.terminations``)."""

    TRUNCATED = "truncated"  # a line ended on a length limit and was closed by the controller
    EOS_IN_THREAD = "eos_in_thread"  # EOS inside a thread: replaced by the thread's closing
    CLOSED_AT_EOS = "closed_at_eos"  # EOS on the main line with structure open: closed before EOS
    EMPTY_COMPLETION = "empty_completion"  # the engine returned no ids: the line was closed
    THREAD_BREAKOUT = "thread_breakout"  # a thread wrote <Thread>/</Parallel> of its block: cut there
    STRAY_STOP = "stray_stop"  # a stop id that forked nothing and closed no thread: generation went on
    IMPLICIT_CLOSE = "implicit_close"  # a tag ended open elements without their closing tag: cut there,
    #                                    the closing tags added, generation went on
    OUTLINE_NUMBERS_DROPPED = "outline_numbers_dropped"  # non-numeric / out-of-range outline numbers
    OUTLINE_NUMBERS_DEDUPLICATED = "outline_numbers_deduplicated"  # repeated outline numbers
    OUTLINE_NUMBERS_RENUMBERED = "outline_numbers_renumbered"  # by_position policy changed a number
    TOKENS_AFTER_STOP = "tokens_after_stop_dropped"  # the engine returned ids after a stop id
    ENGINE_OVERRUN = "engine_overrun"  # the engine returned more than max_tokens ids
    CLOSING_TRIMMED = "closing_trimmed"  # generated ids dropped to make room for the closing tags
    ENGINE_STOP_WITHOUT_STOP_ID = "engine_stop_without_stop_id"  # finish "stop" but no stop id last
    BUDGET_RESPONSE = "budget:max_response_tokens"
    BUDGET_THREAD = "budget:max_thread_tokens"
    BUDGET_THREADS_PER_BLOCK = "budget:max_threads_per_block"
    BUDGET_BLOCKS = "budget:max_blocks"
    BUDGET_REQUESTS = "budget:max_requests"


# Interventions after which one line spans several Requests where the splitter sees one: a result
# with any of them is not expected to equal split_requests even when it is format-valid.
LINE_SPLITTING = frozenset({Reason.STRAY_STOP, Reason.IMPLICIT_CLOSE})


class OutlineNumbers(enum.StrEnum):
    """``ControllerConfig.outline_numbers``: how a block's outlines become threads."""

    AS_WRITTEN = "as_written"
    BY_POSITION = "by_position"


RESERVED_SAMPLING_KEYS = frozenset({"max_tokens", "max_new_tokens", "stop_token_ids", "stop", "n"})


@dataclass
class ControllerConfig:
    """Budgets and policies of the fork/join controller."""

    max_response_tokens: int = 4096
    """Total response tokens of the whole trajectory (all threads, inserted headers and closing included)."""
    max_thread_tokens: int = 1024
    """Tokens one thread may add after its header (all its requests and nested blocks, ``</Thread>`` included)."""
    max_threads_per_block: int = 8
    """Threads forked per block; outlines beyond it get no thread (``budget:max_threads_per_block``)."""
    max_blocks: int = 8
    """Blocks per trajectory, nested ones included. Reaching one more stops the trajectory
    (``budget:max_blocks``): the extra block and everything open are closed."""
    max_requests: int = 64
    """Engine calls per trajectory. When spent, every line is closed where it stands."""
    max_depth: int = 2
    """Block nesting: 1 = no nesting; 2 = a thread may open one block. A line that may not open a
    block does not stop at ``</Outlines>`` (what the model writes there is kept; validate flags it)."""
    fork: bool = True
    """False = sequential baseline: one line, stop only at EOS, ``</Outlines>`` is not a stop."""
    outline_numbers: str = OutlineNumbers.AS_WRITTEN.value
    """How a block's outlines become threads (:class:`OutlineNumbers`). ``as_written``: thread n for each
    outline numbered n, in outline order, dropping non-numeric numbers, numbers outside 1..(number of
    outlines) and repeats. ``by_position``: threads 1..k for the k outlines whatever they say."""
    join_reserve_tokens: int = 0
    """Response tokens held back from a block's threads for the text after its join (when they fit)."""
    close_reserve_tokens: int = 4
    """Tokens each request leaves unused for closing tags the completion itself may open."""
    request_timeout_s: float | None = None
    """Per engine call; exceeding it fails the trajectory. None: rely on the engine's own timeout."""

    def __post_init__(self) -> None:
        for name in (
            "max_response_tokens",
            "max_thread_tokens",
            "max_threads_per_block",
            "max_blocks",
            "max_requests",
            "max_depth",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"ControllerConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("join_reserve_tokens", "close_reserve_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"ControllerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.outline_numbers not in tuple(OutlineNumbers):
            raise ConfigError(
                f"ControllerConfig.outline_numbers={self.outline_numbers!r}; "
                f"choose one of {[p.value for p in OutlineNumbers]}"
            )
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ConfigError(f"ControllerConfig.request_timeout_s must be > 0 or None, got {self.request_timeout_s}")


class RolloutError(EngineError):
    """A trajectory failed because an engine call failed (exception, abort, timeout, or an answer that
    breaks the engine contract)."""


@dataclass(frozen=True)
class ControllerEvent:
    """One intervention of the controller: what (``reason``), where (``path`` as in Request.path)."""

    reason: Reason
    path: tuple[int, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class EngineCall:
    """One engine call, for metrics and tests (times are seconds since the trajectory started)."""

    path: tuple[int, ...]
    kind: RequestKind
    prompt_tokens: int
    max_tokens: int
    completion_tokens: int  # as returned by the engine, before any cut
    finish: str
    cached_tokens: int | None
    started_s: float
    ended_s: float


@dataclass
class RolloutResult:
    prompt_ids: list[int]
    response_ids: list[int]  # the final joined trajectory, structure closed
    requests: list[Request]  # in split_requests order; logprobs / finish / forced set
    stats: TrajectoryStats
    format_errors: list[FormatError]
    terminations: list[Reason]  # distinct reasons of ``events``, in order of first occurrence
    wall_time_s: float
    events: list[ControllerEvent] = field(default_factory=list)
    calls: list[EngineCall] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        """The response passes the format validator."""
        return not self.format_errors

    @property
    def ended_normally(self) -> bool:
        """No intervention was needed and the main line ended on EOS."""
        return not self.events and bool(self.requests) and self.requests[-1].finish == Finish.EOS

    @property
    def num_engine_calls(self) -> int:
        return len(self.calls)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens over all engine calls (what the engine had to read)."""
        return sum(c.prompt_tokens for c in self.calls)

    @property
    def cached_tokens(self) -> int | None:
        """Prompt tokens served from the prefix cache, where the engine reports it (None if never)."""
        known = [c.cached_tokens for c in self.calls if c.cached_tokens is not None]
        return sum(known) if known else None

    @property
    def cache_hit_rate(self) -> float | None:
        cached = self.cached_tokens
        reported = sum(c.prompt_tokens for c in self.calls if c.cached_tokens is not None)
        return cached / reported if cached is not None and reported else None

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly record of the trajectory (ids included)."""
        return {
            "prompt_ids": list(self.prompt_ids),
            "response_ids": list(self.response_ids),
            "stats": self.stats.as_dict(),
            "valid": self.valid,
            "format_errors": [str(e) for e in self.format_errors],
            "terminations": [str(t) for t in self.terminations],
            "events": [{"reason": str(e.reason), "path": list(e.path), "detail": e.detail} for e in self.events],
            "num_requests": len(self.requests),
            "num_engine_calls": self.num_engine_calls,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "cache_hit_rate": self.cache_hit_rate,
            "thread_requests": [
                {"prompt_tokens": c.prompt_tokens, "cached_tokens": c.cached_tokens}
                for c in self.calls
                if c.kind == RequestKind.THREAD
            ],
            "wall_time_s": self.wall_time_s,
        }


class _Run:
    """Mutable state of one trajectory."""

    def __init__(self, engine: Engine, prompt: list[int], routing_key: str, sampling: dict | None, max_requests: int):
        self.engine = engine
        self.prompt = prompt
        self.routing_key = routing_key
        self.sampling = sampling
        self.calls_left = max_requests
        self.blocks_used = 0
        self.stop_reason: Reason | None = None
        self.events: list[ControllerEvent] = []
        self.calls: list[EngineCall] = []
        self.t0 = time.perf_counter()

    def note(self, reason: Reason, path: tuple, detail: str = "") -> None:
        self.events.append(ControllerEvent(reason, tuple(path), detail))


@dataclass
class _Sampled:
    """What one request sampled, after the cuts the controller makes (a misbehaving engine's extra ids,
    an implicit close): the ids, their log-probs (None when the engine returned none), and the request's
    ``max_tokens``, stop ids and engine finish."""

    ids: list[int]
    logprobs: list[float] | None
    max_tokens: int
    stops: frozenset[int]
    finish: str

    def cut(self, n: int) -> None:
        """Keep the first ``n`` ids."""
        self.ids = self.ids[:n]
        self.logprobs = self.logprobs[:n] if self.logprobs is not None else None


@dataclass
class _Parsed:
    """Phase 2's reading of a line after one completion: its nodes, its Thread node (None on the main
    line), the top-level nodes, the closing ids the controller adds to the completion, and its last id."""

    nodes: tuple
    thread: Thread | None
    top: tuple
    tail: list[int]
    last: int


class _Line:
    """State of one line being generated: the main line (path ``()``) or a thread (from its fork context).

    ``ctx`` grows by each Request's completion and by each join; ``parser`` has read its response part,
    kept in step (it is fed each completion and join, so no request re-reads the context).
    ``closing`` is what the line needs closed as it stands. Once ``ended``, ``added`` and ``requests``
    are the line's result."""

    def __init__(
        self,
        ctrl: ForkJoinController,
        run: _Run,
        start: list[int],
        start_parser: Parser,
        path: tuple,
        depth: int,
        limit: int,
        limit_reason: Reason,
    ):
        self.ctrl, self.run = ctrl, run
        self.start_len = len(start)
        self.ctx = list(start)
        self.parser = start_parser  # the line's own: fed as the line grows
        self.path, self.depth = path, depth
        self.limit, self.limit_reason = limit, limit_reason
        self.is_thread = bool(path)
        self.kind = RequestKind.THREAD if self.is_thread else RequestKind.SEQUENTIAL
        self.requests: list[Request] = []
        # at its start a line needs nothing closed, or a thread its </Thread>
        self.closing: list[int] = [ctrl.tag_ids[Tag.THREAD_CLOSE]] if self.is_thread else []
        self.ended = False

    @property
    def used(self) -> int:
        """Tokens the line has added (of its ``limit``)."""
        return len(self.ctx) - self.start_len

    @property
    def offset(self) -> int:
        """Response offset where the line's next completion starts."""
        return len(self.ctx) - len(self.run.prompt)

    @property
    def added(self) -> list[int]:
        return self.ctx[self.start_len :]

    def note(self, reason: Reason, detail: str = "") -> None:
        self.run.note(reason, self.path, detail)

    def extend(self, ids: list[int]) -> None:
        self.ctx.extend(ids)
        self.parser.feed(self.ctrl.atoms(ids))

    def view(self, extra: list[int]) -> tuple[tuple, Thread | None, tuple]:
        """The line's nodes, its Thread node and the top-level nodes, with ``extra`` ids appended."""
        return self.ctrl.view(self.after(extra), self.path)

    def after(self, extra: list[int]) -> Parser:
        """A parser that has read the line's context and ``extra`` (the line's own is left as it is)."""
        return self.parser.copy().feed(self.ctrl.atoms(extra))

    def closing_after(self, extra: list[int]) -> list[int]:
        """Ids that close the line if ``extra`` is appended to it (its own ``</Thread>`` included)."""
        return self.ctrl.closing_of(*self.view(extra))

    def emit(self, ids: list[int], logprobs: list[float] | None, tail: list[int], finish: str) -> None:
        """Record a Request: the sampled ``ids`` plus the controller's ``tail``; extend the context."""
        completion = ids + tail
        if completion or self.is_thread:  # the splitter emits no empty main-line request
            self.requests.append(
                Request(
                    tuple(self.ctx),
                    tuple(completion),
                    self.kind,
                    self.path,
                    logprobs=tuple(logprobs) if logprobs is not None else None,
                    finish=finish,
                    forced=len(tail),
                )
            )
        self.extend(completion)

    def end(self, sampled: _Sampled, finish: str, then: Sequence[int] = ()) -> None:
        """End the line with ``sampled`` and the closing of all it leaves open (then ``then``, a final EOS),
        trimming generated ids if they and the closing overflow the line's limit."""
        room = self.limit - self.used
        tail = self.closing_after(sampled.ids) + list(then)
        trimmed = False
        while sampled.ids and len(sampled.ids) + len(tail) > room:
            sampled.cut(len(sampled.ids) - 1)
            tail = self.closing_after(sampled.ids) + list(then)
            trimmed = True
        if len(sampled.ids) + len(tail) > room:  # only an added final EOS can overflow: drop it
            tail = self.closing_after([])
        if trimmed:
            self.note(Reason.CLOSING_TRIMMED, f"{len(tail)} closing ids")
        self.end_closed(sampled.ids, sampled.logprobs, tail, finish)

    def end_closed(self, ids: list[int], logprobs: list[float] | None, tail: list[int], finish: str) -> None:
        """Emit the line's last completion and end it. When the closing ends a block with no thread (its
        outline list closed, by the model or by the closing), the empty join sits between two Requests,
        as in the splitter: the completion up to ``</Outlines>``, then the rest after the join."""
        self.ended = True
        nodes, _, _ = self.view(ids)
        last = nodes[-1] if nodes else None
        if not (
            isinstance(last, Block)
            and not last.closed
            and not last.threads
            and last.parts
            and isinstance(last.parts[-1], Outlines)
        ):
            self.emit(ids, logprobs, tail, finish)
            return
        outlines = last.parts[-1]
        a = (
            0
            if outlines.closed
            else 1
            + int(bool(outlines.parts) and isinstance(outlines.parts[-1], Outline) and not outlines.parts[-1].closed)
        )
        join = self.ctrl.empty_join
        assert tail[a : a + len(join)] == join, "closing of an empty block must be the empty join"
        if ids or a:
            self.emit(ids, logprobs, tail[:a], finish)
        self.extend(join)
        rest = tail[a + len(join) :]
        self.emit([], [] if rest else None, rest, Finish.FORCED)


class ForkJoinController:
    """Runs trajectories; stateless between runs, so one instance may serve many concurrent ``run`` calls.

    A line (the main line, or a thread) runs the method's state machine, one method per phase:
    :meth:`_sequential` (1: one request, decoded until a stop id), :meth:`_parse` (2: what the
    completion opened and closed; the line ends here on EOS or a thread's end), :meth:`_fork`
    (3: the threads of the block whose outline list the completion closed, concurrently),
    :meth:`_join` (4: the threads joined in outline order into the line's context) and
    :meth:`_continue` (5: the line goes on, or ends on a limit)."""

    def __init__(self, fmt: TokenFormat, config: ControllerConfig | None = None):
        self.fmt = fmt
        self.config = config = config or ControllerConfig()
        if config.max_depth > fmt.limits.max_depth:
            raise ConfigError(
                f"ControllerConfig.max_depth={config.max_depth} exceeds the format's "
                f"Limits.max_depth={fmt.limits.max_depth}: every nested block would be invalid. "
                "Lower max_depth or build the TokenFormat with matching Limits."
            )
        if config.max_threads_per_block > fmt.limits.max_threads_per_block:
            raise ConfigError(
                f"ControllerConfig.max_threads_per_block={config.max_threads_per_block} exceeds the "
                f"format's Limits.max_threads_per_block={fmt.limits.max_threads_per_block}. Lower it "
                "or build the TokenFormat with matching Limits."
            )
        self.tag_ids = {t: fmt.tag_id(t) for t in Tag}
        self.eos = frozenset(fmt.eos_ids)
        self.empty_join = fmt.join([], [])
        self._close_of = {
            Outline: self.tag_ids[Tag.OUTLINE_CLOSE],
            Outlines: self.tag_ids[Tag.OUTLINES_CLOSE],
            Thread: self.tag_ids[Tag.THREAD_CLOSE],
            Block: self.tag_ids[Tag.PARALLEL_CLOSE],
        }

    # ------------------------------------------------------------------ public
    async def run(
        self, engine: Engine, prompt_ids: Sequence[int], *, routing_key: str, sampling: dict | None = None
    ) -> RolloutResult:
        """Generate one trajectory after ``prompt_ids``; every request carries ``routing_key``."""
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ValueError("prompt_ids is empty: build it with data.chat.prompt_ids(tokenizer, messages)")
        if not routing_key:
            raise ValueError("routing_key must be a non-empty string (one per trajectory, e.g. its request id)")
        if sampling:
            bad = sorted(RESERVED_SAMPLING_KEYS & set(sampling))
            if bad:
                raise ValueError(
                    f"sampling must not set {bad}: the controller sets max_tokens and stop ids per "
                    "request from its budgets (ControllerConfig); remove them from the dict"
                )
        run = _Run(engine, prompt, routing_key, dict(sampling) if sampling else None, self.config.max_requests)
        main = await self._line(run, prompt, Parser(), (), 0, self.config.max_response_tokens, Reason.BUDGET_RESPONSE)
        ids, requests = main.added, main.requests
        traj = main.parser.tree()  # the main line's parser has read the whole response
        reasons: list[Reason] = []
        for e in run.events:
            if e.reason not in reasons:
                reasons.append(e.reason)
        return RolloutResult(
            prompt_ids=prompt,
            response_ids=ids,
            requests=requests,
            stats=self.fmt.stats(traj),
            format_errors=self.fmt.validate(traj),
            terminations=reasons,
            wall_time_s=time.perf_counter() - run.t0,
            events=run.events,
            calls=run.calls,
        )

    # ------------------------------------------------------------------ a line: the five phases
    async def _line(
        self,
        run: _Run,
        start: list[int],
        start_parser: Parser,
        path: tuple,
        depth: int,
        limit: int,
        limit_reason: Reason,
    ) -> _Line:
        """Generate one line from ``start`` (main line: path (); a thread: its fork context). Returns the
        ended line: ``added``, the ids it added (a thread's: after its header, ending in ``</Thread>``), and
        its ``requests``."""
        line = _Line(self, run, start, start_parser, path, depth, limit, limit_reason)
        while not line.ended:
            sampled = await self._sequential(line)
            if sampled is None:
                continue
            parsed = self._parse(line, sampled)
            if parsed is None:
                continue
            block = self._fork_point(line, parsed)
            if block is None:
                self._continue(line, sampled, parsed)
                continue
            forked = await self._fork(line, sampled, parsed, block)
            if forked is not None:
                self._join(line, *forked)
        return line

    async def _sequential(self, line: _Line) -> _Sampled | None:
        """Phase 1: one request from the line's context, decoded until a stop id, EOS or its max_tokens.
        Closes the line instead (None) when a budget is spent or the engine returns nothing."""
        run = line.run
        room = line.limit - line.used - len(line.closing)
        why = (
            run.stop_reason
            or (Reason.BUDGET_REQUESTS if run.calls_left <= 0 else None)
            or (line.limit_reason if room < 1 else None)
        )
        if why:
            line.note(why)
            line.end_closed([], [] if line.closing else None, line.closing, Finish.FORCED)
            return None
        margin = self.config.close_reserve_tokens
        max_tokens = room - margin if room > margin else room
        stops = self._stops(line.is_thread, line.depth)
        comp = await self._call(run, line.ctx, max_tokens, stops, line.path, line.kind)
        sampled = _Sampled(
            [int(i) for i in comp.token_ids],
            [float(x) for x in comp.logprobs] if comp.logprobs is not None else None,
            max_tokens,
            frozenset(stops),
            comp.finish,
        )
        if len(sampled.ids) > max_tokens:
            line.note(Reason.ENGINE_OVERRUN, f"{len(sampled.ids)} ids for max_tokens={max_tokens}")
            sampled.cut(max_tokens)
        cut = next((i for i, t in enumerate(sampled.ids) if t in sampled.stops), None)
        if cut is not None and cut < len(sampled.ids) - 1:
            line.note(Reason.TOKENS_AFTER_STOP, f"{len(sampled.ids) - cut - 1} ids after stop id {sampled.ids[cut]}")
            sampled.cut(cut + 1)
        if not sampled.ids:
            line.note(Reason.EMPTY_COMPLETION)
            line.end(sampled, sampled.finish)
            return None
        return sampled

    def _parse(self, line: _Line, sampled: _Sampled) -> _Parsed | None:
        """Phase 2: read what the completion opened and closed. A tag that ended open elements without
        their closing tag cuts the completion there and the controller adds the closing tags. Ends the
        line (None) on a thread's ``</Thread>``, on EOS, when a thread broke out of its block, or when
        there is no room to go on after an implicit close."""
        parser = line.after(sampled.ids)
        nodes, thread, top = self.view(parser, line.path)
        tail: list[int] = []  # closing ids the controller adds to this completion
        implicit = parser.first_ended_open(line.offset)
        if implicit is not None:
            offset, ended = implicit
            keep = offset - line.offset
            detail = f"id {sampled.ids[keep]} at completion offset {keep}"
            sampled.cut(keep)
            if thread is not None and any(n is thread for n in ended):
                line.note(Reason.THREAD_BREAKOUT, detail)
                line.end(sampled, Finish.STOP)
                return None
            tail = [self._close_of[type(n)] for n in ended]
            line.note(Reason.IMPLICIT_CLOSE, detail)
            nodes, thread, top = line.view(sampled.ids + tail)
            if line.used + len(sampled.ids) + len(tail) + len(self.closing_of(nodes, thread, top)) > line.limit:
                line.note(line.limit_reason, "no room to go on after closing")
                line.end(sampled, Finish.STOP)
                return None
        elif thread is not None and thread.closed:  # its </Thread> is the last id (cut at the first stop)
            line.emit(sampled.ids, sampled.logprobs, [], Finish.STOP)
            line.ended = True
            return None
        last = tail[-1] if tail else sampled.ids[-1]
        if last in self.eos:
            self._end_at_eos(line, sampled, nodes, thread, top, last)
            return None
        return _Parsed(nodes, thread, top, tail, last)

    def _end_at_eos(self, line: _Line, sampled: _Sampled, nodes: tuple, thread, top: tuple, eos: int) -> None:
        """The completion ended on EOS: a thread's EOS becomes its closing (the main line goes on after the
        join); the main line ends, its open structure closed before a final EOS."""
        if line.is_thread:
            line.note(Reason.EOS_IN_THREAD)
            sampled.cut(len(sampled.ids) - 1)
            line.end(sampled, Finish.EOS)
        elif not self.closing_of(nodes, thread, top):  # (EOS closes nothing: same as without it)
            line.emit(sampled.ids, sampled.logprobs, [], Finish.EOS)
            line.ended = True
        else:
            line.note(Reason.CLOSED_AT_EOS)
            sampled.cut(len(sampled.ids) - 1)
            line.end(sampled, Finish.EOS, then=[eos])

    def _fork_point(self, line: _Line, parsed: _Parsed) -> Block | None:
        """The block to fork: the completion closed its outline list (and the line may open blocks)."""
        if parsed.last != self.tag_ids[Tag.OUTLINES_CLOSE] or not self._can_fork(line.depth):
            return None
        return self._open_outline_list(parsed.nodes)

    async def _fork(
        self, line: _Line, sampled: _Sampled, parsed: _Parsed, block: Block
    ) -> tuple[list[int], Parser, list[int], list[list[int]], list[int]] | None:
        """Phase 3: fork the threads of ``block`` from the shared context (the line up to ``</Outlines>``),
        each with its share of the budget, all in flight at once. Returns (shared context, a parser that read it,
        the thread numbers, each thread's ids, the line's closing after the join), or None when the line
        ends instead (the block budget is spent, or not even an empty join fits)."""
        run = line.run
        if run.blocks_used >= self.config.max_blocks:
            run.stop_reason = Reason.BUDGET_BLOCKS
            line.note(Reason.BUDGET_BLOCKS)
            line.end(sampled, Finish.STOP)
            return None
        shared = line.ctx + sampled.ids + parsed.tail
        shared_parser = line.after(sampled.ids + parsed.tail)
        plan = self._plan_fork(line, shared, shared_parser, block)
        if plan is None:  # not even an empty join fits: close the block where it stands
            line.end(sampled, Finish.STOP)
            return None
        numbers, share, reason, after = plan
        line.emit(sampled.ids, sampled.logprobs, parsed.tail, Finish.STOP)
        nblock = sum(isinstance(n, Block) for n in parsed.nodes)
        run.blocks_used += 1
        coros = []
        for i, n in enumerate(numbers, start=1):
            context = self.fmt.fork_context(shared, n)
            thread_parser = shared_parser.copy().feed(self.atoms(context[len(shared) :]))
            coros.append(
                self._line(run, context, thread_parser, line.path + (nblock, i), line.depth + 1, share, reason)
            )
        threads = await _gather(coros)
        for thread in threads:  # outline order, each thread's own requests depth first
            line.requests.extend(thread.requests)
        return shared, shared_parser, numbers, [thread.added for thread in threads], after

    def _join(
        self,
        line: _Line,
        shared: list[int],
        shared_parser: Parser,
        numbers: list[int],
        threads: list[list[int]],
        after: list[int],
    ) -> None:
        """Phase 4: the line's context becomes the shared context + the threads in outline order."""
        joined = self.fmt.join(shared, list(zip(numbers, threads)))
        line.ctx = joined
        line.parser = shared_parser.feed(self.atoms(joined[len(shared) :]))  # (the threads have their own)
        line.closing = after

    def _continue(self, line: _Line, sampled: _Sampled, parsed: _Parsed) -> None:
        """Phase 5: the completion ended with no fork. After an implicit close or a stop id that opened no
        block and closed no thread the line goes on; otherwise it ended on a limit and is closed."""
        if parsed.tail:  # closed what the model ended implicitly: the line goes on
            line.closing = self.closing_of(parsed.nodes, parsed.thread, parsed.top)
            line.emit(sampled.ids, sampled.logprobs, parsed.tail, Finish.STOP)
            return
        if parsed.last in sampled.stops:
            line.note(Reason.STRAY_STOP, f"stop id {parsed.last} opened no block and closed no thread")
            line.closing = self.closing_of(parsed.nodes, parsed.thread, parsed.top)
            if line.used + len(sampled.ids) + len(line.closing) > line.limit:
                line.note(line.limit_reason, "no room to go on after the stop")
                line.end(sampled, Finish.STOP)
                return
            line.emit(sampled.ids, sampled.logprobs, [], Finish.STOP)
            return
        finish = Finish.LENGTH
        if sampled.finish == Finish.LENGTH or len(sampled.ids) >= sampled.max_tokens:
            line.note(Reason.TRUNCATED, f"{len(sampled.ids)} ids, max_tokens={sampled.max_tokens}")
            if len(sampled.ids) >= sampled.max_tokens:
                line.note(line.limit_reason)
        else:
            finish = sampled.finish
            line.note(Reason.ENGINE_STOP_WITHOUT_STOP_ID, f"finish={str(sampled.finish)!r}, last id {parsed.last}")
        line.end(sampled, finish)

    # ------------------------------------------------------------------ structure helpers
    def atoms(self, ids: Sequence[int]) -> list:
        return id_atoms(ids, self.fmt.vocab)

    def view(self, parser: Parser, path: tuple) -> tuple[tuple, Thread | None, tuple]:
        """Find a line in the tree of its context (the response part, read by ``parser``): (its nodes, its
        Thread node or None on the main line, the top-level nodes). In its own context a thread is always
        the first thread of its block (siblings are not in it)."""
        top = parser.tree().body
        nodes, thread = top, None
        for b in path[0::2]:
            blocks = [n for n in nodes if isinstance(n, Block)]
            thread = blocks[b - 1].threads[0]
            nodes = thread.body
        return nodes, thread, top

    def _open_ids(self, nodes: tuple) -> list[int]:
        """Ids closing what is open at the end of a line (innermost first). A block left with a closed
        outline list and no thread is closed in the layout of an empty join (fork gap, join gap,
        ``</Parallel>``), as the splitter expects."""
        out: list[int] = []
        last = nodes[-1] if nodes else None
        if isinstance(last, Block) and not last.closed:
            part = last.parts[-1] if last.parts else None
            outlines_closed = isinstance(part, Outlines) and part.closed
            if isinstance(part, Outlines) and not part.closed:
                inner = part.parts[-1] if part.parts else None
                if isinstance(inner, Outline) and not inner.closed:
                    out.append(self.tag_ids[Tag.OUTLINE_CLOSE])
                out.append(self.tag_ids[Tag.OUTLINES_CLOSE])
                outlines_closed = True
            elif isinstance(part, Thread) and not part.closed:
                out += self._open_ids(part.body) + [self.tag_ids[Tag.THREAD_CLOSE]]
            if outlines_closed and not last.threads:
                out += self.empty_join
            else:
                out.append(self.tag_ids[Tag.PARALLEL_CLOSE])
        return out

    def closing_of(self, nodes: tuple, thread: Thread | None, top: tuple) -> list[int]:
        """Ids that close a line as :meth:`view` finds it (its own ``</Thread>`` included)."""
        ids = self._open_ids(nodes)
        if thread is not None:
            ids.append(self.tag_ids[Tag.THREAD_CLOSE])
        else:  # validate's rule: <think> seen and no </think> anywhere
            markers = {n.tag for n in top if isinstance(n, Marker)}
            if Tag.THINK_OPEN in markers and Tag.THINK_CLOSE not in markers:
                ids.append(self.tag_ids[Tag.THINK_CLOSE])
        return ids

    @staticmethod
    def _open_outline_list(nodes: tuple) -> Block | None:
        """The block whose outline list just closed at the end of the line, with no thread yet."""
        last = nodes[-1] if nodes else None
        if (
            isinstance(last, Block)
            and not last.closed
            and last.parts
            and isinstance(last.parts[-1], Outlines)
            and last.parts[-1].closed
            and not last.threads
        ):
            return last
        return None

    def _can_fork(self, depth: int) -> bool:
        return self.config.fork and depth + 1 <= self.config.max_depth

    def _stops(self, thread: bool, depth: int) -> list[int]:
        fmt = self.fmt
        stops = fmt.thread_stop_ids if thread else (fmt.sequential_stop_ids if self.config.fork else list(fmt.eos_ids))
        if not self._can_fork(depth):
            stops = [i for i in stops if i != self.tag_ids[Tag.OUTLINES_CLOSE]]
        return list(stops)

    # ------------------------------------------------------------------ fork planning
    def _choose_threads(self, run: _Run, block: Block, path: tuple) -> list[int]:
        numbers = outline_numbers(block, self.fmt.decode)
        if self.config.outline_numbers == OutlineNumbers.BY_POSITION:
            chosen = list(range(1, len(numbers) + 1))
            if numbers != chosen:
                run.note(Reason.OUTLINE_NUMBERS_RENUMBERED, path, f"outlines numbered {numbers}")
        else:
            chosen, seen = [], set()
            dropped, repeated = [], []
            for n in numbers:
                if n is None or not 1 <= n <= len(numbers):
                    dropped.append(n)
                elif n in seen:
                    repeated.append(n)
                else:
                    seen.add(n)
                    chosen.append(n)
            if dropped:
                run.note(Reason.OUTLINE_NUMBERS_DROPPED, path, f"outlines numbered {numbers}; dropped {dropped}")
            if repeated:
                run.note(Reason.OUTLINE_NUMBERS_DEDUPLICATED, path, f"outlines numbered {numbers}; repeated {repeated}")
        if len(chosen) > self.config.max_threads_per_block:
            run.note(
                Reason.BUDGET_THREADS_PER_BLOCK,
                path,
                f"{len(chosen)} outlines, {self.config.max_threads_per_block} threads forked",
            )
            chosen = chosen[: self.config.max_threads_per_block]
        return chosen

    def _plan_fork(
        self, line: _Line, shared: list[int], shared_parser: Parser, block: Block
    ) -> tuple[list[int], int, Reason, list[int]] | None:
        """Which threads to fork for the block whose outline list ends ``shared``, and each one's token
        budget: (numbers, share, the share's budget reason, the line's closing after the join); None
        when not even an empty join fits."""
        fmt, cfg = self.fmt, self.config
        numbers = self._choose_threads(line.run, block, line.path)
        after = self.closing_of(*self.view(shared_parser.copy().feed(self.atoms(self.empty_join)), line.path))
        room = line.limit - (len(shared) - line.start_len) - len(after)
        k, share = 0, 0
        for kk in range(len(numbers), 0, -1):
            avail = room - (len(fmt.join(shared, [(n, ()) for n in numbers[:kk]])) - len(shared))
            if avail >= kk:  # at least the closing </Thread> of each
                k = kk
                share = (avail - cfg.join_reserve_tokens) // kk
                share = share if share >= 1 else avail // kk
                break
        if k == 0 and room < len(fmt.join(shared, [])) - len(shared):
            line.note(line.limit_reason, "no room to join the block")
            return None
        if k < len(numbers):
            line.note(line.limit_reason, f"{len(numbers) - k} of {len(numbers)} threads not forked")
        if share >= cfg.max_thread_tokens:
            return numbers[:k], cfg.max_thread_tokens, Reason.BUDGET_THREAD, after
        return numbers[:k], share, line.limit_reason, after

    # ------------------------------------------------------------------ engine
    async def _call(
        self, run: _Run, ctx: list[int], max_tokens: int, stops: list[int], path: tuple, kind: RequestKind
    ) -> Completion:
        run.calls_left -= 1
        index = len(run.calls)
        started = time.perf_counter() - run.t0
        where = (
            f"trajectory {run.routing_key!r}: engine call {index + 1} ({kind}, path {list(path)}, "
            f"{len(ctx)} prompt ids, max_tokens={max_tokens})"
        )
        timeout = self.config.request_timeout_s
        try:
            call = run.engine.complete(
                ctx, max_tokens=max_tokens, stop_token_ids=stops, routing_key=run.routing_key, sampling=run.sampling
            )
            comp = await (asyncio.wait_for(call, timeout) if timeout else call)
        except asyncio.CancelledError:
            raise
        except TimeoutError as e:
            raise RolloutError(
                f"{where} timed out after {timeout} s; the trajectory is failed "
                "(raise ControllerConfig.request_timeout_s if the engine is just slow)"
            ) from e
        except Exception as e:  # noqa: BLE001 - re-raised with the trajectory's context
            raise RolloutError(f"{where} failed: {type(e).__name__}: {e}") from e
        if not isinstance(comp, Completion):
            raise RolloutError(f"{where}: the engine returned {type(comp).__name__}, not a Completion")
        if comp.finish == Finish.ABORT:
            raise RolloutError(f"{where}: the engine aborted the request; the trajectory is failed")
        if comp.logprobs is not None and len(comp.logprobs) != len(comp.token_ids):
            raise RolloutError(
                f"{where}: the engine returned {len(comp.logprobs)} log-probs for {len(comp.token_ids)} ids "
                "(the engine adapter must return one per id, or None); the trajectory is failed"
            )
        run.calls.append(
            EngineCall(
                path,
                kind,
                len(ctx),
                max_tokens,
                len(comp.token_ids),
                comp.finish,
                comp.cached_tokens,
                started,
                time.perf_counter() - run.t0,
            )
        )
        return comp


async def _gather(coros: Sequence[Awaitable]) -> list:
    """``asyncio.gather`` that cancels the siblings when one fails (a failed thread fails the trajectory)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
