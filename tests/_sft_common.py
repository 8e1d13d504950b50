"""Shared helpers of the trie-SFT tests: format-valid test trajectories written as text and
small utilities (the tiny model itself comes from conftest's session fixtures)."""

from __future__ import annotations

from pathlib import Path

NESTED = """<think>
Compute 12 * 34.
<Parallel>
<Outlines>
<Outline>1: 12 * 4</Outline>
<Outline>2: 12 * 30</Outline>
<Outline>3: split 34</Outline>
</Outlines>
<Thread>
1: 12 * 4 = 48
</Thread>
<Thread>
2: 12 * 30 = 360
<Parallel>
<Outlines>
<Outline>1: 12 * 3</Outline>
<Outline>2: times 10</Outline>
</Outlines>
<Thread>
1: 12 * 3 = 36
</Thread>
<Thread>
2: 36 * 10 = 360
</Thread>
</Parallel>
so 360
</Thread>
<Thread>
3: 34 = 30 + 4
</Thread>
</Parallel>
48 + 360 = 408
<Parallel>
<Outlines>
<Outline>1: check 408 / 12</Outline>
<Outline>2: check 408 / 34</Outline>
</Outlines>
<Thread>
1: 408 / 12 = 34
</Thread>
<Thread>
2: 408 / 34 = 12
</Thread>
</Parallel>
</think>
\\boxed{408}"""

SEQUENTIAL = """<think>
12 * 34 = 12 * 4 + 12 * 30 = 48 + 360 = 408
</think>
\\boxed{408}"""


def three_threads(t2: str = "2: 57 * 2 = 114") -> str:
    """One block of three threads; ``t2`` is thread 2's text (to test leakage)."""
    return (
        "<think>\nWork on 57.\n<Parallel>\n<Outlines>\n<Outline>1: a</Outline>\n<Outline>2: b</Outline>\n"
        "<Outline>3: c</Outline>\n</Outlines>\n<Thread>\n1: 57 + 1 = 58\n</Thread>\n<Thread>\n"
        f"{t2}\n</Thread>\n<Thread>\n3: 57 - 7 = 50\n</Thread>\n</Parallel>\ndone 222\n</think>\n\\boxed{{222}}"
    )


def load_model(model_dir):
    """A fresh float32 eval-mode copy of a model folder (sdpa attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()


def requests_of(tok, fmt, text: str, question: str = "What is 12 * 34?"):
    """The Requests of (question, trajectory text), built with the project's chat and format helpers."""
    from threadweaver_verl.data.chat import PromptStyle, prompt_ids, response_ids
    from threadweaver_verl.format import split_requests

    p = prompt_ids(tok, PromptStyle().messages(question))
    return split_requests(p, response_ids(fmt, text), fmt)


def multiplication_texts(n: int = 3, preset: str = "3x3", seed: int = 0) -> list[tuple[str, str]]:
    """(question, parallel solution) pairs from the project's multiplication task."""
    from threadweaver_verl.tasks.multiplication import Difficulty, make_samples

    return [(s.problem.question, s.parallel) for s in make_samples(Difficulty.parse(preset), n, seed)]


def write_sft_parquet(path: Path, items: list[tuple[str, str]]) -> Path:
    """An SFT parquet file (data.schema) of (question, response text) pairs."""
    from threadweaver_verl.data.schema import sft_row, write_sft

    rows = [
        sft_row(data_source="test", question=q, response=r, index=i, split="train") for i, (q, r) in enumerate(items)
    ]
    return write_sft(rows, path)


def reference_logprobs(m, request):
    """Log-prob of each completion token when the Request runs alone (plain causal, positions 0..n-1)."""
    import torch

    ids = torch.tensor(request.ids)[None]
    with torch.no_grad():
        logits = m(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
    return lp[len(request.context_ids) - 1 :]
