"""Prompt and response ids: the one place where chat formatting and response
encoding happen, for training data, RL prompts and inference alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from threadweaver_verl.format import TokenFormat

# Appended to a user question unless a dataset brings its own instruction.
DEFAULT_INSTRUCTION = (
    "Reason step by step inside <think> ... </think>. Where parts of the work are independent, "
    "you may run them in parallel: list them in <Outlines>, then solve each in its own <Thread>. "
    "Put the final answer in \\boxed{}."
)


@dataclass(frozen=True)
class PromptStyle:
    """How a question becomes chat messages."""

    instruction: str | None = None  # None: no instruction; use DEFAULT_INSTRUCTION to add ours
    system: str | None = None

    def messages(self, question: str) -> list[dict[str, str]]:
        content = question if not self.instruction else f"{question}\n\n{self.instruction}"
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        msgs.append({"role": "user", "content": content})
        return msgs


def prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of a chat prompt, ending with the assistant turn's opening."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def response_ids(fmt: TokenFormat, text: str, add_eos: bool = True) -> list[int]:
    """Ids of a response text in the layout fork/join inference produces, plus EOS."""
    ids = fmt.encode_text(text)
    return ids + [fmt.eos_ids[0]] if add_eos else ids
