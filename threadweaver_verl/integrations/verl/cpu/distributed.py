"""The process-group fix: gloo only on the CPU platform.

verl 0.9.1 builds the backend string ``f"cpu:gloo,{device}:{backend}"``
(``verl/utils/distributed.py``: ``initialize_global_process_group`` for torchrun, used by the SFT
trainer; ``initialize_global_process_group_ray`` for Ray workers). On the CPU platform that is
``cpu:gloo,cpu:gloo``, which torch rejects ("Duplicate device type cpu"). The replacements below
pass ``cpu:gloo`` and are otherwise verl's functions (the Ray one delegates to verl's own).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

from threadweaver_verl.integrations.verl.cpu.errors import CPUModeError

BACKEND = "cpu:gloo"
# modules that bind the functions by name at import time (``from verl.utils.distributed import ...``)
_BINDERS = ("verl.utils.distributed", "verl.workers.engine_workers", "verl.checkpoint_engine.base")


def _original(name: str):
    import verl.utils.distributed as dist

    fn = getattr(dist, name)
    return getattr(fn, "__wrapped__", fn)


def initialize_global_process_group_ray(timeout_second=None, backend=None):
    """verl's function with ``cpu:gloo`` as the default backend."""
    return _original("initialize_global_process_group_ray")(timeout_second=timeout_second, backend=backend or BACKEND)


def initialize_global_process_group(timeout_second=36000):
    """verl's torchrun process-group set-up (SFT trainer) with ``cpu:gloo``."""
    import torch.distributed

    torch.distributed.init_process_group(
        backend=BACKEND,
        timeout=timedelta(seconds=timeout_second),
        init_method=os.environ.get("DIST_INIT_METHOD", None),
    )
    return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


FIXES = {
    "initialize_global_process_group_ray": initialize_global_process_group_ray,
    "initialize_global_process_group": initialize_global_process_group,
}


def apply() -> None:
    """Install the replacements in verl's module and in every loaded module that bound them by name."""
    import verl.utils.distributed as dist

    for name, fix in FIXES.items():
        if not hasattr(dist, name):
            raise CPUModeError(
                f"verl.utils.distributed.{name} is gone in this verl version: the CPU mode's process-group fix "
                "(threadweaver_verl/integrations/verl/cpu/distributed.py) needs updating"
            )
        current = getattr(dist, name)
        if current is fix:
            continue
        fix.__wrapped__ = current  # the Ray wrapper delegates to verl's own function
        for module_name in _BINDERS:
            module = sys.modules.get(module_name)
            if module is not None and getattr(module, name, None) is current:
                setattr(module, name, fix)
