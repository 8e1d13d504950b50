"""The ``threadweaver`` command (also ``python -m threadweaver_verl``): one subcommand per entry of
:data:`COMMANDS`, each a module with ``main(argv) -> int``."""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). Each module has ``main(argv: list[str]) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("threadweaver_verl.cli.doctor", "check the verl plugin is active and print versions"),
    "tiny-model": ("threadweaver_verl.cli.tiny_model", "build the tiny test/demo model and tokenizer"),
    "prepare-model": ("threadweaver_verl.models.tags", "add the format tags to a HF tokenizer + model"),
    "preprocess": ("threadweaver_verl.data.preprocess", "turn a math dataset (parquet/jsonl/hub) into the RL parquet"),
    "make-data": ("threadweaver_verl.tasks.cli", "generate the synthetic multiplication datasets"),
    "eval": ("threadweaver_verl.eval.evaluate", "run fork/join (or sequential) evaluation"),
    "sft": ("threadweaver_verl.sft.train", "trie-packed SFT with the HF Trainer"),
    "generate": ("threadweaver_verl.generator.cli", "two-stage parallel trajectory generator"),
    "demo": ("threadweaver_verl.cli.demo", "the whole pipeline in miniature on a CPU"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("usage: threadweaver COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<14} {text}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"threadweaver: unknown command {name!r}; run `threadweaver --help` for the list", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)
