"""A tiny Qwen3-style model and tokenizer built locally in seconds (no hub).

Used by the tests and the CPU demo. The tokenizer is a byte-level BPE trained on
a small corpus, with every format tag, ``<|im_start|>``, ``<|im_end|>`` (EOS)
and a pad token added as single tokens, digits split one per token, and a
ChatML-style chat template. Deterministic for a given seed and corpus.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from threadweaver_verl.format.tags import TAG_STRINGS

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|endoftext|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END, *TAG_STRINGS)

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass
class TinyModelConfig:
    """Size of the tiny model. Defaults give ~0.7M parameters with a ~1k vocab."""

    vocab_size: int = 1024
    """BPE target (the tags and specials come on top)."""
    hidden_size: int = 128
    """Width of the residual stream."""
    intermediate_size: int = 384
    """Width of the MLP."""
    num_hidden_layers: int = 2
    """Transformer layers."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    head_dim: int = 32
    """Width of one attention head."""
    max_position_embeddings: int = 4096
    """Context length (RoPE positions)."""
    seed: int = 0
    """Seed of the random weights (the tokenizer does not depend on it)."""
    tags: bool = True
    """False: leave the format tags out of the tokenizer (to test `prepare-model`)."""

    def __post_init__(self) -> None:
        """A model that cannot run is refused here, before anything is built."""
        from threadweaver_verl.config import ConfigError

        sizes = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        problems = [f"{k} must be >= 1, got {getattr(self, k)}" for k in sizes if getattr(self, k) < 1]
        if self.num_attention_heads >= 1 and self.num_key_value_heads >= 1:
            if self.num_attention_heads % self.num_key_value_heads:
                problems.append(
                    f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                    f"({self.num_key_value_heads}): each KV head serves a whole group of query heads"
                )
        if problems:
            raise ConfigError("tiny model settings: " + "; ".join(problems))


def default_corpus() -> list[str]:
    """A small generic math corpus, enough for BPE to learn common pieces."""
    import random

    rng = random.Random(1234)
    lines = []
    words = (
        "Multiply",
        "Add",
        "carry",
        "digit",
        "sum",
        "product",
        "Step",
        "Answer",
        "partial",
        "times",
        "the",
        "of",
        "and",
        "is",
        "so",
        "write",
        "with",
        "row",
        "Compute",
        "result",
        "Problem",
        "What",
    )
    for _ in range(400):
        a, b = rng.randint(0, 99999), rng.randint(0, 9999)
        w = " ".join(rng.choice(words) for _ in range(6))
        lines.append(f"{w}: {a} * {b} = {a * b}, carry {a % 10}. \\boxed{{{a + b}}}\n")
    return lines


def build_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 1024, tags: bool = True):
    """A HF ``PreTrainedTokenizerFast`` with the tags as single tokens.

    ``tags=False`` leaves the format tags out (they then split into several
    pieces, as in a stock tokenizer): used to test ``tokenizer.add_tags``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS if tags else (PAD, IM_START, IM_END)),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus if corpus is not None else default_corpus()), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=IM_END,
        pad_token=PAD,
        additional_special_tokens=[IM_START, *(TAG_STRINGS if tags else ())],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    out_dir: str | os.PathLike, config: TinyModelConfig | None = None, corpus: Iterable[str] | None = None
) -> Path:
    """Build tokenizer + randomly initialised Qwen3 model and save them as a HF folder."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = config or TinyModelConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(corpus, cfg.vocab_size, tags=cfg.tags)
    torch.manual_seed(cfg.seed)
    model_cfg = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    model = Qwen3ForCausalLM(model_cfg)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "threadweaver_tiny.json").write_text(json.dumps(cfg.__dict__, indent=2))
    return out
