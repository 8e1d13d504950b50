"""``python -m threadweaver_verl generate stage=1|2 [--config FILE] key=value ...``

Stage 1 (LLM rewriting of sequential traces, :mod:`.stage1`)::

    python -m threadweaver_verl generate stage=1 --config configs/generate_stage1.yaml \\
        input=traces.jsonl llm.model=gpt-5 out_dir=runs/stage1

Stage 2 (self-training round with the SFT model, :mod:`.stage2`)::

    python -m threadweaver_verl generate stage=2 --config configs/generate_stage2.yaml \\
        prompts=runs/stage1/rl.parquet model=checkpoints/sft round=1 out_dir=runs/stage2

Both resume from their ``records.jsonl`` when rerun with the same ``out_dir``,
and end with a summary table (also written to ``summary.json``). Exit code 0:
every sample has its record; 1: some samples failed on API/engine errors (logged
in ``errors.jsonl``) and the next run retries them; 2: bad settings or input.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from threadweaver_verl.eval.report import format_cell

USAGE = (
    "usage: python -m threadweaver_verl generate stage=1|2 [--config FILE.yaml] [key=value ...]\n"
    "       python -m threadweaver_verl generate stage=1|2 --help   (every setting of that stage)"
)


def _flat(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            rows += _flat(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", v))
    return rows


def print_stage1(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="stage 1: LLM rewriting")
    table.add_column("")
    table.add_column("value", justify="right")
    for k, v in _flat(summary):
        table.add_row(k, format_cell(v))
    Console(stderr=False).print(table)


def print_stage2(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from threadweaver_verl.generator.stage2 import ROUND_METRICS

    console = Console(stderr=False)
    rounds = summary["rounds"]
    table = Table(title="stage 2: self-training rounds")
    table.add_column("")
    for r in rounds:
        table.add_column(f"round {r['round']}", justify="right")
    for metric in ROUND_METRICS:
        table.add_row(metric, *(format_cell(r.get(metric)) for r in rounds))
    console.print(table)
    detail = Table(title=f"stage 2 round {summary['round']}: details")
    detail.add_column("")
    detail.add_column("value", justify="right")
    for k, v in _flat({k: v for k, v in summary.items() if k != "rounds"}):
        detail.add_row(k, format_cell(v))
    console.print(detail)


def stage1(cfg) -> int:
    from threadweaver_verl.generator.stage1 import run_stage1

    summary = run_stage1(cfg)
    print_stage1(summary)
    return 0 if summary["errors_to_retry"] == 0 else 1


def stage2(cfg) -> int:
    from threadweaver_verl.generator.stage2 import run_stage2

    summary = run_stage2(cfg)
    print_stage2(summary)
    return 0 if summary["failed_problems_to_retry"] == 0 else 1


def main(argv: Sequence[str] = ()) -> int:
    from threadweaver_verl.config import run_command

    args = list(argv)
    stages = [a for a in args if a.startswith("stage=")]
    rest = [a for a in args if not a.startswith("stage=")]
    stage = stages[-1].split("=", 1)[1] if stages else None
    if stage is None and (not args or any(a in ("-h", "--help") for a in args)):
        print(USAGE)
        return 0
    if stage not in ("1", "2"):
        print(f"generate: say which stage to run with stage=1 or stage=2\n{USAGE}", file=sys.stderr)
        return 2
    # config, input and schema errors are UserErrors: the dispatcher (threadweaver_verl.cli) prints them
    # and exits 2, with the traceback under --debug, as for every command
    if stage == "1":
        from threadweaver_verl.generator.stage1 import Stage1Config

        return run_command(Stage1Config, rest, stage1, command="generate stage=1")
    from threadweaver_verl.generator.stage2 import Stage2Config

    return run_command(Stage2Config, rest, stage2, command="generate stage=2")
