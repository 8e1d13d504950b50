"""``python -m threadweaver_verl make-data out=DIR preset=3x4 n_train=5000 n_test=200 seed=0``

Writes, in ``out``:

- ``train.parquet``, ``test.parquet``: RL rows (verl's schema, :mod:`..data.schema`);
- ``sft_parallel.parquet``: the train problems with their parallel solutions;
- ``sft_sequential.parquet``: the same problems with their sequential solutions;
- ``summary.json``: the settings and the token statistics printed at the end.

Every sample is checked before it is written (:func:`multiplication.check_sample`):
format-valid, split into fork/join Requests that rebuild it, true product boxed.
``list_presets=true`` prints the token table of every preset and writes nothing.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from threadweaver_verl.config import ConfigError
from threadweaver_verl.data.schema import AGENT_NAME
from threadweaver_verl.runs import (
    OutputLock,
    UserError,
    atomic_write_text,
    output_dir,
    remove_stale_temporaries,
    require_model_dir,
)
from threadweaver_verl.tasks import multiplication as mul

SUMMARY = "summary.json"


@dataclass
class MakeDataConfig:
    """``make-data``: the synthetic multiplication datasets."""

    out: str = ""
    """Output folder (required unless list_presets)."""
    preset: str = "3x4"
    """A name in multiplication.PRESETS or digits per factor like "5x3" or "3x2x2"."""
    n_train: int = 5000
    """Train problems (RL rows and SFT rows of each kind)."""
    n_test: int = 200
    """Held-out problems (RL rows), never among the train problems."""
    seed: int = 0
    """Seed of the problems (the same seed writes byte-identical files)."""
    instruction: str = "none"
    """``none``, ``default`` (data.chat.DEFAULT_INSTRUCTION) or the instruction text."""
    system: str | None = None
    """System message, if any."""
    agent_name: str = AGENT_NAME
    """The verl agent loop of the RL rows."""
    tokenizer: str | None = None
    """HF folder for prompt ids and token counts; default: the tiny tokenizer."""
    list_presets: bool = False
    """Print every preset's token table and exit."""
    table_samples: int = 200
    """Problems per preset for list_presets."""

    def __post_init__(self) -> None:
        if self.n_train < 1 or self.n_test < 1:
            raise ConfigError(f"make-data: n_train and n_test must be >= 1 (got {self.n_train}, {self.n_test})")


def prompt_style(cfg: MakeDataConfig):
    from threadweaver_verl.data.chat import DEFAULT_INSTRUCTION, PromptStyle

    instruction = {"none": None, "default": DEFAULT_INSTRUCTION}.get(cfg.instruction, cfg.instruction)
    return PromptStyle(instruction=instruction, system=cfg.system)


def _tokenizer(path: str | None):
    if path:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    from threadweaver_verl.models.tiny import build_tokenizer

    return build_tokenizer()


def _means(tokens: Sequence[mul.SampleTokens]) -> dict[str, float]:
    seq_t = statistics.mean(t.sequential_T for t in tokens)
    par_t = statistics.mean(t.parallel_T for t in tokens)
    par_l = statistics.mean(t.parallel_L for t in tokens)
    return {
        "sequential_T": seq_t,
        "parallel_T": par_t,
        "parallel_L": par_l,
        "ideal_speedup": seq_t / par_l,
        "parallel_T_over_L": par_t / par_l,
    }


def preset_table(fmt, n: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    """Mean token counts of both solutions for every preset (``n`` problems each)."""
    rows = []
    for name, digits in mul.PRESETS.items():
        d = mul.Difficulty(digits)
        tokens = [mul.check_sample(s, fmt) for s in mul.make_samples(d, n, seed)]
        rows.append({"preset": name, "threads_per_block": list(d.threads_per_block), **_means(tokens)})
    return rows


_LABELS = {
    "problems": "n",
    "threads_per_block": "threads",
    "sequential_T": "seq T",
    "parallel_T": "par T",
    "parallel_L": "par L",
    "ideal_speedup": "seq T / par L",
    "parallel_T_over_L": "par T / L",
}


def _print_rows(console, title: str, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from threadweaver_verl.eval.report import format_cell

    table = Table(title=title)
    for k in rows[0]:
        table.add_column(_LABELS.get(k, k), justify="right")
    for r in rows:
        table.add_row(*(format_cell(v) for v in r.values()))
    console.print(table)


def make_data(cfg: MakeDataConfig, console=None) -> dict[str, Any]:
    """Write the datasets of ``cfg`` to ``cfg.out``; returns the summary (also in ``summary.json``).

    Every setting is checked before any work. One run per folder at a time (a lock file); ``summary.json``
    is removed first and written last, and each file is written under a temporary name and renamed: a
    folder without ``summary.json`` is unfinished (an interrupted run), never a mix that looks finished."""
    from rich.console import Console

    if not cfg.out:
        raise UserError("make-data: pass the output folder as out=DIR")
    if cfg.n_train < 1 or cfg.n_test < 1:
        raise UserError(f"make-data: n_train and n_test must be >= 1 (got {cfg.n_train}, {cfg.n_test})")
    if cfg.tokenizer:
        require_model_dir(cfg.tokenizer, "tokenizer", what="tokenizer")
    difficulty = mul.Difficulty.parse(cfg.preset)
    out = output_dir(cfg.out, "out")  # checked before any work
    with OutputLock(out, "make-data"):
        remove_stale_temporaries(out)
        (out / SUMMARY).unlink(missing_ok=True)  # the folder is unfinished from here until the summary is back
        return _make_data(cfg, difficulty, out, console or Console())


def _make_data(cfg: MakeDataConfig, difficulty: mul.Difficulty, out: Path, console) -> dict[str, Any]:
    from tqdm import tqdm

    from threadweaver_verl.config import to_yaml
    from threadweaver_verl.data.chat import prompt_ids
    from threadweaver_verl.data.schema import rl_row, sft_row, write_rl, write_sft
    from threadweaver_verl.format import TokenFormat

    tokenizer = _tokenizer(cfg.tokenizer)
    fmt = TokenFormat.from_tokenizer(tokenizer)
    style = prompt_style(cfg)

    test = mul.make_samples(difficulty, cfg.n_test, cfg.seed, "test")
    train = mul.make_samples(difficulty, cfg.n_train, cfg.seed, "train", exclude=[s.problem for s in test])
    rl: dict[str, list] = {"train": [], "test": []}
    sft_par: list = []
    sft_seq: list = []
    tokens: dict[str, list] = {"train": [], "test": []}
    common = {"data_source": mul.DATA_SOURCE}
    for split, samples in (("test", test), ("train", train)):
        for i, s in enumerate(tqdm(samples, desc=f"{split} samples", unit="problem")):
            q = s.problem.question
            extra = {"answer": s.problem.answer, "difficulty": difficulty.name}
            row = rl_row(
                **common,
                question=q,
                ground_truth=s.problem.answer,
                index=i,
                split=split,
                style=style,
                agent_name=cfg.agent_name,
                extra=extra,
            )
            tokens[split].append(mul.check_sample(s, fmt, prompt_ids(tokenizer, row["prompt"])))
            rl[split].append(row)
            if split == "train":
                sft_par.append(
                    sft_row(
                        **common,
                        question=q,
                        response=s.parallel,
                        index=i,
                        split=split,
                        style=style,
                        extra={**extra, "solution": "parallel"},
                    )
                )
                sft_seq.append(
                    sft_row(
                        **common,
                        question=q,
                        response=s.sequential,
                        index=i,
                        split=split,
                        style=style,
                        extra={**extra, "solution": "sequential"},
                    )
                )

    files = {
        "train": write_rl(rl["train"], out / "train.parquet"),
        "test": write_rl(rl["test"], out / "test.parquet"),
        "sft_parallel": write_sft(sft_par, out / "sft_parallel.parquet"),
        "sft_sequential": write_sft(sft_seq, out / "sft_sequential.parquet"),
    }
    rows = [
        {
            "split": split,
            "problems": len(tokens[split]),
            "threads_per_block": list(difficulty.threads_per_block),
            **_means(tokens[split]),
        }
        for split in ("train", "test")
    ]
    summary = {
        "config": asdict(cfg),
        "difficulty": difficulty.name,
        "files": {k: v.name for k, v in files.items()},
        "stats": rows,
    }
    atomic_write_text(out / "make_data.yaml", to_yaml(cfg))
    atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2))  # last: its presence marks a finished run
    _print_rows(console, f"multiplication {difficulty.name} -> {out}", rows)
    console.print("files: " + ", ".join(p.name for p in files.values()) + ", summary.json, make_data.yaml")
    return summary


def main(argv: Sequence[str] = ()) -> int:
    from threadweaver_verl.config import run_command

    return run_command(MakeDataConfig, argv, run, command="make-data")


def run(cfg: MakeDataConfig) -> int:
    from rich.console import Console

    from threadweaver_verl.format import TokenFormat

    console = Console()
    if cfg.list_presets:
        fmt = TokenFormat.from_tokenizer(_tokenizer(cfg.tokenizer))
        _print_rows(
            console,
            f"multiplication presets ({cfg.table_samples} problems each)",
            preset_table(fmt, cfg.table_samples, cfg.seed),
        )
        return 0
    if not cfg.out:
        print("make-data: pass the output folder as out=DIR", file=sys.stderr)
        return 2
    make_data(cfg, console)
    return 0
