"""The stage-1 prompts: one system prompt and one user message builder per LLM step.

Every step asks for a single JSON object and says exactly which keys it wants;
:mod:`threadweaver_verl.generator.rewrite` checks the answer strictly.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence


class Step(enum.StrEnum):
    """The steps of stage 1, in order (records, rejections and the scripted test server key on them).
    ``input`` and ``validate`` are checks of the stage itself; the four between are LLM calls, one prompt each."""

    INPUT = "input"  # 0: the trace cut into units, checked
    STRUCTURE = "structure"  # 1: steps of the solution and their dependencies
    BLOCKS = "blocks"  # 2: which runs of steps become parallel blocks, cut into threads
    EDITS = "edits"  # 3: minimal edits so that no thread depends on a sibling
    OUTLINES = "outlines"  # 4: one outline per thread
    VALIDATE = "validate"  # 5: the assembled trajectory checked


LLM_STEPS = (Step.STRUCTURE, Step.BLOCKS, Step.EDITS, Step.OUTLINES)

_JSON_ONLY = "Answer with one JSON object and nothing else: no explanation before or after it, no Markdown."

STRUCTURE_SYSTEM = f"""You study worked solutions of math problems to find out how their reasoning is organised.

The solution you receive is cut into numbered units, written as [U1], [U2], ... Group consecutive units into
steps. A step is one piece of work with a single purpose, for example: restating what is asked, setting up
notation, one computation, one case of a case analysis, checking a candidate, stating the conclusion.

For every step, list the earlier steps it relies on. Step B relies on step A when B uses a number, an
expression, a definition, a fact or a decision that is first obtained in A. Only list real uses: two steps that
both start from the problem statement, or from the same earlier step, do not rely on each other. When you are
unsure, list the dependency.

{_JSON_ONLY} Its form:
{{"steps": [{{"step": 1, "units": [1, 2], "purpose": "what this step does", "relies_on": []}},
            {{"step": 2, "units": [3, 3], "purpose": "...", "relies_on": [1]}}]}}

Rules: steps are numbered 1, 2, 3, ... in order; "units" is the first and the last unit of the step; the steps
cover every unit exactly once, in order, without gaps; "relies_on" lists only smaller step numbers."""

BLOCKS_SYSTEM = """You plan which parts of a worked solution can be done in parallel by independent workers.

You receive a problem and the steps of its solution, each with the steps it relies on. A parallel block is a
run of consecutive steps cut into threads. Each thread is a run of consecutive steps. All threads of a block
start from the same point: a thread may use anything obtained BEFORE the block, but no thread may rely on a
step of another thread of the same block. The text after the block may use the results of all its threads.

Good blocks: separate cases of a case analysis, independent sub-computations whose results are combined
later, checks of different candidates, different methods that verify each other. Prefer few, substantial
blocks with threads of similar size; a thread of a few words is not worth a block. Blocks never overlap.
If nothing can run in parallel, return an empty list.

Answer with one JSON object and nothing else: no explanation before or after it, no Markdown. Its form:
{"blocks": [{"threads": [[3, 4], [5, 6]]}, {"threads": [[8, 8], [9, 9], [10, 11]]}]}

Each pair is the first and the last step of a thread; the threads of a block are listed in order and follow
each other without gaps; a block has between 2 and MAX_THREADS threads."""

EDITS_SYSTEM = """You edit the threads of parallel blocks in a worked solution so that each thread stands on its own.

Each thread will be written by a separate worker who has read everything BEFORE its block but never sees the
other threads of the block. Change as little as possible so that every thread reads correctly without its
siblings:
- remove or rephrase references to other threads of the same block ("as in the previous case", "similarly",
  "now the second part", "the value found above" when it was found in a sibling);
- when a thread uses a quantity that a sibling introduced, derive it or state it inside the thread;
- drop transitions that link one thread to the next.
Keep every computation, every intermediate result and the wording of everything else exactly as it is. Do not
add new reasoning, do not shorten the work, do not use the markup tags <Parallel>, <Outlines>, <Outline>,
<Thread>, <think> or their closing forms.

Answer with one JSON object and nothing else: no explanation before or after it, no Markdown. Its form:
{"blocks": [{"threads": ["full edited text of thread 1", "full edited text of thread 2"]}]}

List the blocks in the order given and, in each block, one text per thread in the order given."""

OUTLINES_SYSTEM = """You write the plan line that announces each thread of a parallel block in a worked solution.

Before the threads of a block are written, the solution lists one outline per thread. A worker then writes
each thread seeing the text before the block and the outlines only. A good outline names the task of its
thread precisely enough that the worker knows what to compute or check, for example "Compute the remainder
of 7^100 modulo 8" or "Case x < 0: solve the equation without the absolute value". It must not state the
thread's result. One sentence each, plain text, no line breaks, no markup tags.

Answer with one JSON object and nothing else: no explanation before or after it, no Markdown. Its form:
{"blocks": [{"outlines": ["outline of thread 1", "outline of thread 2"]}]}

List the blocks in the order given and, in each block, one outline per thread in the order given."""


def _units_text(units: Sequence[str]) -> str:
    return "\n\n".join(f"[U{i}] {u}" for i, u in enumerate(units, start=1))


def structure_messages(question: str, units: Sequence[str]) -> list[dict[str, str]]:
    user = f"Problem:\n{question}\n\nSolution, in {len(units)} units:\n\n{_units_text(units)}"
    return [{"role": "system", "content": STRUCTURE_SYSTEM}, {"role": "user", "content": user}]


def blocks_messages(
    question: str, steps: Sequence[dict], step_texts: Sequence[str], max_threads: int
) -> list[dict[str, str]]:
    lines = []
    for s, text in zip(steps, step_texts):
        relies = ", ".join(str(r) for r in s["relies_on"]) or "nothing earlier"
        lines.append(f"Step {s['step']} (relies on: {relies}) - {s['purpose']}\n{text}")
    user = f"Problem:\n{question}\n\nSteps of the solution:\n\n" + "\n\n".join(lines)
    system = BLOCKS_SYSTEM.replace("MAX_THREADS", str(max_threads))
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def edits_messages(question: str, before: Sequence[str], blocks: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    """``before[b]``: the solution text before block b (threads of earlier blocks included);
    ``blocks[b]``: the original thread texts of block b."""
    parts = [f"Problem:\n{question}"]
    for b, (ctx, threads) in enumerate(zip(before, blocks), start=1):
        body = "\n\n".join(f"--- thread {t} ---\n{text}" for t, text in enumerate(threads, start=1))
        parts.append(f"=== Block {b} ===\nText before the block:\n{ctx}\n\nThreads of block {b}:\n{body}")
    return [{"role": "system", "content": EDITS_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def outlines_messages(question: str, blocks: Sequence[Sequence[str]]) -> list[dict[str, str]]:
    parts = [f"Problem:\n{question}"]
    for b, threads in enumerate(blocks, start=1):
        body = "\n\n".join(f"--- thread {t} ---\n{text}" for t, text in enumerate(threads, start=1))
        parts.append(f"=== Block {b} ({len(threads)} threads) ===\n{body}")
    return [{"role": "system", "content": OUTLINES_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def repair_messages(messages: Sequence[dict[str, str]], reply: str, problem: str) -> list[dict[str, str]]:
    """The conversation so far plus the faulty reply and a request to fix it."""
    return [
        *messages,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": f"Your answer cannot be used: {problem}\nSend the corrected JSON object only."},
    ]


def step_of(messages: Sequence[dict[str, str]]) -> Step | None:
    """Which LLM step a conversation belongs to (by its system prompt); None for others."""
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    for name, head in (
        (Step.STRUCTURE, STRUCTURE_SYSTEM[:60]),
        (Step.BLOCKS, BLOCKS_SYSTEM[:60]),
        (Step.EDITS, EDITS_SYSTEM[:60]),
        (Step.OUTLINES, OUTLINES_SYSTEM[:60]),
    ):
        if system.startswith(head):
            return name
    return None
