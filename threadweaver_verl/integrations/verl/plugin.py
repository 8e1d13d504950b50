"""The ``verl.plugins`` entry point: registers every component with verl.

verl imports this module on ``import verl`` (driver and every Ray worker) and
SWALLOWS any exception it raises. So each registration is tried here, its
outcome recorded in :data:`STATUS`, failures printed to stderr at once, and
:func:`require` re-raises a recorded failure where the component is used.
``python -m threadweaver_verl doctor`` prints the table.
"""

from __future__ import annotations

import importlib
import sys
import traceback

# >>> verl CPU mode (threadweaver_verl/integrations/verl/cpu): on VERL_PLATFORM=cpu, register the CPU platform
# before anything below imports verl's workers (some verl modules read the platform when imported).
from threadweaver_verl.integrations.verl.cpu import activate_if_requested  # noqa: E402

activate_if_requested()
# <<< verl CPU mode

# name -> (module, function) called to register it with verl. Filled in by each component.
REGISTRATIONS: dict[str, tuple[str, str]] = {
    "agent_loop:threadweaver": ("threadweaver_verl.integrations.verl.agent_loop", "register"),
    "adv_estimator:p_grpo": ("threadweaver_verl.integrations.verl.advantage", "register"),
    "trainer:threadweaver": ("threadweaver_verl.integrations.verl.trainer", "register"),
    "engine:trie": ("threadweaver_verl.integrations.verl.sft_engine", "register"),
}

# name -> "ok" or the error text
STATUS: dict[str, str] = {}
_DONE = False


class PluginNotActive(RuntimeError):
    pass


def register_all(force: bool = False) -> dict[str, str]:
    global _DONE
    if _DONE and not force:
        return STATUS
    _DONE = True
    for name, (mod, fn) in REGISTRATIONS.items():
        try:
            getattr(importlib.import_module(mod), fn)()
            STATUS[name] = "ok"
        except Exception as e:  # noqa: BLE001 - recorded, printed, re-raised by require()
            STATUS[name] = f"{type(e).__name__}: {e}"
            print(
                f"[threadweaver-verl] registering {name} FAILED: {STATUS[name]}\n{traceback.format_exc(limit=3)}",
                file=sys.stderr,
            )
    return STATUS


def require(name: str) -> None:
    """Raise a clear error if ``name`` was not registered (call where the component is used)."""
    register_all()
    status = STATUS.get(name)
    if status != "ok":
        raise PluginNotActive(
            f"threadweaver-verl component {name!r} is not registered with verl ({status or 'never attempted'}). "
            "Run `python -m threadweaver_verl doctor` to see why; is the package installed in this environment "
            "(`pip install threadweaver-verl`)?"
        )


register_all()
