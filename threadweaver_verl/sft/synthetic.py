"""Random format-valid trajectory TEXTS for tests and benchmarks (not training data).

:func:`random_trajectory` writes sequential text, blocks of 2..k threads and,
optionally, nested blocks inside threads, sized roughly by a token budget (the
filler is digits and short words, ~1 token per character for the tiny tokenizer's
digits). Encode with :meth:`TokenFormat.encode_text` / :func:`data.chat.response_ids`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from threadweaver_verl.format import BlockLayout

_WORDS = ("carry", "digit", "sum", "row", "add", "times", "partial", "so", "the", "of", "write")


@dataclass
class TrajectoryShape:
    tokens: int = 400  # rough target size of the whole response
    blocks: int = 2  # top-level blocks
    min_threads: int = 2
    max_threads: int = 4
    nested_prob: float = 0.0  # chance a thread opens one nested block (needs Limits.max_depth >= 2)
    seq_share: float = 0.3  # share of the budget written outside blocks


def filler(rng: random.Random, approx_tokens: int) -> str:
    parts: list[str] = []
    n = 0
    while n < max(approx_tokens, 1):
        if rng.random() < 0.6:
            d = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 6)))
            parts.append(d)
            n += len(d) + 1
        else:
            parts.append(rng.choice(_WORDS))
            n += 2
    return " ".join(parts)


def _block(rng: random.Random, shape: TrajectoryShape, budget: int, depth: int, layout: BlockLayout) -> str:
    k = rng.randint(shape.min_threads, shape.max_threads)
    outlines = [filler(rng, 4) for _ in range(k)]
    per = max(budget // k, 8)
    threads = []
    for _ in range(k):
        size = max(int(per * rng.uniform(0.5, 1.5)), 4)
        body = " " + filler(rng, size // 2)
        if depth == 1 and rng.random() < shape.nested_prob:
            body += "\n" + _block(rng, shape, size // 2, depth + 1, layout) + "\n" + filler(rng, 6)
        else:
            body += " " + filler(rng, size // 2)
        threads.append(body + "\n")
    return layout.block_text(outlines, threads)


def random_trajectory(
    rng: random.Random, shape: TrajectoryShape | None = None, layout: BlockLayout | None = None
) -> str:
    shape = shape or TrajectoryShape()
    layout = layout or BlockLayout()
    seq = int(shape.tokens * shape.seq_share)
    per_seq = max(seq // (shape.blocks + 1), 4)
    per_block = max((shape.tokens - seq) // max(shape.blocks, 1), 16)
    out = ["<think>\n", filler(rng, per_seq)]
    for _ in range(shape.blocks):
        out.append("\n" + _block(rng, shape, per_block, 1, layout) + "\n" + filler(rng, per_seq))
    out.append(f"\n</think>\nThe answer is \\boxed{{{rng.randint(0, 99999)}}}")
    return "".join(out)
