"""The RL dataset for verl's ``data.custom_cls``: our prompts, our agent loop, checked input.

    data.custom_cls.path=pkg://threadweaver_verl.integrations.verl.rl_dataset
    data.custom_cls.name=ThreadWeaverRLDataset
    +data.threadweaver.agent_name=threadweaver          # any RLDatasetConfig field

A subclass of verl 0.9.1's ``RLHFDataset`` (so ``raw_prompt``, ``index``,
``tools_kwargs``, resuming and splitting behave as in verl). Before verl's own
overlong-prompt filter it goes through every row once:

* Rows already in the RL schema (a ``prompt`` column of chat messages, e.g. written
  by ``examples/data_preprocess``) are checked with :func:`data.schema.check_rl_row`,
  plus: the question and ground truth are non-empty, and (``require_instruction``)
  the user message carries the instruction our models are trained with.
* Raw rows (a question and an answer field, no ``prompt``: a MATH-500, AIME or GSM8K
  style file) become RL rows with :func:`data.preprocess.to_rl_row`, which adds the
  instruction and chat messages through :class:`data.chat.PromptStyle`.
* ``agent_name`` is set to ``RLDatasetConfig.agent_name`` on every row (``null``
  keeps each row's own, which must then exist).

All bad rows are reported together (first few shown) in one ``SchemaError`` that
names the file, row, column and fix. Prompt lengths for verl's
``filter_overlong_prompts`` are measured with :func:`data.chat.prompt_ids`, the same
ids the agent loop sends to the engine.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from verl.utils.dataset.rl_dataset import RLHFDataset

from threadweaver_verl.config import ConfigError, read_section
from threadweaver_verl.data.chat import prompt_ids
from threadweaver_verl.data.preprocess import RowConversion, to_rl_row
from threadweaver_verl.data.schema import AGENT_NAME, SchemaError, check_rl_row

logger = logging.getLogger(__name__)

CONFIG_KEY = "threadweaver"  # data.threadweaver: the RLDatasetConfig fields
MAX_REPORTED = 5


@dataclass
class RLDatasetConfig(RowConversion):
    """``data.threadweaver``: RowConversion's fields (for raw rows) plus these."""

    agent_name: str | None = AGENT_NAME
    """Set on every row; null keeps each row's own agent_name."""
    require_instruction: bool = True
    """Rows with a ready `prompt` must contain the configured instruction."""


def dataset_config(data_config: Any) -> RLDatasetConfig:
    """RLDatasetConfig from verl's data config (``data.threadweaver``; unknown keys are an error)."""
    section = data_config.get(CONFIG_KEY, None) if data_config is not None else None
    try:
        return read_section(RLDatasetConfig, section, f"data.{CONFIG_KEY}")
    except ConfigError as e:
        raise SchemaError(str(e)) from e


def _user_text(row: Mapping[str, Any]) -> str:
    return row["prompt"][-1]["content"]


def prepare_row(row: dict[str, Any], index: int, cfg: RLDatasetConfig) -> dict[str, Any]:
    """One dataset row as an RL row with our prompt and agent name (raises SchemaError)."""
    agent_name = cfg.agent_name or row.get("agent_name")
    if not agent_name:
        raise SchemaError(
            f"column 'agent_name' missing and data.{CONFIG_KEY}.agent_name is null; "
            f"set data.{CONFIG_KEY}.agent_name=threadweaver"
        )
    if "prompt" not in row or row["prompt"] is None:  # a raw question/answer record
        return to_rl_row(row, index, dataclasses.replace(cfg, agent_name=agent_name))
    out = dict(row)
    out["agent_name"] = agent_name
    check_rl_row(out)
    if not _user_text(out).strip():
        raise SchemaError("column 'prompt': the user message is empty")
    if not out["reward_model"]["ground_truth"].strip():
        raise SchemaError("column 'reward_model': ground_truth is empty")
    instruction = cfg.style().instruction
    if cfg.require_instruction and instruction and instruction not in _user_text(out):
        raise SchemaError(
            "column 'prompt': the user message lacks the instruction our models are trained with. "
            "Write the parquet with examples/data_preprocess (or give raw question/answer rows), "
            "or set data.threadweaver.require_instruction=false if the prompts are formatted on purpose"
        )
    return out


class ThreadWeaverRLDataset(RLHFDataset):
    """verl's RLHFDataset with ThreadWeaver prompts, agent name and input checks (see module doc)."""

    def __init__(self, data_files, tokenizer, config, processor=None, max_samples: int = -1):
        if processor is not None:
            raise SchemaError(
                "ThreadWeaverRLDataset is text-only: the model has a multimodal processor; "
                "use a text model (e.g. Qwen3) for ThreadWeaver"
            )
        self.tw_config = dataset_config(config)
        if config.get("prompt_key", "prompt") != "prompt":
            raise SchemaError(
                f"ThreadWeaverRLDataset writes chat messages to column 'prompt'; "
                f"unset data.prompt_key (got {config.get('prompt_key')!r})"
            )
        files = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
        for f in files:
            if "://" not in str(f) and not os.path.isfile(os.path.expanduser(str(f))):
                raise SchemaError(f"RL data file {str(f)!r} not found: check data.train_files / data.val_files")
        super().__init__(data_files, tokenizer, config, processor=processor, max_samples=max_samples)

    # verl calls this right after reading the files (also when resuming): the one place rows are prepared.
    def maybe_filter_out_long_prompts(self, dataframe=None):
        import datasets

        dataframe = self.dataframe if dataframe is None else dataframe
        source = ", ".join(map(str, getattr(self, "original_data_files", self.data_files)))
        if len(dataframe) == 0:
            raise SchemaError(f"no rows in {source}")
        rows, errors = [], []
        for i, row in enumerate(dataframe):
            try:
                rows.append(prepare_row(row, i, self.tw_config))
            except SchemaError as e:
                errors.append(f"row {i}: {e}")
        if errors:
            shown = "\n  ".join(errors[:MAX_REPORTED])
            more = f"\n  ... and {len(errors) - MAX_REPORTED} more" if len(errors) > MAX_REPORTED else ""
            raise SchemaError(f"{len(errors)} bad row(s) of {len(dataframe)} in {source}:\n  {shown}{more}")
        prepared = datasets.Dataset.from_list(rows)
        if not self.filter_overlong_prompts:
            return prepared
        tokenizer, limit = self.tokenizer, self.max_prompt_length
        kept = prepared.filter(
            lambda doc: len(prompt_ids(tokenizer, doc[self.prompt_key])) <= limit,
            num_proc=self.num_workers,
            desc=f"Filtering prompts longer than {limit} tokens",
        )
        if len(kept) < len(prepared):
            logger.warning(
                "dropped %d of %d prompts longer than %d tokens (data.max_prompt_length)",
                len(prepared) - len(kept),
                len(prepared),
                limit,
            )
        if len(kept) == 0:
            raise SchemaError(f"every prompt in {source} is longer than data.max_prompt_length={limit} tokens")
        return kept
