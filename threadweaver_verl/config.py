"""Config loading shared by every command: a dataclass per component holds each
knob with its default and doc; YAML files in ``configs/`` and ``key=value``
overrides (OmegaConf dotlist, as in verl/Hydra) are merged on top.

    cfg = load_config(EvalConfig, ["--config", "configs/eval.yaml", "n_samples=4"])

Unknown keys are an error that names the key and the config class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from threadweaver_verl.runs import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    pass


def load_config(cls: type[T], argv: Sequence[str] = (), base: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from defaults, an optional ``--config FILE`` (repeatable) and ``key=value`` overrides."""
    schema = OmegaConf.structured(cls)
    merged = schema
    files: list[str] = []
    dotlist: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--config", "-c"):
            if i + 1 >= len(args):
                raise ConfigError("--config needs a YAML file path")
            files.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        elif a.startswith("--") and "=" not in a:
            dotlist.append(f"{a[2:].replace('-', '_')}=true")  # --quick -> quick=true
        elif a.startswith("--"):
            dotlist.append(a[2:])
        elif "=" in a:
            dotlist.append(a)
        else:
            raise ConfigError(f"unexpected argument {a!r}: pass settings as key=value (fields of {cls.__name__})")
        i += 1
    try:
        if base:
            merged = OmegaConf.merge(merged, OmegaConf.create(base))
        for f in files:
            if not Path(f).is_file():
                raise ConfigError(f"config file {f!r} not found")
            merged = OmegaConf.merge(merged, OmegaConf.load(f))
        if dotlist:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))
    except (ConfigKeyError, ValidationError) as e:
        raise ConfigError(
            f"bad setting for {cls.__name__}: {e}. Known keys: {[f.name for f in dataclasses.fields(cls)]}"
        ) from e
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
