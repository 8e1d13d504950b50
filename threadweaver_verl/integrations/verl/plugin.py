"""The ``verl.plugins`` entry point: registers every component with verl, lazily.

verl imports this module on ``import verl``, in the driver and in every Ray worker, and swallows any
exception it raises. So importing it must be cheap and silent: it imports the standard library only.
It runs the :data:`EARLY_HOOKS`, then arranges that each component of :data:`COMPONENTS` is registered
right after the verl module that holds its registry has been imported: our module is imported then and its
``register()`` called. A process that never imports verl's agent loop, trainer, estimators or engines never
imports ours either.

Whether a component is registered is read from verl's registry each time it is asked, never from a record
of an earlier attempt, so the order in which verl and our modules are imported does not matter. A module of
ours that imports verl itself (the agent loop, the trainer) registers its components at the end of its own
import as well.

A registration that fails is printed to stderr at once and recorded; :func:`require`, called where a
component is used, raises it. ``python -m threadweaver_verl doctor`` prints the table.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import traceback
from dataclasses import dataclass
from enum import StrEnum
from types import ModuleType
from typing import Any

# Run first thing at `import verl` in every process, before any registration: (module, function) pairs.
# A hook must be cheap and silent (it runs wherever verl is imported) and import no verl module that holds a
# registry. Its outcome is in EARLY_STATUS; a failure is printed to stderr.
EARLY_HOOKS: tuple[tuple[str, str], ...] = (
    # verl's CPU mode: on VERL_PLATFORM=cpu it registers the CPU platform before any verl module that reads the
    # platform at import time is imported (threadweaver_verl/integrations/verl/cpu).
    ("threadweaver_verl.integrations.verl.cpu", "activate_if_requested"),
)


class Kind(StrEnum):
    """The verl registries our components go into."""

    AGENT_LOOP = "agent_loop"
    ADV_ESTIMATOR = "adv_estimator"
    TRAINER = "trainer"
    ENGINE = "engine"


@dataclass(frozen=True)
class Component:
    name: str  # ours: what `require`, doctor and the failure messages call it
    kind: Kind
    key: str  # the name verl's registry knows it by (the vendor, for an engine)
    verl_module: str  # the verl module that holds the registry: registration runs once it is imported
    target: str  # qualified name of what verl's registry must hold under `key`; its module has `register()`

    @property
    def module(self) -> str:
        return self.target.rsplit(".", 1)[0]


_HERE = "threadweaver_verl.integrations.verl"
COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component(
            "agent_loop:threadweaver",
            Kind.AGENT_LOOP,
            "threadweaver",
            "verl.experimental.agent_loop",
            f"{_HERE}.agent_loop.ThreadWeaverAgentLoop",
        ),
        Component(
            "adv_estimator:p_grpo",
            Kind.ADV_ESTIMATOR,
            "p_grpo",
            "verl.trainer.ppo.core_algos",
            f"{_HERE}.advantage.compute_p_grpo_advantage",
        ),
        Component(
            "trainer:threadweaver",
            Kind.TRAINER,
            "threadweaver",
            "verl.trainer.ppo.v1",
            f"{_HERE}.trainer.ThreadWeaverTrainerSync",
        ),
        Component(
            "engine:trie",
            Kind.ENGINE,
            "threadweaver_trie",
            "verl.workers.engine",
            f"{_HERE}.sft_engine.TrieFSDPEngineWithLMHead",
        ),
    )
}

# component name -> the error its registration raised (cleared when a later registration succeeds)
FAILURES: dict[str, str] = {}
# component name -> its status when last asked (by require or register_all)
STATUS: dict[str, str] = {}
# "module.function" of each early hook -> "ok" or the error it raised
EARLY_STATUS: dict[str, str] = {}

OK = "ok"


class PluginNotActive(RuntimeError):
    pass


def verl_private_registry(kind: Kind) -> dict[Any, Any]:
    """The one place that touches verl's private registries; read only (every write goes through verl's
    public ``register`` functions). Checked against verl 0.9.1, which has no public read of these two:

    - ``verl.experimental.agent_loop.agent_loop._agent_loop_registry``: agent name -> config with a
      ``_target_`` (written by verl's ``register`` decorator, or from an agent-loop YAML by ``AgentLoopWorker``);
    - ``verl.workers.engine.base.EngineRegistry._engines``: model type -> backend -> ``device`` or
      ``(device, vendor)`` -> engine class (``EngineRegistry.get_engine_cls`` returns only the engine this
      machine's device and vendor select).
    """
    if kind is Kind.AGENT_LOOP:
        from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

        return _agent_loop_registry
    if kind is Kind.ENGINE:
        from verl.workers.engine.base import EngineRegistry

        return EngineRegistry._engines
    raise ValueError(f"verl's {kind} registry has a public read; use it")


def _qualified_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def registered(component: Component) -> str | None:
    """The qualified name of what verl's registry holds under the component's key (several, joined, for an
    engine registered under different classes); None when nothing, or when that registry is not imported."""
    if component.verl_module not in sys.modules:
        return None
    if component.kind is Kind.ADV_ESTIMATOR:
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn

        try:
            return _qualified_name(get_adv_estimator_fn(component.key))
        except ValueError:
            return None
    if component.kind is Kind.TRAINER:
        from verl.trainer.ppo.v1 import get_trainer_cls

        try:
            return _qualified_name(get_trainer_cls(component.key))
        except ValueError:
            return None
    if component.kind is Kind.AGENT_LOOP:
        entry = verl_private_registry(Kind.AGENT_LOOP).get(component.key)
        return None if entry is None else str(entry["_target_"])
    engines = verl_private_registry(Kind.ENGINE).get("language_model", {})
    held = {
        _qualified_name(cls)
        for by_device in engines.values()
        for key, cls in by_device.items()
        if isinstance(key, tuple) and key[1] == component.key
    }
    return ", ".join(sorted(held)) or None


def status(name: str) -> str:
    """``"ok"`` when verl's registry holds the component; otherwise why not."""
    component = _component(name)
    held = registered(component)
    if held == component.target:
        return OK
    if name in FAILURES:
        return FAILURES[name]
    if component.verl_module not in sys.modules:
        return f"pending: registers when {component.verl_module} is imported"
    return f"not registered: verl holds {held or 'nothing'} under {component.key!r}"


def require(name: str) -> None:
    """Raise a clear error unless ``name`` is registered with verl (call where the component is used).
    Imports the verl module that holds its registry first, which registers it if nothing has yet."""
    component = _component(name)
    try:
        importlib.import_module(component.verl_module)
    except Exception as e:  # noqa: BLE001 - reported as the reason below
        FAILURES[name] = f"importing {component.verl_module} failed: {type(e).__name__}: {e}"
    if registered(component) is None and name not in FAILURES and component.verl_module in sys.modules:
        _register(component)  # the import hook did not run (a finder ahead of ours served the module)
    STATUS[name] = status(name)
    if STATUS[name] != OK:
        raise PluginNotActive(
            f"threadweaver-verl component {name!r} is not registered with verl ({STATUS[name]}). "
            "Run `python -m threadweaver_verl doctor` to see why; is the package installed in this environment "
            "(`pip install threadweaver-verl`)?"
        )


def register_all() -> dict[str, str]:
    """Import every verl module that holds one of our registries (registering each component) and return
    every component's status. Heavy: for ``doctor`` and tests, not for ``import verl``."""
    for name in COMPONENTS:
        try:
            require(name)
        except PluginNotActive:
            pass  # STATUS says why
    return STATUS


def _component(name: str) -> Component:
    if name not in COMPONENTS:
        raise KeyError(f"no threadweaver-verl component {name!r}; the components are {sorted(COMPONENTS)}")
    return COMPONENTS[name]


def _register(component: Component) -> None:
    """Import the component's module and call its ``register()``; a failure is recorded and printed."""
    try:
        module = importlib.import_module(component.module)
        register = getattr(module, "register", None)
        if register is None:
            # `component.module` is the module being imported right now (it imported verl, which imported the
            # registry): it defines `register` further down and registers at the end of its own import.
            return
        register()
        FAILURES.pop(component.name, None)
    except Exception as e:  # noqa: BLE001 - recorded, printed, raised by require()
        FAILURES[component.name] = f"{type(e).__name__}: {e}"
        print(
            f"[threadweaver-verl] registering {component.name} FAILED: {FAILURES[component.name]}\n"
            f"{traceback.format_exc(limit=3)}",
            file=sys.stderr,
        )


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a verl module that holds one of our registries, it wraps the spec the other
    finders return so that the components are registered right after the module has executed."""

    def find_spec(self, fullname: str, path: Any, target: ModuleType | None = None) -> Any:
        if not any(c.verl_module == fullname for c in COMPONENTS.values()):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__.loader = module.__loader__ = self.loader  # the module keeps no trace of this wrapper
        self.loader.exec_module(module)
        for component in list(COMPONENTS.values()):
            if component.verl_module == module.__name__:
                _register(component)

    def __getattr__(self, name: str) -> Any:  # the rest of the loader's interface: the wrapped loader's
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def _run_early_hooks() -> None:
    for module, function in EARLY_HOOKS:
        name = f"{module}.{function}"
        try:
            getattr(importlib.import_module(module), function)()
            EARLY_STATUS[name] = OK
        except Exception as e:  # noqa: BLE001 - recorded and printed; doctor shows it
            EARLY_STATUS[name] = f"{type(e).__name__}: {e}"
            print(
                f"[threadweaver-verl] {name} FAILED: {EARLY_STATUS[name]}\n{traceback.format_exc(limit=3)}",
                file=sys.stderr,
            )


def _install() -> None:
    """Register each component once its verl module is imported: now for a module imported already."""
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
    for component in COMPONENTS.values():
        if component.verl_module in sys.modules:
            _register(component)


_run_early_hooks()  # first: the CPU mode must be active before anything else of verl's is imported
_install()
