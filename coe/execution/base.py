"""Executors: every generation any stage needs (experts, an llm aggregator, an LLM writing skill
keywords) goes through one, and it is the only place that loads models and touches them.

The interface (``Executor``), in the manner of vLLM's offline ``LLM``: a batch of requests in,
a batch of generations out.

- ``plan(requests, last=None)`` groups the requests by *model weights* (experts that share a
  load key, such as two personas of one GGUF, share one group), drops duplicates and looks up
  the response cache (a request whose sampling is not reproducible, a temperature above 0
  without a seed, is neither shared with a duplicate nor read from or written to the cache). ``last`` names the expert the next stage will use (the llm aggregator):
  its group goes last, so its weights are still loaded when that stage starts.
- ``run(requests, plan=None)`` makes every uncached generation and returns an ``Execution``:
  the generations in request order and the ``RunStats`` of that call. Each generation is
  stored in the cache the moment it finishes. A failing expert never raises (its generations
  carry ``error``) unless the executor is ``fail_fast``.
- ``session()``: one logical run (an orchestrator's ``run``, an evaluation job) as a context
  manager. It yields a ``RunStats`` that adds up every ``run`` made inside it by this thread —
  also those a router or an aggregator makes — and models stay loaded between its calls.
  When the last open session ends, the executor releases its models unless ``keep_resident``
  (a server keeps them; a batch command frees them).
- ``release()`` unloads every model not in use; ``close()`` unloads everything.
- ``stages(experts, last=None)``: for a caller with too many requests to hold at once (an
  evaluation of 100,000 questions), the experts split into stages that may be planned and run
  by calls of their own, one after another, at no cost in loads or concurrency. The local
  executor runs the models holding weights one after another anyway: each is a stage, and as
  it ``keeps_loaded`` a model from one run of a session to the next, a stage's requests may
  even be handed over in several runs. An executor running groups side by side (Ray) has one
  stage.

``LocalExecutor`` runs in this process. Each model has a lock: two threads never use one
model at once, and a model is loaded only if fewer than ``max_resident`` models holding
weights are loaded (an endpoint holds none) and, with a ``memory_gb`` budget, if their
``memory_bytes`` plus its own fit in it; otherwise the least recently used idle models are
unloaded first, or the thread waits for models to become idle. A model alone is always loaded,
even one larger than the budget. An idle model another thread is already queued for is not
unloaded before that thread has used it, so concurrent runs that need the same models share
their loads.

Within one ``run``, the groups of models holding weights run one after another in plan order;
then the groups of endpoints (``Capabilities.holds_weights`` False: nothing to load, nothing held)
run all at once, the calling thread taking one and a thread of its own each other one, so a
slow API expert delays no other. Each group counts into a ``RunStats`` of its own, added up in
plan order at the end: the same totals and output as one after another. With ``fail_fast``
the first failure stops the run: no other group starts, the endpoint groups already running
finish their batch (each request bounded by its timeout), then the error is raised.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ClassVar, Iterator

from coe.backends import Backend, Capabilities, create_backend
from coe.core.config import PoolConfig
from coe.core.registry import BACKENDS
from coe.core.types import Generation, GenRequest, OnToken
from coe.execution.plan import Execution, Plan, PlanGroup, RunStats
from coe.execution.residency import Residency, Resident
from coe.io.cache import CacheKeys, ResponseCache

# The sessions open in this thread (or asyncio task): (executor, its session's stats).
_SESSIONS: ContextVar[tuple[tuple["Executor", RunStats], ...]] = ContextVar("coe_sessions",
                                                                            default=())


class Executor(ABC):
    """Where and when generations run. Implementations: ``LocalExecutor`` (registered as
    ``local``), ``RayExecutor`` (``ray``); others register in
    ``coe.core.registry.EXECUTORS``.

    Each executor declares where it places a plan group (``placement``) and whether a model
    loaded by one ``run`` stays loaded for the next ``run`` of the same session
    (``keeps_loaded``: a caller may then hand one stage's requests over in several runs, holding fewer at a time,
    without a load more). What stays loaded, and what is unloaded to make room, is not the
    executor's decision but the one residency policy's (``self.residency``,
    ``coe.execution.residency``), built from ``max_resident``, ``memory_gb`` and
    ``keep_resident``."""

    #: where a plan group runs: "process" (this one) or "ray" (an actor on a cluster)
    placement: ClassVar[str] = "process"
    #: whether models stay loaded from one run of a session to the next
    keeps_loaded: ClassVar[bool] = False
    #: how many runs (a server's batches) are worth making at once: 1 where they share one
    #: process's cores (local); more where each model has a process of its own (Ray)
    parallel_runs: int = 1

    def __init__(self, config: PoolConfig, cache: ResponseCache | None = None,
                 progress: bool = False, fail_fast: bool = False,
                 keep_resident: bool = False, *, max_resident: int | None = None,
                 memory_gb: float | None = None) -> None:
        self.config = config
        self.cache = cache
        self.progress = progress
        self.fail_fast = fail_fast
        self.residency = Residency(max_resident, memory_gb, keep_resident)
        self._backends: dict[tuple, Backend] = {}  # one per load key, loaded or not
        self._backends_lock = threading.Lock()
        self._open_sessions = 0
        self._sessions_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: PoolConfig, *, cache: ResponseCache | None = None,
                    progress: bool = False, fail_fast: bool = False,
                    keep_resident: bool = False, **options) -> "Executor":
        """The executor for ``config``: the yaml's ``executor.options``, then ``options``
        (a server's residency: ``max_resident``, ``memory_gb``) over them."""
        return cls(config, cache, progress=progress, fail_fast=fail_fast,
                   keep_resident=keep_resident, **{**config.executor.options, **options})

    # -- planning: the same for every executor, so cache keys never depend on it --------
    def backend_for(self, expert_name: str) -> Backend:
        """The backend object of an expert's weights (one per load key; not loaded here)."""
        cfg = self.config.expert(expert_name)
        key = cfg.load_key()
        with self._backends_lock:
            if key not in self._backends:
                self._backends[key] = create_backend(cfg, self.config.base_dir)
                self._new_backend(key)
            return self._backends[key]

    def start(self) -> None:
        """Get ready to run (a server calls it at start-up): the Ray executor joins its
        cluster here, so a server that cannot reach it never reports ready."""

    def _new_backend(self, key: tuple) -> None:
        """Called once per load key, when its backend object is made."""

    def _first_keys(self) -> set:
        """Load keys whose groups should run first (models already loaded)."""
        return self.residency.loaded()

    # -- what the executor declares and holds ------------------------------------------------
    @property
    def keep_resident(self) -> bool:
        return self.residency.keep_resident

    def capabilities(self, expert_name: str) -> Capabilities:
        """What an expert's backend can do (its declaration; nothing is loaded)."""
        cfg = self.config.expert(expert_name)
        return BACKENDS.get(cfg.backend).capabilities_for(cfg)

    def residents(self) -> list[Resident]:
        """The loaded models, least recently used first: label, where, bytes, in use."""
        return self.residency.residents()

    @property
    def resident(self) -> list[str]:
        """Labels of the loaded models, least recently used first."""
        return [r.label for r in self.residents()]

    @property
    def resident_bytes(self) -> int:
        """The ``memory_bytes`` of the loaded models holding weights."""
        return self.residency.resident_bytes()

    def stages(self, experts: list[str], last: str | None = None) -> list[list[str]]:
        """``experts`` split into stages whose requests may be planned and run by calls of
        their own, one stage after another, costing no load and no concurrency that one
        plan of everything would not: a caller with more requests than it wants to hold at
        once (an evaluation of 100,000 questions) plans and runs one stage at a time. By
        default one stage, as the groups of a plan may run side by side (a Ray cluster)."""
        return [list(experts)]

    def plan(self, requests: list[GenRequest], last: str | None = None) -> Plan:
        """Group ``requests`` by weights, drop duplicates, look up the cache. Groups of models
        already loaded run first; the group of expert ``last`` (the next stage's model, e.g.
        the llm aggregator) runs last, so it is still loaded when that stage starts."""
        groups: dict[tuple, PlanGroup] = {}
        keys: list[str] = []
        first: dict[str, int] = {}
        same_as: dict[int, int] = {}
        # Per plan, each expert's backend and weights fingerprint are looked up once (hashing
        # a model file per request made planning 48k replayed generations take 90 s).
        per_expert: dict[str, tuple] = {}
        cache_key = CacheKeys()
        for i, r in enumerate(requests):
            hit = per_expert.get(r.expert)
            if hit is None:
                backend = self.backend_for(r.expert)
                hit = per_expert[r.expert] = (backend, backend.fingerprint(),
                                              self.config.expert(r.expert).load_key())
            backend, fingerprint, lk = hit
            key = cache_key(fingerprint, r, backend.can.keyed_by_question)
            keys.append(key)
            g = groups.get(lk)
            if g is None:
                g = groups[lk] = PlanGroup(key=lk, label=backend.label, experts=[], indices=[])
            if r.expert not in g.experts:
                g.experts.append(r.expert)
            if key in first:
                same_as[i] = first[key]
                continue
            if r.sampling.deterministic:  # a fresh sample is never shared nor cached
                first[key] = i
            g.indices.append(i)
        hits: dict[int, Generation] = {}
        if self.cache is not None:
            cacheable = [i for g in groups.values() if self._backends[g.key].can.cacheable
                         for i in g.indices if requests[i].sampling.deterministic]
            found = self.cache.get_many([keys[i] for i in cacheable])
            for i in cacheable:
                if keys[i] in found:
                    hits[i] = found[keys[i]].model_copy(update={"cached": True})
        for g in groups.values():
            g.cached = sum(1 for i in g.indices if i in hits)
        last_key = self.config.expert(last).load_key() if last else None
        loaded = self._first_keys()
        order = sorted(groups.values(),  # stable: otherwise first-come order
                       key=lambda g: (g.key == last_key, g.key not in loaded))
        return Plan(requests, order, keys, hits, same_as)

    def _begin(self, requests: list[GenRequest], plan: Plan | None
               ) -> tuple[Plan, RunStats, list[Generation | None]]:
        """A run's plan, its stats, and its results with the cache hits already in."""
        plan = plan or self.plan(requests)
        stats = RunStats(requests=len(requests), naive_loads=plan.naive_loads)
        results: list[Generation | None] = [None] * len(requests)
        for i, gen in plan.hits.items():
            results[i] = gen
            stats.cache_hits += 1
        return plan, stats, results

    def _store(self, plan: Plan, i: int, gen: Generation, stats: RunStats,
               cacheable: bool) -> None:
        """Count request ``i``'s finished generation in ``stats``; a successful one goes to
        the response cache at once (what makes a killed run resumable)."""
        if gen.error is None:
            stats.generations += 1
            stats.generation_seconds += gen.seconds
            stats.prompt_tokens += gen.prompt_tokens
            stats.completion_tokens += gen.completion_tokens
            if self.cache is not None and cacheable and plan.requests[i].sampling.deterministic:
                self.cache.put(plan.cache_keys[i], gen)
        else:
            stats.failed_generations += 1
            stats.failures.setdefault(plan.requests[i].expert, gen.error)

    @abstractmethod
    def run(self, requests: list[GenRequest], plan: Plan | None = None,
            on_token: OnToken | None = None) -> Execution:
        """``on_token(i, text)``: pieces of request ``i``'s text as they are decoded, from
        backends that stream (``Backend.can_stream``); a cached or non-streaming generation
        reports nothing through it."""

    def release(self) -> None:
        """Unload every model that is not in use."""
        self.residency.release()

    def close(self) -> None:
        self.release()

    @contextmanager
    def session(self) -> Iterator[RunStats]:
        stats = RunStats()
        token = _SESSIONS.set(_SESSIONS.get() + ((self, stats),))
        with self._sessions_lock:
            self._open_sessions += 1
        try:
            yield stats
        finally:
            _SESSIONS.reset(token)
            with self._sessions_lock:
                self._open_sessions -= 1
                last = self._open_sessions == 0
            if last and not self.keep_resident:
                self.release()

    def _record(self, stats: RunStats) -> None:
        """Count one ``run``'s stats in every session of this executor open in this context."""
        for owner, session in _SESSIONS.get():
            if owner is self:
                session.add(stats)

