"""Scripted stage-1 rewrites for the generator tests: sample traces whose question names a *behaviour*,
and the ``script(body, attempt)`` that answers each stage-1 step for that behaviour."""

from __future__ import annotations

import json
import random
import re

from _scripted_openai import Reply, Slow, Status

from threadweaver_verl.generator import prompts

# behaviour -> (expected status, expected rejection step or None)
EXPECTED = {
    "good": ("accepted", None),
    "nothink": ("accepted", None),  # trace without </think>: final section from the template
    "fenced": ("accepted", None),  # JSON inside a ```json fence
    "repair": ("accepted", None),  # malformed JSON first, fixed after the repair request
    "r429": ("accepted", None),  # HTTP 429 once
    "r500": ("accepted", None),  # HTTP 500 once
    "slow": ("accepted", None),  # first answer slower than the client timeout
    "badjson": ("rejected", prompts.Step.STRUCTURE),
    "truncated": ("rejected", prompts.Step.STRUCTURE),
    "gaps": ("rejected", prompts.Step.STRUCTURE),
    "dependent": ("rejected", prompts.Step.BLOCKS),
    "noblocks": ("rejected", prompts.Step.BLOCKS),
    "rewritten": ("rejected", prompts.Step.EDITS),
    "tagged": ("rejected", prompts.Step.OUTLINES),
    "wrongtrace": ("rejected", "input"),
}

_Q = re.compile(r"Problem ([a-z0-9]+)-(\d+):")


def numbers(k: int) -> tuple[int, int, int, int]:
    rng = random.Random(k)
    return rng.randint(11, 99), rng.randint(11, 99), rng.randint(11, 99), rng.randint(11, 99)


def make_sample(kind: str, k: int) -> dict:
    a, b, c, d = numbers(k)
    p1, p2 = a * b, c * d
    total = p1 + p2
    paras = [
        f"We need the two products {a}*{b} and {c}*{d}, then their sum.",
        f"First product: {a}*{b} = {p1}.",
        f"Second product, as before: {c}*{d} = {p2}.",
        f"Sum: {p1} + {p2} = {total}.",
        f"Check: {total} - {p2} = {p1}, consistent.",
        f"So the result is {total}.",
    ]
    claimed = total + 1 if kind == "wrongtrace" else total
    if kind == "nothink":
        trace = "\n\n".join(paras) + f" \\boxed{{{claimed}}}"
    else:
        trace = "\n\n".join(paras) + f"\n</think>\nThe answer is \\boxed{{{claimed}}}."
    return {
        "question": f"Problem {kind}-{k}: what is {a}*{b} + {c}*{d}?",
        "trace": trace,
        "answer": str(total),
        "id": f"{kind}-{k}",
    }


def good_answer(step: str, k: int) -> dict:
    a, b, c, d = numbers(k)
    if step == prompts.Step.STRUCTURE:
        return {
            "steps": [
                {"step": 1, "units": [1, 1], "purpose": "plan", "relies_on": []},
                {"step": 2, "units": [2, 2], "purpose": "first product", "relies_on": [1]},
                {"step": 3, "units": [3, 3], "purpose": "second product", "relies_on": [1]},
                {"step": 4, "units": [4, 4], "purpose": "sum", "relies_on": [2, 3]},
                {"step": 5, "units": [5, 6], "purpose": "check and conclude", "relies_on": [4]},
            ]
        }
    if step == prompts.Step.BLOCKS:
        return {"blocks": [{"threads": [[2, 2], [3, 3]]}]}
    if step == prompts.Step.EDITS:
        return {"blocks": [{"threads": [f"First product: {a}*{b} = {a * b}.", f"Second product: {c}*{d} = {c * d}."]}]}
    if step == prompts.Step.OUTLINES:
        return {"blocks": [{"outlines": [f"Compute {a}*{b}.", f"Compute {c}*{d}."]}]}
    raise AssertionError(step)


def bad_answer(kind: str, step: str, k: int) -> str | None:
    """The faulty answer a behaviour gives at ``step`` (None: answer well)."""
    if kind == "badjson" and step == prompts.Step.STRUCTURE:
        return 'Sure! Here are the steps: {"steps": [1, 2'
    if kind == "gaps" and step == prompts.Step.STRUCTURE:
        obj = good_answer(step, k)
        obj["steps"][2]["units"] = [4, 4]  # unit 3 never covered
        return json.dumps(obj)
    if kind == "dependent" and step == prompts.Step.BLOCKS:
        return json.dumps({"blocks": [{"threads": [[2, 2], [3, 4]]}]})  # step 4 relies on step 2
    if kind == "noblocks" and step == prompts.Step.BLOCKS:
        return json.dumps({"blocks": []})
    if kind == "rewritten" and step == prompts.Step.EDITS:
        return json.dumps(
            {
                "blocks": [
                    {
                        "threads": [
                            "Something else entirely, unrelated to the products here.",
                            "A different text with no overlap at all really.",
                        ]
                    }
                ]
            }
        )
    if kind == "tagged" and step == prompts.Step.OUTLINES:
        return json.dumps({"blocks": [{"outlines": ["Compute <Thread> one", "Compute two"]}]})
    return None


def script(body: dict, attempt: int, broken: frozenset = frozenset()):
    """Answer one chat request. ``broken``: behaviours whose every call fails with HTTP 500."""
    messages = body["messages"]
    step = prompts.step_of(messages)
    m = _Q.search(next(x["content"] for x in messages if x["role"] == "user"))
    assert step is not None and m is not None, f"unexpected request: {json.dumps(body)[:300]}"
    kind, k = m.group(1), int(m.group(2))
    repairs = sum(1 for x in messages if x["role"] == "assistant")
    if kind in broken:
        return Status(500)
    if kind == "r429" and step == prompts.Step.STRUCTURE and attempt == 0:
        return Status(429, '{"error": {"message": "rate limited"}}')
    if kind == "r500" and step == prompts.Step.EDITS and attempt == 0:
        return Status(500)
    if kind == "slow" and step == prompts.Step.OUTLINES and attempt == 0:
        return Slow(2.0, Reply(json.dumps(good_answer(step, k))))
    if kind == "truncated" and step == prompts.Step.STRUCTURE:
        return Reply(json.dumps(good_answer(step, k))[:40], finish_reason="length")
    if kind == "repair" and step == prompts.Step.STRUCTURE and repairs == 0:
        return Reply("{'steps': not json}")
    bad = bad_answer(kind, step, k)
    if bad is not None:
        return Reply(bad)
    text = json.dumps(good_answer(step, k))
    if kind == "fenced":
        text = f"```json\n{text}\n```"
    return Reply(text)
