"""Run a function on a module right after it is imported (or at once if it already is).

The CPU mode changes two things that live in modules it must not import eagerly: vLLM's linear
layers (heavy, and loaded in vLLM's worker processes, which import vLLM before verl) and verl's
FSDP engine module (heavy; the registry it fills is only read when a worker builds an engine).
A one-shot finder at the front of ``sys.meta_path`` wraps the real loader of the named module
and calls the function once the module has executed. Forked children inherit it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from collections.abc import Callable
from types import ModuleType


class _AfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, name: str, fn: Callable[[ModuleType], None]):
        self.name = name
        self.fn = fn
        self.loader = None

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # one shot: the real finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        self.loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.fn(module)


def call_after_import(name: str, fn: Callable[[ModuleType], None]) -> bool:
    """``fn(module)`` now if ``name`` is imported, else right after its import. True if it ran now."""
    module = sys.modules.get(name)
    if module is not None:
        fn(module)
        return True
    if not any(isinstance(f, _AfterImport) and f.name == name and f.fn is fn for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, fn))
    return False


def pending(name: str) -> bool:
    """True while a hook waits for ``name`` to be imported."""
    return any(isinstance(f, _AfterImport) and f.name == name for f in sys.meta_path)
