"""One registry per seam: backends, routers, aggregators, executors (name -> class).

The yaml's ``backend:`` and ``kind:`` fields, the CLI's ``--router``/``--aggregator``, the
evaluation's strategy list and every "unknown ... (expected one of ...)" message read these
registries, so a name registered here is usable everywhere at once.

Built-in entries are named by import path (``"coe.routing.skill:SkillRouter"``) and imported
only when first used, so this module imports nothing from ``coe`` but its errors and sits at
the bottom of the layering: the config schema can validate names without importing routers.

Third-party code adds entries without forking, either by calling the API::

    from coe.core.registry import ROUTERS
    ROUTERS.register("mine", MyRouter)          # or @ROUTERS.register("mine") on the class

or, for an installed package, through a Python entry point in the seam's group
(``coe.backends``, ``coe.routers``, ``coe.aggregators``, ``coe.executors``: the names of 0.1)::

    [project.entry-points."coe.routers"]
    mine = "my_package.routing:MyRouter"

Entry points are read once, the first time a registry is asked for a name or its list. A
built-in name cannot be taken over by an entry point (only explicitly, with ``replace=True``).
"""

from __future__ import annotations

import importlib
import threading
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from coe.core.errors import ConfigError


class Registry:
    def __init__(self, seam: str, group: str, builtins: dict[str, str]):
        self.seam = seam  # "router": used in messages
        self.group = group  # entry-point group
        self._entries: dict[str, Any] = dict(builtins)  # name -> class | "module:attr" | EntryPoint
        self._builtin = set(builtins)
        self._plugins_read = False
        self._lock = threading.Lock()

    # -- registering ------------------------------------------------------------------------
    def register(self, name: str, obj: Any = None, *, replace: bool = False):
        """Register ``obj`` under ``name``; without ``obj``, a class decorator."""
        if obj is None:
            def decorate(cls):
                self.register(name, cls, replace=replace)
                return cls
            return decorate
        self._read_plugins()
        with self._lock:
            if name in self._entries and not replace:
                raise ValueError(f"{self.seam} {name!r} is already registered")
            self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        with self._lock:
            if name in self._builtin:
                raise ValueError(f"built-in {self.seam} {name!r} cannot be removed")
            self._entries.pop(name, None)

    # -- looking up -------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Built-ins first, then plugins in registration order."""
        self._read_plugins()
        with self._lock:
            return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def is_builtin(self, name: str) -> bool:
        return name in self._builtin

    def get(self, name: str) -> Any:
        """The class registered under ``name``; an unknown name is a one-line ConfigError."""
        self._read_plugins()
        with self._lock:
            entry = self._entries.get(name)
        if entry is None:
            raise ConfigError(self.unknown(name))
        if isinstance(entry, (str, EntryPoint)):
            entry = self._resolve(name, entry)
            with self._lock:
                self._entries[name] = entry
        return entry

    def unknown(self, name: str) -> str:
        return f"unknown {self.seam} {name!r} (expected one of {', '.join(self.names())})"

    def _resolve(self, name: str, entry: str | EntryPoint) -> Any:
        try:
            if isinstance(entry, EntryPoint):
                return entry.load()
            module, _, attr = entry.partition(":")
            return getattr(importlib.import_module(module), attr)
        except Exception as e:  # a broken plugin is the user's environment, not a coe bug
            where = f"entry point {entry.value!r} ({self.group})" if isinstance(entry, EntryPoint) \
                else entry
            raise ConfigError(f"{self.seam} {name!r}: cannot load {where}: "
                              f"{type(e).__name__}: {e}") from None

    def _read_plugins(self) -> None:
        if self._plugins_read:
            return
        with self._lock:
            if self._plugins_read:
                return
            for ep in entry_points(group=self.group):
                self._entries.setdefault(ep.name, ep)
            self._plugins_read = True


BACKENDS = Registry("backend", "coe.backends", {
    "llamacpp": "coe.backends.llamacpp:LlamaCppBackend",
    "openai": "coe.backends.openai_api:OpenAIBackend",
    "vllm": "coe.backends.vllm:VLLMBackend",
    "replay": "coe.backends.replay:ReplayBackend",
})

ROUTERS = Registry("router", "coe.routers", {
    "all": "coe.routing.all:AllRouter",
    "category": "coe.routing.category:CategoryRouter",
    "skill": "coe.routing.skill:SkillRouter",
    "knn": "coe.routing.knn:KnnRouter",
})

AGGREGATORS = Registry("aggregator", "coe.aggregators", {
    "vote": "coe.aggregation.vote:VoteAggregator",
    "llm": "coe.aggregation.llm:LLMAggregator",
    "single": "coe.aggregation.single:SingleAggregator",
    "learned": "coe.aggregation.learned:LearnedAggregator",
})

EXECUTORS = Registry("executor", "coe.executors", {
    "local": "coe.execution.local:LocalExecutor",
    "ray": "coe.execution.ray:RayExecutor",
})
