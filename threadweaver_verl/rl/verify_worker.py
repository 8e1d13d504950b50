"""The child process that runs math-verify for :mod:`threadweaver_verl.rl.correctness`.

Started as ``python -m threadweaver_verl.rl.verify_worker``. Reads one JSON
request per line on stdin (``{"gold": str, "pred": str, ...}``) and writes one
JSON reply per line on its private copy of stdout::

    {"correct": bool, "gold_parsed": bool, "pred_parsed": bool}   or   {"error": "..."}

math-verify runs with its signal-based timeouts OFF; the parent bounds each
call by killing this process when it misses the deadline. The process exits
when stdin closes or when its parent dies (checked once a second), so a hung
verification never outlives the trainer.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _check(req: dict) -> dict:
    from math_verify import parse, verify

    gold_text = req["gold"]
    gold = parse(gold_text, parsing_timeout=None)
    if not gold and req.get("gold_fallback"):
        gold = parse(req["gold_fallback"], parsing_timeout=None)
    pred = parse(req["pred"], parsing_timeout=None)
    correct = bool(
        gold
        and pred
        and verify(
            gold,
            pred,
            float_rounding=int(req.get("float_rounding", 6)),
            numeric_precision=int(req.get("numeric_precision", 15)),
            strict=bool(req.get("strict", True)),
            timeout_seconds=None,
        )
    )
    return {"correct": correct, "gold_parsed": bool(gold), "pred_parsed": bool(pred)}


def main() -> int:
    # Replies go to a private dup of stdout; anything a library prints goes to stderr.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" is intended here
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()

    _check({"gold": "\\boxed{1}", "pred": "\\boxed{\\frac{2}{2}}"})  # warm up sympy / latex parser
    out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = _check(json.loads(line))
        except Exception as e:  # noqa: BLE001 - reported to the parent, which scores it wrong
            reply = {"error": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
