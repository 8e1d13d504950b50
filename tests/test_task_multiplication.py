"""The synthetic multiplication task: thousands of generated problems, checked
with the real format module, the real tiny tokenizer and real math-verify."""

from __future__ import annotations

import math
import re

import pytest

from threadweaver_verl.data.chat import PromptStyle, prompt_ids
from threadweaver_verl.format import Block, RequestKind, Span, Thread, parse_text, split_requests
from threadweaver_verl.tasks import multiplication as mul

BOXED = re.compile(r"\\boxed\{(\d+)\}")

# Every preset, weighted towards the harder ones; 3000 problems in all.
SAMPLES_PER_PRESET = {name: 400 if len(d) == 2 and max(d) >= 3 else 250 for name, d in mul.PRESETS.items()}


@pytest.fixture(scope="module")
def many():
    out = []
    for k, (name, n) in enumerate(SAMPLES_PER_PRESET.items()):
        out += [(name, s) for s in mul.make_samples(mul.Difficulty.parse(name), n, seed=k)]
    assert len(out) >= 3000
    return out


def test_golden_example():
    """The documented layout, exactly (the module docstring shows the same text)."""
    s = mul.Problem((2468, 37))
    assert mul.parallel_solution(s) == (
        "<think>\n<Parallel>\n<Outlines>\n<Outline>1: *7</Outline>\n<Outline>2: *3</Outline>\n</Outlines>\n"
        "<Thread>\n1: *7 8*7=56+0=56 6*7=42+5=47 4*7=28+4=32 2*7=14+3=17</Thread>\n"
        "<Thread>\n2: *3 8*3=24+0=24 6*3=18+2=20 4*3=12+2=14 2*3=06+1=07</Thread>\n</Parallel>\n"
        "sum: 0+6=06 0+7=07+4=11 1+2=03+0=03 0+7=07+4=11 1+1=02+7=09 0+0=00\n</think>\n\\boxed{91316}"
    )
    assert mul.sequential_solution(s) == (
        "<think>\n1: *7 8*7=56+0=56 6*7=42+5=47 4*7=28+4=32 2*7=14+3=17\n"
        "2: *3 8*3=24+0=24 6*3=18+2=20 4*3=12+2=14 2*3=06+1=07\n"
        "sum: 0+6=06 0+7=07+4=11 1+2=03+0=03 0+7=07+4=11 1+1=02+7=09 0+0=00\n</think>\n\\boxed{91316}"
    )
    assert 2468 * 37 == 91316
    assert mul.parallel_solution(s) in mul.__doc__.replace("    ", "")


def test_every_solution_is_valid_splits_and_boxes_the_true_product(many, fmt, tok):
    style = PromptStyle()
    for name, s in many:
        digits = mul.PRESETS[name]
        assert [len(str(f)) for f in s.problem.factors] == list(digits)
        truth = math.prod(s.problem.factors)  # python ints, independent of the module
        for text in (s.parallel, s.sequential):
            assert [int(x) for x in BOXED.findall(text)] == [truth]
            assert text.startswith("<think>\n") and text.endswith(f"</think>\n\\boxed{{{truth}}}")
        prompt = prompt_ids(tok, style.messages(s.problem.question))
        tokens = mul.check_sample(s, fmt, prompt)  # validator, split_requests, same steps, boxed answer
        assert tokens.threads_per_block == digits[1:]
        # Replaying the Requests in order rebuilds the parallel solution's ids exactly.
        ids = fmt.encode_text(s.parallel)
        requests = split_requests(prompt, ids, fmt)
        assert list(requests[-1].ids) == prompt + ids
        assert sum(1 for r in requests if r.kind == RequestKind.THREAD) == sum(digits[1:])


def _value(expr: str) -> int:
    """Value of digits joined by * and + (leading zeros allowed)."""
    return sum(math.prod(int(f) for f in term.split("*")) for term in expr.split("+"))


def test_both_solutions_have_the_same_steps_and_the_right_count(many):
    for name, s in many[::7]:
        d = mul.PRESETS[name]
        steps = mul.steps_of(s.parallel)
        assert steps == mul.steps_of(s.sequential)
        width, expected = d[0], 0
        for k in d[1:]:
            expected += width * k + (width + k)  # k rows of `width` digit steps, then width + k sum columns
            width += k
        assert len(steps) == expected
        # Every move's arithmetic holds: "a*d=PQ+c=XY" and the running sum "c+t1=AB+t2=CD...".
        for step in steps:
            parts = step.split("=")
            if "*" in step:
                assert len(parts) == 3, step
            else:  # carry first, then one digit per move: at most 2 + threads-per-block parts
                assert 2 <= len(parts) <= 1 + max(d[1:]), step
                assert all(len(x.split("+")[0]) == 2 for x in parts[1:]), step
            for lhs, rhs in zip(parts, parts[1:]):
                assert _value(lhs) == int(rhs.split("+")[0]), step


def test_thread_bodies_start_with_their_header_and_threads_are_balanced(many, fmt):
    for name, s in many[::5]:
        traj = parse_text(s.parallel)
        blocks = [n for n in traj.body if isinstance(n, Block)]
        assert [len(b.threads) for b in blocks] == list(mul.PRESETS[name][1:])
        for b in blocks:
            lengths = set()
            outlines = [o.body[0].content for o in b.outlines.outlines]
            for j, t in enumerate(b.threads, start=1):
                assert isinstance(t, Thread) and isinstance(t.body[0], Span)
                # header "N:" then the outline's own text: a thread reads its digit by matching it
                assert outlines[j - 1].startswith(f"{j}: *")
                assert t.body[0].content.startswith(f"\n{outlines[j - 1]} ")
                lengths.add(len(fmt.encode_text(f"<think>{t.body[0].content}</think>")))
            assert len(lengths) == 1, f"unbalanced threads in {s.problem}"


def test_fixed_layout_per_difficulty(fmt):
    """All problems of a difficulty have the same token counts, except one answer digit."""
    for name in ("3x4", "3x2x2"):
        counts = [mul.check_sample(s, fmt) for s in mul.make_samples(mul.Difficulty.parse(name), 100, seed=3)]
        for field in ("sequential_T", "parallel_T", "parallel_L"):
            values = [getattr(c, field) for c in counts]
            assert max(values) - min(values) <= len(mul.PRESETS[name]) - 1, (name, field)


def test_generation_is_deterministic_and_distinct():
    d = mul.Difficulty.parse("4x3")
    a = mul.make_samples(d, 500, seed=7)
    assert a == mul.make_samples(d, 500, seed=7)
    assert a != mul.make_samples(d, 500, seed=8)
    assert mul.make_samples(d, 50, seed=7, split="test") != a[:50]
    assert len({s.problem for s in a}) == 500
    test = mul.generate_problems(d, 200, 7, "test")
    train = mul.generate_problems(d, 2000, 7, "train", exclude=test)
    assert not set(test) & set(train)


def test_difficulty_settings_and_errors():
    assert mul.Difficulty.parse("3x4").digits == (3, 4)
    assert mul.Difficulty.parse("5x3").digits == (5, 3)  # any digits, not only the presets
    assert mul.Difficulty.parse([2, 3, 2]).threads_per_block == (3, 2)
    with pytest.raises(mul.DifficultyError, match="2..9 digits"):
        mul.Difficulty.parse("4x1")
    with pytest.raises(mul.DifficultyError, match="preset"):
        mul.Difficulty.parse("hard")
    with pytest.raises(mul.DifficultyError, match="two factors"):
        mul.Difficulty((3,))
    with pytest.raises(mul.DifficultyError, match="only"):
        mul.generate_problems(mul.Difficulty((1, 2)), 1000, 0)


def test_check_sample_rejects_a_wrong_solution(fmt):
    s = mul.make_samples(mul.Difficulty.parse("3x3"), 1, seed=0)[0]
    wrong_answer = mul.Sample(s.problem, s.parallel.replace(s.problem.answer, str(s.problem.product + 1)), s.sequential)
    with pytest.raises(mul.BadSample, match="boxed"):
        mul.check_sample(wrong_answer, fmt)
    other_steps = mul.Sample(s.problem, s.parallel, s.sequential.replace("sum: ", "sum: 1+1=02 ", 1))
    with pytest.raises(mul.BadSample, match="different steps"):
        mul.check_sample(other_steps, fmt)


def test_boxed_answers_pass_real_math_verify(many):
    from threadweaver_verl.rl.correctness import check_answer

    for _, s in many[::60]:
        for text in (s.parallel, s.sequential):
            check = check_answer(text, s.problem.answer)
            assert check.correct, (check, s.problem)
        assert not check_answer(s.parallel, str(s.problem.product + 10)).correct
