"""The module names of coe 0.1, before the code was laid out by stage, kept importable for one
release: ``import coe.experts`` (say) gives ``coe.backends`` itself (the same module object, so
classes keep their identity) and a ``DeprecationWarning`` naming the new place.

A plugin written against 0.1 (``from coe.experts import Backend``, ``from coe.routers import
Router``) keeps working; the warning says where to import from instead."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module -> its new place (a package maps its submodules too: coe.experts.x -> coe.backends.x)
MOVED = {
    "coe.types": "coe.core.types",
    "coe.errors": "coe.core.errors",
    "coe.config": "coe.core.config",
    "coe.registry": "coe.core.registry",
    "coe.secrets": "coe.core.secrets",
    "coe.questions": "coe.io.questions",
    "coe.output": "coe.io.output",
    "coe.store": "coe.io.store",
    "coe.cache": "coe.io.cache",
    "coe.model_ref": "coe.io.model_ref",
    "coe.prompts": "coe.text.prompts",
    "coe.answers": "coe.text.answers",
    "coe.results": "coe.pipeline.results",
    "coe.experts": "coe.backends",
    "coe.experts.vllm_backend": "coe.backends.vllm",
    "coe.executor": "coe.execution",
    "coe.ray_executor": "coe.execution.ray",
    "coe.preflight": "coe.pipeline.preflight",
    "coe.embeddings": "coe.learned.embeddings",
    "coe.neighbours": "coe.learned.neighbours",
    "coe.profiles": "coe.learned.profiles",
    "coe.selector": "coe.learned.selector",
    "coe.routers": "coe.routing",
    "coe.routers.learned": "coe.learned.classifier",
    "coe.skills": "coe.routing.skills",
    "coe.cascade": "coe.routing.cascade",
    "coe.aggregators": "coe.aggregation",
    "coe.orchestrator": "coe.apps.api",
    "coe.profiling": "coe.apps.profile",
    "coe.eval": "coe.apps.eval",
    "coe.serve": "coe.apps.serve",
    "coe.cli": "coe.apps.cli",
}


def new_name(old: str) -> str | None:
    """Where module ``old`` lives now (None: it did not move)."""
    if old in MOVED:
        return MOVED[old]
    head, _, tail = old.rpartition(".")
    while head:
        if head in MOVED:
            return f"{MOVED[head]}.{old[len(head) + 1:]}"
        head, _, _ = head.rpartition(".")
    return None


class _Moved(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        new = new_name(name) if name.startswith("coe.") else None
        if new is None:
            return None
        found = importlib.util.find_spec(new)
        return importlib.util.spec_from_loader(name, self, origin=found.origin if found else None)

    def create_module(self, spec):
        new = new_name(spec.name)
        warnings.warn(f"{spec.name} is deprecated and goes in the next release: import {new}",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module) -> None:
        pass  # the module is the new one, already executed

    # ``python -m coe.cli`` (runpy) runs the new module's code as ``__main__``
    def get_code(self, name):
        new = new_name(name)
        warnings.warn(f"{name} is deprecated and goes in the next release: use {new}",
                      DeprecationWarning, stacklevel=2)
        return importlib.util.find_spec(new).loader.get_code(new)

    def is_package(self, name) -> bool:
        return importlib.util.find_spec(new_name(name)).submodule_search_locations is not None


def install() -> None:
    """Put the finder first (once), so an old name never loads a second copy of a module."""
    if not any(isinstance(f, _Moved) for f in sys.meta_path):
        sys.meta_path.insert(0, _Moved())
