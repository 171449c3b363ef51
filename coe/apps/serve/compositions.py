"""What a request's ``model`` names: a composition of the pool.

- ``coe``: the yaml's router and aggregator;
- ``coe/<router>+<aggregator>``: any registered router with any registered aggregator
  (``coe/skill+vote``, ``coe/category+llm``);
- an expert's name: that expert alone (its own answer, through the same executor and cache).

Every composition is a ``coe.pipeline.flow.Composition`` (a router, an aggregator, how its
experts are asked) over one shared executor and one response cache, so a batch holding
requests for several compositions loads each model once (``flow.answer``). A composition is
built the first time it is asked for and kept; one that cannot be built (the skill router
without profiles) answers 404 with the reason. A pass-through asks its expert as a proxy: the
request as it came.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from coe.aggregation import build_aggregator
from coe.core.config import PoolConfig
from coe.core.errors import CoeError
from coe.core.registry import AGGREGATORS, ROUTERS
from coe.core.types import Question, Recruit, Route
from coe.execution import Executor
from coe.pipeline import flow
from coe.routing import Router, build_router

DEFAULT = "coe"
PREFIX = "coe/"


class UnknownModel(LookupError):
    """The request names no composition (or one that cannot be built); the message says why
    and lists the known names."""


class ExpertRouter(Router):
    """Every question to one expert (a pass-through)."""

    name = "expert"

    def __init__(self, expert: str):
        self.expert = expert

    def route(self, questions: list[Question]) -> list[Route]:
        return [Route(question_id=q.id, experts=[Recruit(name=self.expert)], confidence=1.0,
                      reason=f"pass-through to {self.expert}") for q in questions]


@dataclass
class Composition:
    name: str
    flow: flow.Composition
    router: str
    aggregator: str
    expert: str | None = None  # a pass-through's expert
    #: how a request delegated to one of its recruits is answered (tools): that recruit as a
    #: pass-through, its answer as it is
    delegated: flow.Composition | None = None


class Compositions:
    def __init__(self, config: PoolConfig, executor: Executor):
        self.config = config
        self.executor = executor
        self._built: dict[str, Composition] = {}
        self._broken: dict[str, str] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """Every composition name the pool offers (those that fail to build included: asking
        for one says why), then the experts."""
        combos = [f"{PREFIX}{r}+{a}" for r in ROUTERS.names() for a in AGGREGATORS.names()]
        return [DEFAULT, *combos, *(e.name for e in self.config.experts)]

    def available(self) -> list[str]:
        return [n for n in self.names() if n not in self._broken]

    def get(self, name: str) -> Composition:
        with self._lock:
            if name in self._built:
                return self._built[name]
            if name in self._broken:
                raise UnknownModel(self._broken[name])
            try:
                comp = self._build(name)
            except UnknownModel:
                raise
            except CoeError as e:
                self._broken[name] = f"model {name!r} is not available: {e}"
                raise UnknownModel(self._broken[name]) from None
            self._built[name] = comp
            return comp

    def _build(self, name: str) -> Composition:
        cfg = self.config
        if name == DEFAULT:
            router, aggregator, expert = cfg.router.kind, cfg.aggregator.kind, None
        elif name.startswith(PREFIX) and name.count("+") == 1:
            router, aggregator = name[len(PREFIX):].split("+")
            expert = None
            if router not in ROUTERS or aggregator not in AGGREGATORS:
                raise UnknownModel(self._unknown(name))
        elif name in cfg.by_name:
            router, aggregator, expert = "expert", "single", name
        else:
            raise UnknownModel(self._unknown(name))
        strength = {e.name: e.strength for e in cfg.experts if e.strength is not None}
        built = flow.Composition(
            name, ExpertRouter(expert) if expert else build_router(router, cfg, self.executor),
            build_aggregator(aggregator, cfg, strength=strength),
            "proxy" if expert else "compose")
        delegated = None if expert else flow.Composition(
            name, built.router, build_aggregator("single", cfg, strength=strength), "proxy")
        return Composition(name, built, router, aggregator, expert, delegated)

    def _unknown(self, name: str) -> str:
        return f"unknown model {name!r} (known: {', '.join(self.available())})"

    def close(self) -> None:
        """Nothing to free: the shared executor and cache are the service's."""
