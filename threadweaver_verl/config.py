"""Configuration, done one way everywhere in the package.

* **Schema and defaults.** Each component has a dataclass that holds every knob and its default. The
  knob's documentation is an attribute docstring under the field (``--help`` prints it, see
  :func:`field_docs`).
* **Validation.** A dataclass's ``__post_init__`` checks its own values. Every way of building a config
  therefore checks them: the loaders below, Python code and tests. A command checks, when it runs, that
  the inputs it needs were given.
* **Commands** (``threadweaver COMMAND``) use Hydra structured configs. :func:`load_config` registers the
  command's dataclass in Hydra's ConfigStore under its class name and composes it with Hydra's compose
  API. The override grammar is verl's: ``key=value``, ``nested.key=value``, ``list=[a,b]``,
  ``key=null``, ``+key=value`` (add a key inside a dict setting), ``++key=value``, ``~key`` (remove one).
  ``--config FILE.yaml`` (or Hydra's ``--config-path DIR --config-name NAME``) names a YAML file whose
  ``defaults`` list starts with the class name (``defaults: [EvalConfig, _self_]``) and that sets only
  what differs from the dataclass. ``--help`` lists every knob with its doc, and ``--cfg job`` prints the
  composed config. Composing never changes the working directory, writes no outputs folder and leaves
  logging alone, so rich output stays as it is.
* **Sections of a verl config** go through :func:`read_section`: ``algorithm.p_grpo``,
  ``data.threadweaver``, the reward's ``reward_kwargs``, the agent loop's ``controller`` and the keys of
  verl's ``data`` that the SFT datasets read.

Everywhere, an unknown key is an error that names the key and the nearest valid one.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from threadweaver_verl.runs import UserError

T = TypeVar("T")

HYDRA_VERSION_BASE = "1.3"
# Hydra's own settings for every command. The compose API never changes directory, writes outputs or
# configures logging; these make ``--cfg hydra`` say the same.
HYDRA_SETTINGS = (
    "hydra.run.dir=.",
    "hydra.output_subdir=null",
    "hydra.job.chdir=false",
    "hydra/job_logging=none",
    "hydra/hydra_logging=none",
)
CFG_CHOICES = ("job", "hydra", "all")


class ConfigError(UserError, ValueError):
    """A setting is unknown, missing, of the wrong type or out of range. The message names it and the fix."""


# --------------------------------------------------------------------------- the schema
def _is_dataclass_type(t: Any) -> bool:
    return isinstance(t, type) and dataclasses.is_dataclass(t)


def _inner(t: Any) -> Any:
    """``X | None`` -> ``X``. Any other type is returned as it is."""
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return t


@functools.cache
def schema_keys(cls: type) -> tuple[frozenset[str], frozenset[str]]:
    """``(keys, open_keys)`` of ``cls``. ``keys`` holds every dotted key, nested dataclasses included.
    ``open_keys`` holds the dict-valued keys, which take keys of their own."""
    keys: set[str] = set()
    open_keys: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = _inner(hints[f.name])
        keys.add(f.name)
        if _is_dataclass_type(t):
            sub, sub_open = schema_keys(t)
            keys |= {f"{f.name}.{k}" for k in sub}
            open_keys |= {f"{f.name}.{k}" for k in sub_open}
        elif t is Any or typing.get_origin(t) in (dict, Mapping) or t is dict:
            open_keys.add(f.name)
    return frozenset(keys), frozenset(open_keys)


def is_known_key(cls: type, key: str) -> bool:
    keys, open_keys = schema_keys(cls)
    return key in keys or any(key.startswith(f"{k}.") for k in open_keys)


def nearest_key(cls: type, key: str) -> str:
    """The valid key of ``cls`` that is closest to ``key``. Keys under the same parent come first."""
    keys, _ = schema_keys(cls)
    parent = key.rpartition(".")[0]
    siblings = sorted(k for k in keys if k.rpartition(".")[0] == parent) if parent in keys or not parent else []
    for pool in (siblings, sorted(keys)):
        match = difflib.get_close_matches(key, pool, n=1, cutoff=0.0)
        if match:
            return match[0]
    return ""


def unknown_key_message(cls: type, key: str, where: str) -> str:
    near = nearest_key(cls, key)
    hint = f"; did you mean {near!r}?" if near else ""
    return f"unknown key {key!r} in {where}{hint} (`--help` lists the keys of {cls.__name__})"


# --------------------------------------------------------------------------- knob docs
def _class_attribute_docs(klass: type) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring (the string literal right under the field), inherited ones included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_class_attribute_docs(klass))
    return docs


class Knob(typing.NamedTuple):
    key: str
    type: str
    default: Any
    doc: str
    section: bool  # a nested config: its knobs follow


def knobs(cls: type, prefix: str = "", defaults: Any = None) -> list[Knob]:
    """Every knob of ``cls`` with its default (the one ``defaults`` holds), nested configs flattened."""
    defaults = cls() if defaults is None else defaults
    docs = field_docs(cls)
    rows: list[Knob] = []
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        nested = dataclasses.is_dataclass(value)
        rows.append(Knob(prefix + f.name, type_name, None if nested else value, docs.get(f.name, ""), nested))
        if nested:
            rows += knobs(type(value), f"{prefix}{f.name}.", value)
    return rows


def _yaml_value(value: Any) -> str:
    """A default as one would write it in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value) if not value or value != value.strip() or "\n" in value else value
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def help_text(cls: type, command: str) -> str:
    """What ``threadweaver COMMAND --help`` prints: usage, the override grammar, and every knob with its doc."""
    summary = inspect.cleandoc(cls.__doc__ or "").splitlines()
    lines = [
        f"usage: threadweaver {command} [--config FILE.yaml] [KEY=VALUE ...]",
        f"       threadweaver {command} --cfg job [--resolve] [KEY=VALUE ...]   (print the composed config)",
        "",
        *(summary[:1] or [""]),
        "",
        "Overrides follow Hydra's grammar, as in verl: key=value, nested.key=value, list=[a,b], key=null,",
        "+key=value (add a key inside a dict setting), ++key=value (add or set), ~key (remove such a key).",
        "A YAML file (--config FILE.yaml, or --config-path DIR --config-name NAME) begins with",
        f"`defaults: [{cls.__name__}, _self_]` and sets only what differs from the defaults below.",
        "",
        f"settings ({cls.__module__}.{cls.__qualname__}):",
    ]
    for knob in knobs(cls):
        lines.append(f"  {knob.key}: {knob.type}" + ("" if knob.section else f" = {_yaml_value(knob.default)}"))
        for para in knob.doc.split("\n\n") if knob.doc else []:
            lines += textwrap.wrap(" ".join(para.split()), width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


# --------------------------------------------------------------------------- the one reader
def _omegaconf_cause(e: BaseException) -> OmegaConfBaseException | None:
    seen = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OmegaConfBaseException):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _explain(e: BaseException, cls: type, where: str) -> str:
    """An OmegaConf or Hydra error as one message that names the key."""
    cause = _omegaconf_cause(e)
    if cause is None:
        return f"{where}: {str(e).strip()}"
    key = cause.full_key or None
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and key and not is_known_key(cls, key):
        return unknown_key_message(cls, key, where)
    if isinstance(cause, MissingMandatoryValue) and key:
        return f"{key!r} in {where} is required and has no default: set it"
    first = str(cause).strip().splitlines()[0]
    return f"{where}: bad value{f' for {key}' if key else ''}: {first}"


def read_section(cls: type[T], section: Any, where: str, *, foreign: bool = False) -> T:
    """The one way a config section becomes a ``cls``.

    ``section`` is None (the section is absent: the defaults, and an error for a field without one), a
    ``cls`` (returned as it is), a mapping or an OmegaConf node (interpolations resolved). ``where``
    names the section in error messages (e.g. ``"data.threadweaver"``). An unknown key is an error that
    names it and the nearest valid one. So is a value of the wrong type, a required field (default
    ``MISSING``) left unset, or a value that ``cls.__post_init__`` rejects: the error names the key.

    ``foreign=True`` reads the fields of ``cls`` out of a section that belongs to someone else (verl's
    ``data`` section, say). Its other keys are not ours and are left alone; the fields without a default
    must be there.
    """
    if isinstance(section, cls):
        return section
    if section is None:
        data: Any = {}
    elif OmegaConf.is_config(section):
        data = OmegaConf.to_container(section, resolve=True)
    elif isinstance(section, Mapping):
        data = dict(section)
    else:
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} settings, got {type(section).__name__}")
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} settings, got a list")
    if foreign:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
    else:
        for key in data:
            if not is_known_key(cls, str(key)):
                raise ConfigError(unknown_key_message(cls, str(key), where))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(data))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(_explain(e, cls, where)) from e
    except (TypeError, ValueError) as e:  # __post_init__
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from e


# --------------------------------------------------------------------------- the command line
@dataclasses.dataclass
class CommandLine:
    """A command's arguments: Hydra's flags and overrides."""

    overrides: list[str] = dataclasses.field(default_factory=list)
    config_dir: str | None = None
    config_name: str | None = None
    cfg: str | None = None
    resolve: bool = False
    help: bool = False


def parse_command_line(cls: type, argv: Sequence[str]) -> CommandLine:
    """Split ``argv`` into Hydra's flags and the overrides. ``--NAME`` sets a bool knob (``--quick``)."""
    line = CommandLine()
    hints = typing.get_type_hints(cls)
    bools = {f.name for f in dataclasses.fields(cls) if hints[f.name] is bool}
    args = list(argv)
    i = 0

    def value(flag: str) -> str:
        nonlocal i
        if "=" in args[i]:
            return args[i].split("=", 1)[1]
        if i + 1 >= len(args):
            raise ConfigError(f"{flag} needs a value")
        i += 1
        return args[i]

    while i < len(args):
        a = args[i]
        flag = a.split("=", 1)[0] if a.startswith("-") else ""
        if a in ("-h", "--help"):
            line.help = True
        elif flag == "--config":
            path = Path(value(flag))
            if path.suffix not in (".yaml", ".yml") or not path.is_file():
                raise ConfigError(f"--config {str(path)!r}: not a YAML file here (give the path of a .yaml file)")
            line.config_dir, line.config_name = str(path.resolve().parent), path.stem
        elif flag in ("--config-path", "-cp", "--config-dir", "-cd"):
            line.config_dir = value(flag)
        elif flag in ("--config-name", "-cn"):
            line.config_name = value(flag)
        elif flag in ("--cfg", "-c"):
            line.cfg = value(flag)
            if line.cfg not in CFG_CHOICES:
                raise ConfigError(f"--cfg {line.cfg!r}: choose one of {CFG_CHOICES}")
        elif a == "--resolve":
            line.resolve = True
        elif a.startswith("--") and a[2:].replace("-", "_") in bools:
            line.overrides.append(f"{a[2:].replace('-', '_')}=true")
        elif a.startswith("-"):
            raise ConfigError(
                f"unknown option {a!r}: settings are KEY=VALUE overrides; the options are --config FILE.yaml, "
                f"--config-path/--config-name, --cfg {{job,hydra,all}}, --resolve, --help"
                + (f", and the switches --{', --'.join(sorted(bools))}" if bools else "")
            )
        else:
            line.overrides.append(a)
        i += 1
    return line


def _check_override_keys(cls: type, overrides: Sequence[str], where: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as e:
        raise ConfigError(f"{where}: {e}") from e
    for o in parsed:
        key = o.key_or_group
        if "/" in key or key == "hydra" or key.startswith("hydra.") or o.package is not None:
            continue  # config groups and Hydra's own settings
        if not is_known_key(cls, key):
            raise ConfigError(unknown_key_message(cls, key, where))
        if o.is_delete() and key in schema_keys(cls)[0]:
            raise ConfigError(
                f"~{key}: {key} is a setting of {cls.__name__} and cannot be removed; set it ({key}=VALUE) or "
                "leave it out to keep the default (~ removes keys added inside a dict setting)"
            )


def compose(cls: type, line: CommandLine, *, with_hydra: bool = False) -> DictConfig:
    """Hydra's composition of ``cls`` (registered under its class name), the YAML file and the overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException

    name = cls.__name__
    ConfigStore.instance().store(name=name, node=cls)
    _check_override_keys(cls, line.overrides, name)
    where = f"{line.config_name}.yaml" if line.config_name else name
    if line.config_dir:
        config_dir = Path(line.config_dir).resolve()
        if not config_dir.is_dir():
            raise ConfigError(f"--config-path {line.config_dir!r}: no such folder")
        init: Any = initialize_config_dir(config_dir=str(config_dir), version_base=HYDRA_VERSION_BASE)
    else:
        init = initialize(config_path=None, version_base=HYDRA_VERSION_BASE)
    with init:
        try:
            cfg = hydra_compose(
                config_name=line.config_name or name,
                overrides=[*HYDRA_SETTINGS, *line.overrides],
                return_hydra_config=with_hydra,
            )
        except (HydraException, OmegaConfBaseException) as e:
            raise ConfigError(_explain(e, cls, where)) from e
    if line.config_name and OmegaConf.get_type(cfg) is not cls:
        raise ConfigError(
            f"{where}: its settings are not checked against {name}. Begin the file with\n"
            f"defaults:\n  - {name}\n  - _self_"
        )
    return cfg


def load_config(cls: type[T], argv: Sequence[str] = ()) -> T:
    """``cls`` from its defaults, an optional ``--config FILE.yaml`` and Hydra overrides (see the module doc).

    ``load_config(EvalConfig, ["--config", "configs/eval.yaml", "n_samples=4"])``"""
    line = parse_command_line(cls, argv)
    if line.help or line.cfg:
        raise ConfigError("--help and --cfg belong on the command line (run_command)")
    return read_section(cls, compose(cls, line), line.config_name or cls.__name__)


def run_command(cls: type[T], argv: Sequence[str], run: Callable[[T], int | None], *, command: str) -> int:
    """A command's entry: ``--help`` prints the knobs, ``--cfg job|hydra|all`` prints the composed config,
    otherwise ``run`` gets the loaded config and returns the exit code."""
    line = parse_command_line(cls, argv)
    if line.help:
        print(help_text(cls, command))
        return 0
    if line.cfg:
        cfg = compose(cls, line, with_hydra=line.cfg != "job")
        if line.cfg == "hydra":
            cfg = cfg.hydra
        elif line.cfg == "job":
            read_section(cls, cfg, line.config_name or cls.__name__)  # the same checks as a run
        print(OmegaConf.to_yaml(cfg, resolve=line.resolve), end="")
        return 0
    return int(run(read_section(cls, compose(cls, line), line.config_name or cls.__name__)) or 0)


def to_yaml(cfg: Any) -> str:
    """A config instance as YAML (what a run records next to its outputs)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
