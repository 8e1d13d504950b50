"""``python -m threadweaver_verl tiny-model out=DIR [seed=0 hidden_size=128 ...]``

Builds the tiny Qwen3-style model and tokenizer of :mod:`threadweaver_verl.models.tiny`
(random weights, every format tag one token) as a HF folder.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

from threadweaver_verl.models.tiny import TinyModelConfig


@dataclass
class TinyModelCommand(TinyModelConfig):
    """Every field of :class:`TinyModelConfig`, plus the output folder."""

    out: str = ""
    """Output HF folder (required; created, existing files are overwritten)."""


def main(argv: Sequence[str] = ()) -> int:
    from threadweaver_verl.config import run_command

    return run_command(TinyModelCommand, argv, run, command="tiny-model")


def run(cfg: TinyModelCommand) -> int:
    import time

    from rich.console import Console
    from rich.table import Table

    from threadweaver_verl.models.tiny import build_tiny_model
    from threadweaver_verl.runs import output_dir

    if not cfg.out:
        print("tiny-model: pass the output folder as out=DIR", file=sys.stderr)
        return 2
    output_dir(cfg.out, "out")
    model_cfg = TinyModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(TinyModelConfig)})
    console = Console()
    start = time.perf_counter()
    with console.status(f"building the tiny model in {cfg.out}"):
        out = build_tiny_model(cfg.out, model_cfg)
    seconds = time.perf_counter() - start

    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    hf_cfg = AutoConfig.from_pretrained(out)
    params = _count_params(hf_cfg)
    table = Table(title=f"tiny model in {out}")
    table.add_column("setting")
    table.add_column("value")
    for k, v in asdict(model_cfg).items():
        table.add_row(k, str(v))
    table.add_row("tokenizer size", str(len(tokenizer)))
    table.add_row("parameters", f"{params:,}")
    table.add_row("seconds", f"{seconds:.1f}")
    console.print(table)
    return 0


def _count_params(hf_cfg) -> int:
    """Parameter count of the saved model (reads the weights' shapes, loads nothing else)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_cfg)
    return sum(p.numel() for p in model.parameters())
