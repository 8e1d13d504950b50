"""The fork/join controller against a scripted engine: normal runs, adversarial model output,
budgets and engine failures. The real engine (vLLM CPU over HTTP) is tested in
test_rollout_vllm.py; here a stand-in answers so every edge case can be forced."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from threadweaver_verl.data.chat import prompt_ids
from threadweaver_verl.format import (
    Block,
    Limits,
    Marker,
    Outline,
    Outlines,
    RequestKind,
    Rule,
    Tag,
    Thread,
    TokenFormat,
    split_requests,
)
from threadweaver_verl.format.tree import Parser, parse_atoms
from threadweaver_verl.rollout import controller as controller_module
from threadweaver_verl.rollout.controller import (
    LINE_SPLITTING,
    ControllerConfig,
    ForkJoinController,
    OutlineNumbers,
    Reason,
    RolloutError,
)
from threadweaver_verl.rollout.engine import Completion, EngineError, Finish


class _CheckedParser(Parser):
    """The controller's parser, checking every reading against one pass over everything it was fed: the
    controller feeds each line's parser piece by piece and reads what-ifs from copies instead of
    re-reading the context, and must see exactly what a fresh parse of that context gives."""

    def __init__(self) -> None:
        super().__init__()
        self.fed: list = []

    def copy(self) -> _CheckedParser:
        other = super().copy()
        other.fed = list(self.fed)
        return other

    def feed(self, atoms) -> _CheckedParser:
        atoms = list(atoms)
        self.fed += atoms
        return super().feed(atoms)

    def tree(self):
        tree = super().tree()
        assert tree == parse_atoms(self.fed), "the incremental tree differs from a fresh parse"
        return tree

    def first_ended_open(self, from_offset: int):
        found = super().first_ended_open(from_offset)
        assert found == Parser().feed(self.fed).first_ended_open(from_offset)
        return found


@pytest.fixture(autouse=True)
def checked_parser(monkeypatch):
    """Every test here runs the controller with :class:`_CheckedParser`."""
    monkeypatch.setattr(controller_module, "Parser", _CheckedParser)


@pytest.fixture(scope="module")
def prompt(tok):
    return prompt_ids(tok, [{"role": "user", "content": "What is 6*7?"}])


class ScriptedEngine:
    """Answers each request with ``respond(context_text)`` where context_text is the decoded response
    part of the request's prompt. An answer may be a str (encoded, then cut at the first stop id and at
    max_tokens like vLLM does), an exception to raise, or a Completion returned as is (to misbehave)."""

    def __init__(
        self,
        fmt: TokenFormat,
        prompt: list[int],
        respond: Callable[[str], object],
        delay: float = 0.0,
        logprob: float = -0.25,
    ):
        self.fmt, self.prompt, self.respond, self.delay, self.logprob = fmt, prompt, respond, delay, logprob
        self.calls: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def complete(self, prompt_ids, *, max_tokens, stop_token_ids, routing_key, sampling=None):
        assert max_tokens >= 1
        assert list(prompt_ids[: len(self.prompt)]) == list(self.prompt)
        text = self.fmt.decode(prompt_ids[len(self.prompt) :])
        self.calls.append(
            {
                "text": text,
                "max_tokens": max_tokens,
                "stops": list(stop_token_ids),
                "routing_key": routing_key,
                "sampling": sampling,
            }
        )
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            answer = self.respond(text)
            if isinstance(answer, BaseException):
                raise answer
            if isinstance(answer, Completion):
                return answer
            out = self.fmt.fragment_ids(answer)
            cut = next((i for i, t in enumerate(out) if t in stop_token_ids), None)
            if cut is not None:
                out = out[: cut + 1]
            finish = Finish.STOP if cut is not None and cut < max_tokens else Finish.LENGTH
            out = out[:max_tokens]
            if finish == Finish.LENGTH and len(out) < max_tokens:
                finish = Finish.STOP  # ran out of script: like a stop string
            return Completion(out, finish, [self.logprob] * len(out))
        finally:
            self.in_flight -= 1


def block(*outlines: str) -> str:
    return "<Parallel>\n<Outlines>\n" + "".join(f"<Outline>{o}</Outline>\n" for o in outlines) + "</Outlines>"


def run(fmt, prompt, respond, config=None, *, delay=0.0, sampling=None, key="traj-1"):
    engine = ScriptedEngine(fmt, prompt, respond, delay)
    result = asyncio.run(
        ForkJoinController(fmt, config or ControllerConfig()).run(engine, prompt, routing_key=key, sampling=sampling)
    )
    return result, engine


def assert_closed(traj) -> None:
    """Every element of the parsed response is closed, and a <think> has its </think>."""

    def walk(nodes):
        for n in nodes:
            if isinstance(n, (Block, Outlines, Outline, Thread)):
                assert n.closed, n
                walk(n.parts if isinstance(n, (Block, Outlines)) else n.body)

    walk(traj.body)
    markers = [n.tag for n in traj.body if isinstance(n, Marker)]
    assert Tag.THINK_OPEN not in markers or Tag.THINK_CLOSE in markers


def check(result, engine, fmt, prompt, config=None):
    """Invariants every trajectory keeps, whatever the model wrote."""
    cfg = config or ControllerConfig()
    assert len(engine.calls) <= cfg.max_requests
    assert len(engine.calls) == result.num_engine_calls
    assert len(result.response_ids) <= cfg.max_response_tokens
    # the structure is closed: nothing at the end of any line is left open
    assert not [e for e in result.format_errors if e.rule == Rule.UNCLOSED], result.format_errors
    assert_closed(fmt.parse(result.response_ids))
    # one routing key for the whole trajectory
    assert {c["routing_key"] for c in engine.calls} <= {"traj-1"}
    for r in result.requests:
        assert list(r.context_ids[: len(prompt)]) == list(prompt)
        assert 0 <= r.forced <= len(r.completion_ids)
        if r.logprobs is not None:
            assert len(r.logprobs) == len(r.completion_ids) - r.forced
        if r.kind == RequestKind.THREAD:
            assert r.completion_ids and r.completion_ids[-1] in (
                fmt.tag_id(Tag.THREAD_CLOSE),
                fmt.tag_id(Tag.OUTLINES_CLOSE),
            )
    # the main line's last request ends the response, or a join does (no request after it)
    mains = [r for r in result.requests if r.kind == RequestKind.SEQUENTIAL]
    full = list(prompt) + list(result.response_ids)
    if mains:
        assert full[: len(mains[-1].ids)] == list(mains[-1].ids)
        if len(mains[-1].ids) < len(full):
            assert full[-1] == fmt.tag_id(Tag.PARALLEL_CLOSE)
    # format-valid results are exactly what the splitter gives, unless an intervention split a line
    # into several requests; sequential mode writes blocks inline, in one request
    if result.valid and cfg.fork and not set(result.terminations) & LINE_SPLITTING:
        assert result.requests == split_requests(prompt, result.response_ids, fmt)
    return result


def text(fmt, result) -> str:
    return fmt.decode(result.response_ids)


# --------------------------------------------------------------------------- normal trajectories


def two_thread_script(t: str) -> str:
    if t.endswith("<Thread>\n1:"):
        return " six</Thread>"
    if t.endswith("<Thread>\n2:"):
        return " seven</Thread>"
    if t.endswith("</Parallel>"):
        return "\nso 42</think>\n\\boxed{42}<|im_end|>"
    return "<think>\nsplit " + block("1: a", "2: b")


def test_fork_join_matches_splitter_threads_concurrent(fmt, prompt):
    result, engine = run(fmt, prompt, two_thread_script, delay=0.05, sampling={"temperature": 0.7})
    check(result, engine, fmt, prompt)
    assert result.valid and result.ended_normally and result.terminations == []
    assert result.requests == split_requests(prompt, result.response_ids, fmt)
    assert [(r.kind, r.path) for r in result.requests] == [
        (RequestKind.SEQUENTIAL, ()),
        (RequestKind.THREAD, (1, 1)),
        (RequestKind.THREAD, (1, 2)),
        (RequestKind.SEQUENTIAL, ()),
    ]
    assert engine.max_in_flight == 2  # both threads in flight at once
    a, b = [c for c in result.calls if c.kind == RequestKind.THREAD]
    assert a.started_s < b.ended_s and b.started_s < a.ended_s
    # joined in outline order, each thread saw only the shared context and its header
    assert "<Thread>\n1: six</Thread>\n<Thread>\n2: seven</Thread>\n</Parallel>" in text(fmt, result)
    assert "six" not in engine.calls[2]["text"] and "seven" not in engine.calls[1]["text"]
    assert all(c["sampling"] == {"temperature": 0.7} for c in engine.calls)
    # stop ids: main line stops at </Outlines> or EOS; a thread at </Thread>, </Outlines> or EOS
    assert engine.calls[0]["stops"] == fmt.sequential_stop_ids
    assert engine.calls[1]["stops"] == fmt.thread_stop_ids
    assert all(r.logprobs == (-0.25,) * len(r.completion_ids) for r in result.requests)
    assert result.stats.num_blocks == 1 and result.stats.threads_per_block == (2,)
    assert result.stats.speedup > 1.0


def nested_script(t: str) -> str:
    if t.endswith("<Thread>\n1:") and t.count("<Parallel>") == 1:
        return " left " + block("1: p", "2: q")
    if t.endswith("<Thread>\n1:"):
        return " 11</Thread>"
    if t.endswith("<Thread>\n2:") and t.count("<Parallel>") == 2:
        return " 22</Thread>"
    if t.endswith("<Thread>\n2:"):
        return " right</Thread>"
    if t.endswith("</Parallel>") and t.count("</Parallel>") == 1:
        return " after</Thread>"  # the outer thread 1 continues after its nested join
    if t.endswith("</Parallel>"):
        return "\ndone</think>\\boxed{1}<|im_end|>"
    return "<think>\n" + block("1: a", "2: b")


def test_nested_blocks(fmt, prompt):
    result, engine = run(fmt, prompt, nested_script)
    check(result, engine, fmt, prompt)
    assert result.valid and result.ended_normally
    assert [(r.kind, r.path) for r in result.requests] == [
        (RequestKind.SEQUENTIAL, ()),
        (RequestKind.THREAD, (1, 1)),
        (RequestKind.THREAD, (1, 1, 1, 1)),
        (RequestKind.THREAD, (1, 1, 1, 2)),
        (RequestKind.THREAD, (1, 1)),
        (RequestKind.THREAD, (1, 2)),
        (RequestKind.SEQUENTIAL, ()),
    ]
    assert result.stats.num_blocks == 2 and result.stats.max_depth == 2
    # a thread of a nested block may not nest again (max_depth=2): </Outlines> is no stop there
    nested_calls = [c for c in engine.calls if c["text"].count("<Parallel>") == 2 and c["text"].endswith(":")]
    assert nested_calls and all(fmt.tag_id(Tag.OUTLINES_CLOSE) not in c["stops"] for c in nested_calls)


def test_max_depth_one_forbids_nesting(tok, prompt):
    fmt1 = TokenFormat.from_tokenizer(tok, limits=Limits(max_depth=1))
    cfg = ControllerConfig(max_depth=1)

    def script(t):
        if t.endswith("<Thread>\n1:"):  # writes a nested block inline: not forked
            return " x " + block("1: p") + "\n<Thread>\n1: y</Thread>"
        if t.endswith("1: y</Thread>"):  # the inline </Thread> stopped the request; it goes on
            return "\n</Parallel></Thread>"
        if t.endswith("<Thread>\n2:"):
            return " z</Thread>"
        if t.endswith("</Parallel>"):
            return "done<|im_end|>"
        return block("1: a", "2: b")

    result, engine = run(fmt1, prompt, script, cfg)
    check(result, engine, fmt1, prompt, cfg)
    assert all(fmt1.tag_id(Tag.OUTLINES_CLOSE) not in c["stops"] for c in engine.calls[1:3])
    assert "too_deep" in {e.rule for e in result.format_errors}
    assert result.stats.num_blocks == 2  # one forked, one written inline by thread 1
    assert Reason.STRAY_STOP in result.terminations  # the inline </Thread> ended a request, generation went on


def test_sequential_baseline(fmt, prompt):
    def script(t):
        threads = "<Thread>\n1: x</Thread>\n<Thread>\n2: y</Thread>\n</Parallel>"
        return "<think>\n" + block("1: a", "2: b") + threads + "\n</think>\\boxed{2}<|im_end|>"

    cfg = ControllerConfig(fork=False)
    result, engine = run(fmt, prompt, script, cfg)
    check(result, engine, fmt, prompt, cfg)
    assert len(engine.calls) == 1 and engine.calls[0]["stops"] == list(fmt.eos_ids)
    assert result.ended_normally and result.valid
    assert [r.kind for r in result.requests] == [RequestKind.SEQUENTIAL]


def test_realistic_trajectories_replay_request_for_request(tok, fmt):
    """The demo task's trajectories and RL-sized synthetic ones (2-8 threads, nested blocks): an engine that
    answers each request with the splitter's completion gets exactly the splitter's requests, and the
    trajectory back."""
    from _replay_engine import ReplayEngine

    from threadweaver_verl.data.chat import PromptStyle, response_ids
    from threadweaver_verl.sft.synthetic import TrajectoryShape, random_trajectory
    from threadweaver_verl.tasks.multiplication import Difficulty, make_samples

    def prompt_of(question: str) -> list[int]:
        return prompt_ids(tok, PromptStyle().messages(question))

    trajectories = {
        f"{preset}-{i}": (prompt_of(s.problem.question), response_ids(fmt, s.parallel))
        for preset in ("3x3", "4x4")
        for i, s in enumerate(make_samples(Difficulty.parse(preset), 3, seed=0, split="test"))
    }
    rng = random.Random(0)
    for i in range(8):
        shape = TrajectoryShape(
            tokens=rng.choice([300, 1500]), blocks=rng.randint(1, 3), max_threads=8, nested_prob=0.5
        )
        trajectories[f"synthetic-{i}"] = (prompt_of(f"synthetic {i}"), response_ids(fmt, random_trajectory(rng, shape)))
    engine = ReplayEngine(fmt, trajectories)
    longest = max(len(r) for _, r in trajectories.values())
    # budgets that cut nothing: the threads of a block share what is left equally, so leave room for that
    cfg = ControllerConfig(max_response_tokens=16 * longest, max_thread_tokens=longest, max_requests=512, max_blocks=64)
    depths = set()
    for key, (prompt, response) in trajectories.items():
        result = asyncio.run(ForkJoinController(fmt, cfg).run(engine, prompt, routing_key=key))
        assert result.response_ids == response and result.requests == engine.requests[key]
        assert result.valid and result.terminations == [] and result.ended_normally
        depths.add(result.stats.max_depth)
    assert depths == {1, 2}  # some with nested blocks


def test_malformed_and_unclosed_threads_in_one_trajectory(fmt, prompt):
    # thread 1 opens a nested block whose outline list a <Thread> interrupts (closed by the controller, then
    # forked), its nested thread ends on EOS, and thread 1 stops without a stop id; thread 2 breaks out of
    # its block; thread 3 writes a tag a thread may not hold; the main line ends on EOS with <think> open
    def script(t):
        if t.endswith("<Thread>\n1:") and t.count("<Parallel>") == 2:
            return " deep<|im_end|>"
        if t.endswith("<Thread>\n1:"):
            return " x <Parallel>\n<Outlines>\n<Outline>1: p<Thread>\n1: q</Thread>"
        if t.endswith("<Thread>\n2:"):
            return " y</Parallel> z</Thread>"
        if t.endswith("<Thread>\n3:"):
            return " w<Outline>stray</Thread>"
        if t.endswith("</Parallel>") and t.count("</Parallel>") == 1:
            return " after"
        if t.endswith("</Parallel>"):
            return " done<|im_end|>"
        return "<think>\n" + block("1: a", "2: b", "3: c")

    result, engine = run(fmt, prompt, script)
    check(result, engine, fmt, prompt)
    assert set(result.terminations) == {
        Reason.IMPLICIT_CLOSE,
        Reason.EOS_IN_THREAD,
        Reason.ENGINE_STOP_WITHOUT_STOP_ID,
        Reason.THREAD_BREAKOUT,
        Reason.CLOSED_AT_EOS,
    }
    out = text(fmt, result)
    assert "<Outline>1: p</Outline></Outlines>\n<Thread>\n1: deep</Thread>\n</Parallel> after</Thread>" in out
    assert "<Thread>\n2: y</Thread>" in out and out.endswith(" done</think><|im_end|>")
    assert result.stats.max_depth == 2  # (the nested block has one thread, thread 3 a stray tag)
    assert {e.rule for e in result.format_errors} == {"single_thread_block", "stray_tag"}


# --------------------------------------------------------------------------- adversarial model output


def test_thread_that_never_closes(fmt, prompt):
    cfg = ControllerConfig(max_thread_tokens=24)

    def script(t):
        if t.endswith("<Thread>\n1:"):
            return " 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0"
        if t.endswith("<Thread>\n2:"):
            return " ok</Thread>"
        if t.endswith("</Parallel>"):
            return " end<|im_end|>"
        return block("1: a", "2: b")

    result, engine = run(fmt, prompt, script, cfg)
    check(result, engine, fmt, prompt, cfg)
    assert result.valid
    assert result.terminations == [Reason.TRUNCATED, Reason.BUDGET_THREAD]
    assert result.events[0].path == (1, 1)
    t1 = result.requests[1]
    assert t1.forced == 1 and t1.completion_ids[-1] == fmt.tag_id(Tag.THREAD_CLOSE)
    assert len(t1.completion_ids) <= 24
    assert text(fmt, result).endswith("</Parallel> end<|im_end|>")


def test_eos_inside_thread(fmt, prompt):
    def script(t):
        if t.endswith("<Thread>\n1:"):
            return " six<|im_end|>"
        if t.endswith("<Thread>\n2:"):
            return " seven</Thread>"
        if t.endswith("</Parallel>"):
            return " 42<|im_end|>"
        return block("1: a", "2: b")

    result, engine = run(fmt, prompt, script)
    check(result, engine, fmt, prompt)
    assert result.valid and result.terminations == [Reason.EOS_IN_THREAD]
    assert result.events[0].path == (1, 1)
    assert "<Thread>\n1: six</Thread>" in text(fmt, result)
    assert text(fmt, result).count("<|im_end|>") == 1  # EOS was replaced, the main line went on
    t1 = result.requests[1]
    assert t1.finish == Finish.EOS and t1.forced == 1 and len(t1.logprobs) == len(t1.completion_ids) - 1


def outline_script(*outlines: str):
    def script(t):
        if "<Thread>" in t and t.endswith(":"):
            return f" t{t.rsplit(chr(10), 1)[-1]}</Thread>"
        if t.endswith("</Parallel>"):
            return " end<|im_end|>"
        return block(*outlines)

    return script


def thread_numbers(fmt, result) -> list[int]:
    from threadweaver_verl.format import leading_number

    traj = fmt.parse(result.response_ids)
    return [leading_number(th.body, fmt.decode) for th in traj.blocks[0].threads]


@pytest.mark.parametrize(
    "outlines,threads,reasons",
    [
        (("1: a", "1: b", "2: c"), [1, 2], [Reason.OUTLINE_NUMBERS_DEDUPLICATED]),
        (("1: a", "3: c"), [1], [Reason.OUTLINE_NUMBERS_DROPPED]),
        (("one: a", "2: b"), [2], [Reason.OUTLINE_NUMBERS_DROPPED]),
        (("1: a", "1000: b"), [1], [Reason.OUTLINE_NUMBERS_DROPPED]),
        (("x", "y"), [], [Reason.OUTLINE_NUMBERS_DROPPED]),
        ((), [], []),
    ],
)
def test_bad_outline_numbers(fmt, prompt, outlines, threads, reasons):
    result, engine = run(fmt, prompt, outline_script(*outlines))
    check(result, engine, fmt, prompt)
    assert thread_numbers(fmt, result) == threads
    assert result.terminations == reasons
    assert text(fmt, result).endswith("</Parallel> end<|im_end|>")
    assert len(engine.calls) == 2 + len(threads)
    if outlines:
        assert not result.valid  # the model's numbering stays wrong; the validator says so
    else:  # an empty outline list joins as an empty block, which the format rejects
        assert {e.rule for e in result.format_errors} == {Rule.EMPTY_BLOCK}


def test_by_position_policy(fmt, prompt):
    cfg = ControllerConfig(outline_numbers=OutlineNumbers.BY_POSITION)
    result, engine = run(fmt, prompt, outline_script("1: a", "1: b", "x: c"), cfg)
    check(result, engine, fmt, prompt, cfg)
    assert thread_numbers(fmt, result) == [1, 2, 3]
    assert result.terminations == [Reason.OUTLINE_NUMBERS_RENUMBERED]


def test_a_thousand_outlines(fmt, prompt):
    cfg = ControllerConfig(max_response_tokens=100_000)
    result, engine = run(fmt, prompt, outline_script(*[f"{i}: x" for i in range(1, 1001)]), cfg)
    check(result, engine, fmt, prompt, cfg)
    assert thread_numbers(fmt, result) == list(range(1, 9))
    assert result.terminations == [Reason.BUDGET_THREADS_PER_BLOCK]
    assert len(engine.calls) == 1 + 8 + 1


def test_empty_completions(fmt, prompt):
    # thread 1 returns nothing: it is closed at once; the main line goes on
    def script(t):
        if t.endswith("<Thread>\n1:"):
            return ""
        if t.endswith("<Thread>\n2:"):
            return " b</Thread>"
        if t.endswith("</Parallel>"):
            return " end<|im_end|>"
        return "<think>" + block("1: a", "2: b")

    result, engine = run(fmt, prompt, script)
    check(result, engine, fmt, prompt)
    assert result.terminations == [Reason.EMPTY_COMPLETION, Reason.CLOSED_AT_EOS] and result.events[0].path == (1, 1)
    assert "<Thread>\n1:</Thread>" in text(fmt, result)
    # an engine that always answers nothing: one call, empty response
    result, engine = run(fmt, prompt, lambda t: "")
    check(result, engine, fmt, prompt)
    assert len(engine.calls) == 1 and result.response_ids == [] and result.requests == []
    # after a join, an empty continuation still closes <think>
    result, engine = run(fmt, prompt, lambda t: "" if t.endswith("</Parallel>") else script(t))
    check(result, engine, fmt, prompt)
    assert text(fmt, result).endswith("</Parallel></think>") and result.requests[-1].forced == 1


def test_outlines_close_with_no_block_open(fmt, prompt):
    def script(t):
        if t.count("</Outlines>") == 1:
            return " then 42<|im_end|>"
        return "<think>\nlist</Outlines>"

    result, engine = run(fmt, prompt, script)
    check(result, engine, fmt, prompt)
    assert Reason.STRAY_STOP in result.terminations and Reason.CLOSED_AT_EOS in result.terminations
    assert text(fmt, result) == "<think>\nlist</Outlines> then 42</think><|im_end|>"
    assert Rule.STRAY_TAG in {e.rule for e in result.format_errors}
    # a model that writes only </Outlines> is stopped by max_requests
    cfg = ControllerConfig(max_requests=10)
    result, engine = run(fmt, prompt, lambda t: "</Outlines>", cfg)
    check(result, engine, fmt, prompt, cfg)
    assert len(engine.calls) == 10 and Reason.BUDGET_REQUESTS in result.terminations


def test_thread_breaking_out_of_its_block(fmt, prompt):
    def script(t):
        if t.endswith("<Thread>\n1:"):
            return " a</Parallel> escaped text</Thread>"
        if t.endswith("<Thread>\n2:"):
            return " b<Thread>\n3: sibling</Thread>"
        if t.endswith("</Parallel>"):
            return " end<|im_end|>"
        return block("1: a", "2: b")

    result, engine = run(fmt, prompt, script)
    check(result, engine, fmt, prompt)
    assert result.valid
    assert [e.reason for e in result.events] == [Reason.THREAD_BREAKOUT, Reason.THREAD_BREAKOUT]
    assert "<Thread>\n1: a</Thread>\n<Thread>\n2: b</Thread>\n</Parallel> end" in text(fmt, result)


def test_elements_ended_without_their_closing_tag(fmt, prompt):
    # "<Outline>1: a<Outline>": the second <Outline> would end the first one unclosed. The controller
    # cuts there, closes the first outline and lets the model go on.
    def script(t):
        if t.endswith("1: a</Outline>"):
            return "<Outline>2: b</Outline>\n</Outlines>"
        if "<Thread>" in t and t.endswith(":"):
            return " ok</Thread>"
        if t.endswith("</Parallel>"):
            return " end<|im_end|>"
        return "<Parallel>\n<Outlines>\n<Outline>1: a<Outline>2: b</Outline>\n</Outlines>"

    result, engine = run(fmt, prompt, script)
    check(result, engine, fmt, prompt)
    assert result.valid and result.terminations == [Reason.IMPLICIT_CLOSE]
    assert result.requests[0].forced == 1 and fmt.decode(result.requests[0].completion_ids).endswith("1: a</Outline>")
    assert thread_numbers(fmt, result) == [1, 2]

    # the model starts the threads itself without closing the outline list: the controller closes
    # outline and list, which is a fork point, and forks
    def script2(t):
        if "<Thread>" in t and t.endswith(":"):
            return " ok</Thread>"
        if t.endswith("</Parallel>"):
            return " end<|im_end|>"
        return block("1: a")[: -len("</Outlines>")].replace("1: a</Outline>\n", "1: a") + "<Thread>\n1: x"

    result, engine = run(fmt, prompt, script2)
    check(result, engine, fmt, prompt)
    assert result.terminations == [Reason.IMPLICIT_CLOSE]
    assert "<Outline>1: a</Outline></Outlines>\n<Thread>\n1: ok</Thread>\n</Parallel> end" in text(fmt, result)
    assert [(r.kind, r.path) for r in result.requests] == [
        (RequestKind.SEQUENTIAL, ()),
        (RequestKind.THREAD, (1, 1)),
        (RequestKind.SEQUENTIAL, ()),
    ]


def test_main_line_eos_with_think_open(fmt, prompt):
    result, engine = run(fmt, prompt, lambda t: "<think>\nhmm 42<|im_end|>")
    check(result, engine, fmt, prompt)
    assert text(fmt, result) == "<think>\nhmm 42</think><|im_end|>"
    assert result.terminations == [Reason.CLOSED_AT_EOS] and result.valid
    assert result.requests[-1].forced == 2


def test_engine_ignoring_stops_and_max_tokens(tok, prompt):
    fmt = TokenFormat.from_tokenizer(tok, limits=Limits(single_thread_blocks=True))  # (one thread below)

    def script(t):
        if t.endswith("<Thread>\n1:"):
            return Completion(fmt.fragment_ids(" a</Thread> more</Thread>"), Finish.STOP)
        if t.endswith("</Parallel>"):
            return Completion(fmt.fragment_ids(" end<|im_end|> junk"), Finish.STOP)
        return block("1: a")

    result, engine = run(fmt, prompt, script)
    check(result, engine, fmt, prompt)
    assert result.valid and result.terminations == [Reason.TOKENS_AFTER_STOP]
    assert result.requests[1].logprobs is None  # the engine returned none
    assert text(fmt, result).endswith(" end<|im_end|>")
    cfg = ControllerConfig(max_response_tokens=40)
    result, engine = run(fmt, prompt, lambda t: Completion(fmt.fragment_ids("7 " * 60), Finish.LENGTH), cfg)
    check(result, engine, fmt, prompt, cfg)
    assert Reason.ENGINE_OVERRUN in result.terminations


def test_logprobs_that_are_not_one_per_id_fail_the_trajectory(fmt, prompt):
    ids = fmt.fragment_ids("<think>\nhmm</think>\\boxed{1}<|im_end|>")
    with pytest.raises(RolloutError, match=f"{len(ids) - 1} log-probs for {len(ids)} ids"):
        run(fmt, prompt, lambda t: Completion(ids, Finish.STOP, [-0.5] * (len(ids) - 1)))


def test_stop_without_stop_id(fmt, prompt):
    result, engine = run(fmt, prompt, lambda t: Completion(fmt.fragment_ids("<think> cut"), Finish.STOP))
    check(result, engine, fmt, prompt)
    assert result.terminations == [Reason.ENGINE_STOP_WITHOUT_STOP_ID]
    assert text(fmt, result) == "<think> cut</think>"


# --------------------------------------------------------------------------- budgets


def test_budget_max_response_tokens_truncates_inside_an_outline(fmt, prompt):
    cfg = ControllerConfig(max_response_tokens=30)
    result, engine = run(fmt, prompt, lambda t: "<think>" + "<Parallel>\n<Outlines>\n<Outline>1: " + "9 " * 50, cfg)
    check(result, engine, fmt, prompt, cfg)
    assert len(result.response_ids) <= 30
    # the block is closed in the layout of an empty join (no thread was forked)
    assert text(fmt, result).endswith("</Outline></Outlines>\n\n</Parallel></think>")
    # the closing is longer than close_reserve_tokens: generated ids made room for it
    assert result.terminations == [Reason.TRUNCATED, Reason.BUDGET_RESPONSE, Reason.CLOSING_TRIMMED]
    # as in the splitter: the completion up to </Outlines>, the empty join, then </think> after it
    a, b = result.requests
    assert fmt.decode(a.completion_ids).endswith("</Outline></Outlines>") and a.forced == 2
    assert b.completion_ids == (fmt.tag_id(Tag.THINK_CLOSE),) and b.forced == 1
    assert {e.rule for e in result.format_errors} == {"thread_numbering"}  # an outline with no thread


def test_budget_max_response_tokens_shared_by_threads(fmt, prompt):
    cfg = ControllerConfig(max_response_tokens=120, max_thread_tokens=1000)

    def script(t):
        if "<Thread>" in t and t.endswith(":"):
            return " 5" * 200
        if t.endswith("</Parallel>"):
            return "</think>1<|im_end|>"
        return "<think>" + block("1: a", "2: b", "3: c")

    result, engine = run(fmt, prompt, script, cfg)
    check(result, engine, fmt, prompt, cfg)
    assert result.valid and len(result.response_ids) <= 120
    assert Reason.BUDGET_RESPONSE in result.terminations and Reason.BUDGET_THREAD not in result.terminations
    lengths = [len(r.completion_ids) for r in result.requests if r.kind == RequestKind.THREAD]
    assert max(lengths) - min(lengths) <= 1  # an equal share each


def test_closing_never_overflows_the_budget(fmt, prompt):
    # the model opens deep structure right at the limit: generated ids are trimmed for the closing
    cfg = ControllerConfig(max_response_tokens=20, close_reserve_tokens=0, fork=False)
    deep = "x" * 3 + "<think>" + "<Parallel><Thread>" * 10
    result, engine = run(fmt, prompt, lambda t: deep, cfg)
    check(result, engine, fmt, prompt, cfg)
    assert len(result.response_ids) <= 20 and Reason.CLOSING_TRIMMED in result.terminations


def test_budget_max_blocks(fmt, prompt):
    cfg = ControllerConfig(max_blocks=2)

    def script(t):
        if "<Thread>" in t and t.endswith(":"):
            return " x</Thread>"
        return "\nmore " + block("1: a", "2: b")  # opens a block forever

    result, engine = run(fmt, prompt, script, cfg)
    check(result, engine, fmt, prompt, cfg)
    assert result.terminations == [Reason.BUDGET_BLOCKS]
    assert result.stats.num_blocks == 3  # two forked, the third closed as it stood
    assert text(fmt, result).endswith("</Outlines>\n\n</Parallel>")
    assert len(engine.calls) == 3 + 2 * 2


def test_budget_max_requests(fmt, prompt):
    cfg = ControllerConfig(max_requests=3)

    def script(t):
        if "<Thread>" in t and t.endswith(":"):
            return " x</Thread>"
        return "<think>" + block("1: a", "2: b", "3: c")

    result, engine = run(fmt, prompt, script, cfg)
    check(result, engine, fmt, prompt, cfg)
    assert len(engine.calls) == 3
    assert result.terminations == [Reason.BUDGET_REQUESTS]
    forced = [r for r in result.requests if r.finish == Finish.FORCED]
    # thread 3 got no call (its </Thread> is inserted); the main line after the join is closed
    assert [(r.path, r.completion_ids) for r in forced] == [
        ((1, 3), (fmt.tag_id(Tag.THREAD_CLOSE),)),
        ((), (fmt.tag_id(Tag.THINK_CLOSE),)),
    ]
    assert result.valid and result.requests == split_requests(prompt, result.response_ids, fmt)


def test_budget_max_threads_per_block(fmt, prompt):
    cfg = ControllerConfig(max_threads_per_block=2)
    result, engine = run(fmt, prompt, outline_script("1: a", "2: b", "3: c", "4: d"), cfg)
    check(result, engine, fmt, prompt, cfg)
    assert thread_numbers(fmt, result) == [1, 2] and result.terminations == [Reason.BUDGET_THREADS_PER_BLOCK]


# --------------------------------------------------------------------------- engine failures


def test_engine_exception_fails_the_trajectory(fmt, prompt):
    def script(t):
        if t.endswith("<Thread>\n2:"):
            return EngineError("HTTP 500 from the server")
        return two_thread_script(t)

    engine = ScriptedEngine(fmt, prompt, script, delay=0.05)
    with pytest.raises(RolloutError, match=r"traj-1.*thread, path \[1, 2\].*HTTP 500") as info:
        asyncio.run(ForkJoinController(fmt).run(engine, prompt, routing_key="traj-1"))
    assert isinstance(info.value.__cause__, EngineError)
    assert len(engine.calls) == 3  # no retry as plain generation, no further request


def test_engine_timeout_fails_the_trajectory(fmt, prompt):
    class Hanging(ScriptedEngine):
        async def complete(self, *a, **kw):
            self.calls.append(kw)
            await asyncio.sleep(3600)

    engine = Hanging(fmt, prompt, lambda t: "")
    cfg = ControllerConfig(request_timeout_s=0.2)
    with pytest.raises(RolloutError, match="timed out after 0.2 s"):
        asyncio.run(ForkJoinController(fmt, cfg).run(engine, prompt, routing_key="traj-1"))
    assert len(engine.calls) == 1


def test_engine_abort_fails_the_trajectory(fmt, prompt):
    with pytest.raises(RolloutError, match="aborted"):
        run(fmt, prompt, lambda t: Completion([], Finish.ABORT))


# --------------------------------------------------------------------------- bad input


def test_bad_input_is_refused_clearly(fmt, prompt):
    engine = ScriptedEngine(fmt, prompt, lambda t: "")
    ctrl = ForkJoinController(fmt)
    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(ctrl.run(engine, prompt, routing_key="k", sampling={"max_tokens": 5}))
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        asyncio.run(ctrl.run(engine, [], routing_key="k"))
    with pytest.raises(ValueError, match="routing_key"):
        asyncio.run(ctrl.run(engine, prompt, routing_key=""))
    with pytest.raises(ValueError, match="max_requests"):
        ControllerConfig(max_requests=0)
    with pytest.raises(ValueError, match="outline_numbers"):
        ControllerConfig(outline_numbers="random")
    with pytest.raises(ValueError, match="Limits.max_depth"):
        ForkJoinController(fmt, ControllerConfig(max_depth=3))


# --------------------------------------------------------------------------- random model output

PIECES = [
    "<think>",
    "</think>",
    "<Parallel>",
    "</Parallel>",
    "<Outlines>",
    "</Outlines>",
    "<Outline>",
    "</Outline>",
    "<Thread>",
    "</Thread>",
    "<|im_end|>",
    "1:",
    "2:",
    "3:",
    "x",
    " 7",
    "\n",
    "",
]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],  # (checked_parser)
)
@given(
    seed=st.integers(0, 2**32 - 1),
    budget=st.integers(8, 200),
    max_requests=st.integers(1, 12),
    fork=st.booleans(),
    reserve=st.integers(0, 4),
)
def test_random_model_output_always_terminates_well_formed(fmt, prompt, seed, budget, max_requests, fork, reserve):
    rng = random.Random(seed)

    def script(t):
        n = rng.randint(0, 12)
        weights = [1] * 10 + [1, 4, 3, 2, 6, 6, 4, 1]
        return "".join(rng.choices(PIECES, weights=weights, k=n))

    cfg = ControllerConfig(
        max_response_tokens=budget,
        max_thread_tokens=max(4, budget // 3),
        max_requests=max_requests,
        max_blocks=3,
        fork=fork,
        close_reserve_tokens=reserve,
    )
    result, engine = run(fmt, prompt, script, cfg)
    check(result, engine, fmt, prompt, cfg)


def grammar_script(rng: random.Random):
    """A random model that mostly follows the format (random outline counts, nested blocks, EOS or
    truncation anywhere, occasional defects), so that many results are valid and split-checkable."""

    def outlines() -> str:
        k = rng.randint(0, 4)
        nums = list(range(1, k + 1))
        if rng.random() < 0.15 and nums:
            nums[rng.randrange(k)] = rng.choice([1, 7, 1000])
        return block(*[f"{n}: part" for n in nums])

    def script(t: str) -> str:
        in_thread = t.count("<Thread>") > t.count("</Thread>") or (t.endswith(":") and "<Thread>" in t)
        r = rng.random()
        words = " ".join(rng.choice(["7", "x", "carry", "sum"]) for _ in range(rng.randint(0, 6)))
        if in_thread:
            if r < 0.2:
                return words + " " + outlines()
            if r < 0.3:
                return words + "<|im_end|>"
            if r < 0.35:
                return words
            return words + "</Thread>"
        if r < 0.45:
            return ("<think>" if "<think>" not in t else "") + words + outlines()
        if r < 0.9:
            return words + ("</think>" if "<think>" in t and "</think>" not in t else "") + " \\boxed{1}<|im_end|>"
        return words

    return script


@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],  # (checked_parser)
)
@given(
    seed=st.integers(0, 2**32 - 1),
    budget=st.integers(30, 400),
    max_requests=st.integers(2, 30),
    reserve=st.integers(0, 4),
    join_reserve=st.integers(0, 40),
)
def test_random_format_following_model(fmt, prompt, seed, budget, max_requests, reserve, join_reserve):
    cfg = ControllerConfig(
        max_response_tokens=budget,
        max_thread_tokens=max(8, budget // 2),
        max_requests=max_requests,
        max_blocks=4,
        close_reserve_tokens=reserve,
        join_reserve_tokens=join_reserve,
    )
    result, engine = run(fmt, prompt, grammar_script(random.Random(seed)), cfg)
    check(result, engine, fmt, prompt, cfg)


def test_thread_closing_after_an_element_ended_without_its_tag(tok, prompt):
    # at the deepest level a thread may write a block inline; an inline thread ended by </Parallel>
    # (not by </Thread>) is closed by the controller before the thread's own </Thread> counts
    fmt1 = TokenFormat.from_tokenizer(tok, limits=Limits(max_depth=1))
    cfg = ControllerConfig(max_depth=1)

    def script(t):
        if t.endswith("<Thread>\n1:"):
            return " <Parallel><Thread>x</Parallel></Thread>"
        if t.endswith("x</Thread>"):
            return "</Parallel> y</Thread>"
        if t.endswith("</Parallel>"):
            return " end<|im_end|>"
        return block("1: a")

    result, engine = run(fmt1, prompt, script, cfg)
    check(result, engine, fmt1, prompt, cfg)
    assert result.terminations == [Reason.IMPLICIT_CLOSE]
    assert "<Thread>\n1: <Parallel><Thread>x</Thread></Parallel> y</Thread>" in text(fmt1, result)
