"""The ``threadweaver`` command (also ``python -m threadweaver_verl``): one subcommand per entry of
:data:`COMMANDS`, each a module with ``main(argv) -> int``.

Exit codes of every command: 0 done; 1 the command ran but some work failed (retried by a rerun);
2 a setting, input or output folder is wrong (a message names the problem and the fix; nothing was
done; ``--debug`` adds the traceback); 130 / 143 stopped by SIGINT / SIGTERM (finished work kept).
"""

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
    debug = "--debug" in rest
    return run_command(name, [a for a in rest if a != "--debug"], debug)


def run_command(name: str, argv: list[str], debug: bool = False) -> int:
    """Run one command under the error policy shared by all of them (see the module doc): a
    :class:`threadweaver_verl.runs.UserError` (config, schema, input, output-folder errors all derive from
    it) prints one message and returns 2; SIGINT/SIGTERM stop it cleanly (its ``finally`` blocks stop servers
    and remove temporary files); a server that does not start is reported with its log; anything else is
    a bug and keeps its traceback."""
    from threadweaver_verl.rollout.vllm_server import ServerStartError
    from threadweaver_verl.runs import EXIT_FAILED, EXIT_USAGE, Interrupted, UserError, stop_on_signals

    with stop_on_signals():
        try:
            module = importlib.import_module(COMMANDS[name][0])
            return int(module.main(argv) or 0)
        except Interrupted as e:
            print(
                f"threadweaver {name}: stopped by {e.name}; finished work is kept, rerun the same command to resume",
                file=sys.stderr,
            )
            return 128 + e.signum
        except UserError as e:
            if debug:
                raise
            print(f"threadweaver {name}: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        except ServerStartError as e:
            if debug:
                raise
            print(f"threadweaver {name}: the vLLM server did not start: {e}", file=sys.stderr)
            return EXIT_FAILED
