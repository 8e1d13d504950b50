"""Request: one engine call of fork/join inference, and the splitter.

A Request is a (context, completion) pair: the unit both training paths
(expanded rows, the trie) and RL consume. :func:`split_requests` gives, for a
finished trajectory, the ordered Requests fork/join inference issues for it:
main-line request, then each thread's requests in outline order (depth first),
then the main line again after the join. It uses only
:meth:`TokenFormat.fork_context` and :meth:`TokenFormat.join`, the helpers the
controller builds its contexts with.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from threadweaver_verl.format.tags import Tag
from threadweaver_verl.format.tokens import NonCanonicalTrajectory, TokenFormat
from threadweaver_verl.format.tree import Block, Outlines, Span, render_ids
from threadweaver_verl.format.validation import leading_number


class RequestKind(enum.StrEnum):
    SEQUENTIAL = "sequential"  # a main-line request
    THREAD = "thread"  # a request of a thread (its own line, from its fork context)


@dataclass(frozen=True)
class Request:
    context_ids: tuple[int, ...]  # prompt + everything before this request, as the engine saw it
    completion_ids: tuple[int, ...]  # what the engine returned (training targets)
    kind: RequestKind
    path: tuple[int, ...] = ()  # () main line; (b, t) thread t of block b; nested: (b, t, b2, t2)
    logprobs: tuple[float, ...] | None = field(default=None, compare=False)
    finish: str | None = field(default=None, compare=False)  # a rollout.engine.Finish
    # Trailing completion ids inserted by the controller, not sampled (closing tags after a
    # truncation, EOS or breakout). They have no log-prob (``logprobs`` covers the sampled ids
    # only) and should carry no loss.
    forced: int = field(default=0, compare=False)

    @property
    def ids(self) -> tuple[int, ...]:
        return self.context_ids + self.completion_ids


def split_requests(prompt_ids: Sequence[int], response_ids: Sequence[int], fmt: TokenFormat) -> list[Request]:
    """The Requests fork/join inference issues for ``response_ids`` after ``prompt_ids``.

    Raises :class:`NonCanonicalTrajectory` when the response is not in the layout
    inference produces (build text data with :meth:`TokenFormat.encode_text`).
    Replaying the Requests rebuilds the response exactly (see tests).
    """
    traj = fmt.parse(response_ids)
    errors = fmt.validate(traj)
    if errors:
        raise NonCanonicalTrajectory("cannot split an invalid trajectory: " + "; ".join(map(str, errors[:5])))
    out: list[Request] = []
    ctx = _line(list(prompt_ids), traj.body, RequestKind.SEQUENTIAL, (), [], fmt, out)
    if tuple(ctx[len(prompt_ids) :]) != tuple(response_ids):  # pragma: no cover - guarded by construction
        raise NonCanonicalTrajectory("replaying the requests does not rebuild the response")
    return out


def _line(
    ctx: list[int], nodes: tuple, kind: RequestKind, path: tuple, close: list[int], fmt: TokenFormat, out: list[Request]
) -> list[int]:
    """Emit the requests of one line (main line or thread body); return the context after it."""
    cur: list[int] = []
    nblock = 0
    for n in nodes:
        if not isinstance(n, Block):
            cur += render_ids(n, fmt.vocab)
            continue
        nblock += 1
        k = next(i for i, p in enumerate(n.parts) if isinstance(p, Outlines))
        cur.append(fmt.tag_id(Tag.PARALLEL_OPEN))
        for p in n.parts[: k + 1]:
            cur += render_ids(p, fmt.vocab)
        out.append(Request(tuple(ctx), tuple(cur), kind, path))
        shared = ctx + cur
        cur = []
        threads: list[tuple[int, list[int]]] = []
        for t_index, t in enumerate(n.threads, start=1):
            num = leading_number(t.body, fmt.decode)
            header = fmt.thread_header(num)[1:]  # the tag is the Thread node itself
            first = t.body[0].content
            if tuple(first[: len(header)]) != tuple(header):
                raise NonCanonicalTrajectory(
                    f"thread {t_index} of block {nblock} does not start with the header "
                    f"ids inference inserts ({header}); got {list(first[: len(header)])}"
                )
            rest = first[len(header) :]
            body = ((Span(rest),) if rest else ()) + t.body[1:]
            start = len(out)
            tctx = fmt.fork_context(shared, num)
            end = _line(
                tctx, body, RequestKind.THREAD, path + (nblock, t_index), [fmt.tag_id(Tag.THREAD_CLOSE)], fmt, out
            )
            if len(out) == start:  # pragma: no cover - a thread always yields at least its close tag
                raise NonCanonicalTrajectory("empty thread")
            threads.append((num, end[len(tctx) :]))
        joined = fmt.join(shared, threads)
        expected = shared + render_ids(Block(n.parts[k + 1 :], n.closed), fmt.vocab)[1:]
        if joined != expected:
            raise NonCanonicalTrajectory(
                f"block {nblock}: the text between threads is not the layout inference "
                "inserts (fork gap, thread separator, join gap)"
            )
        ctx = joined
    cur += close
    if cur or kind == RequestKind.THREAD:
        out.append(Request(tuple(ctx), tuple(cur), kind, path))
        ctx = ctx + cur
    return ctx
