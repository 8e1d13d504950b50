"""SFT dataset classes for verl's SFT trainer (``data.custom_cls``).

Both read the SFT schema (see :mod:`.data`) and are built by verl as
``cls(parquet_files, tokenizer, config, processor, max_samples)``. Use verl's
``data.pad_mode=no_padding`` (its default for the SFT trainer)::

    data.custom_cls.path=pkg://threadweaver_verl.integrations.verl.sft_dataset
    data.custom_cls.name=ExpandedSFTDataset   # or TrieSFTDataset

* :class:`ExpandedSFTDataset` - one row per Request: ``input_ids`` = context +
  completion, ``position_ids`` = 0..n-1, ``loss_mask`` on the completion. Runs on
  stock verl (any engine): each row is an ordinary causal sequence.
* :class:`TrieSFTDataset` - one row per packed group of trajectory tries
  (``data.max_length`` tokens at most): ``position_ids`` = trie depth, plus
  ``trie_parent`` and ``trie_tout``. Needs the trie engine
  (:mod:`.verl_engine`): select it with ``VERL_ENGINE_VENDOR=threadweaver_trie``
  and an attention implementation that takes a mask
  (``model.override_config.attn_implementation=sdpa`` or ``flex_attention``).
  The stock engine would silently train on the flattened trie with a causal mask
  and shifted targets (leaking and wrong), so construction fails unless the trie
  engine is the one verl will pick.

Rows follow :mod:`threadweaver_verl.data.schema`'s SFT schema (``prompt``,
``response`` without EOS, ``data_source``, ``extra_info``); ``data.max_length``
bounds a row (a Request for ``expanded``, a packed row for ``trie``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch.utils.data import Dataset

from threadweaver_verl.config import ConfigError, read_section
from threadweaver_verl.format import TokenFormat
from threadweaver_verl.sft.batch import row_features
from threadweaver_verl.sft.data import Layout, build_rows, load_examples
from threadweaver_verl.sft.trie import Trie, chain

PAD_MODES = ("no_padding", "DatasetPadMode.NO_PADDING")


@dataclass
class SFTDataKeys:
    """The keys of verl's ``data`` section that the SFT datasets read (verl's SFT trainer config sets both)."""

    max_length: int = MISSING
    """Most tokens in one row: a Request for ``expanded``, a packed row for ``trie``."""
    pad_mode: str = MISSING
    """Must be ``no_padding``: verl's engine packs the rows itself."""

    def __post_init__(self) -> None:
        if self.pad_mode != MISSING and self.pad_mode not in PAD_MODES:
            raise ConfigError(
                f"the ThreadWeaver SFT datasets need data.pad_mode=no_padding (got {self.pad_mode!r}); verl's "
                "FSDP engine packs rows itself"
            )


class _SFTDatasetBase(Dataset):
    def __init__(self, parquet_files, tokenizer, config=None, processor=None, max_samples: int = -1):
        if isinstance(tokenizer, str):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        keys = read_section(SFTDataKeys, config, "data", foreign=True)
        files = (
            parquet_files
            if isinstance(parquet_files, (list, tuple))
            else (
                list(parquet_files)
                if hasattr(parquet_files, "__iter__") and not isinstance(parquet_files, str)
                else [parquet_files]
            )
        )
        self.tokenizer = tokenizer
        self.max_length = keys.max_length
        fmt = TokenFormat.from_tokenizer(tokenizer)
        self.examples = load_examples(
            [str(f) for f in files], tokenizer, fmt, max_samples=int(max_samples if max_samples is not None else -1)
        )
        self.rows: list[Trie] = self._rows()
        print(
            f"[threadweaver] {type(self).__name__}: {len(self.examples)} trajectories -> {len(self.rows)} rows, "
            f"{sum(len(r) for r in self.rows)} tokens, {sum(r.num_loss_tokens for r in self.rows)} with loss"
        )

    def _rows(self) -> list[Trie]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, item: int) -> dict[str, torch.Tensor]:
        return self._features(self.rows[item])

    def _features(self, row: Trie) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover


class ExpandedSFTDataset(_SFTDatasetBase):
    """One row per Request; plain causal rows for the stock verl engine."""

    def _rows(self) -> list[Trie]:
        rows = []
        for e in self.examples:
            for r in e.requests:
                if not r.completion_ids:
                    continue
                if len(r.ids) > self.max_length:
                    raise ValueError(
                        f"{e.source}: a Request of {len(r.ids)} tokens exceeds data.max_length="
                        f"{self.max_length}; raise data.max_length"
                    )
                rows.append(chain(r))
        return rows

    def _features(self, row: Trie) -> dict[str, torch.Tensor]:
        f = row_features(row)
        return {"input_ids": f["input_ids"], "position_ids": f["position_ids"], "loss_mask": f["loss_mask"]}


class TrieSFTDataset(_SFTDatasetBase):
    """Packed trie rows; needs the trie engine (:mod:`.verl_engine`)."""

    def __init__(self, parquet_files, tokenizer, config=None, processor=None, max_samples: int = -1):
        from threadweaver_verl.integrations.verl.sft_engine import check_trie_engine_selected

        check_trie_engine_selected()
        super().__init__(parquet_files, tokenizer, config, processor, max_samples)

    def _rows(self) -> list[Trie]:
        return build_rows(self.examples, Layout.TRIE, self.max_length)

    def _features(self, row: Trie) -> dict[str, torch.Tensor]:
        return row_features(row)
