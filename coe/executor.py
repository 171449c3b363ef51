"""Executors: every generation any stage needs (experts, an llm aggregator, an LLM writing skill
keywords) goes through one, and it is the only place that loads models and touches them.

The interface (``Executor``), in the manner of vLLM's offline ``LLM``: a batch of requests in,
a batch of generations out.

- ``plan(requests, last=None)`` groups the requests by *model weights* (experts that share a
  load key, such as two personas of one GGUF, share one group), drops duplicates and looks up
  the response cache. ``last`` names the expert the next stage will use (the llm aggregator):
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
then the groups of endpoints (``Backend.holds_weights`` False: nothing to load, nothing held)
run all at once, the calling thread taking one and a thread of its own each other one, so a
slow API expert delays no other. Each group counts into a ``RunStats`` of its own, added up in
plan order at the end: the same totals and output as one after another. With ``fail_fast``
the first failure stops the run: no other group starts, the endpoint groups already running
finish their batch (each request bounded by its timeout), then the error is raised.
"""

from __future__ import annotations

import contextvars
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from typing import ClassVar, Iterator

from tqdm.auto import tqdm

from coe.cache import CacheKeys, ResponseCache
from coe.config import GB, PoolConfig
from coe.errors import CoeError, ExpertError, StorageError
from coe.experts import Backend, create_backend
from coe.secrets import redact
from coe.types import Generation, GenRequest, OnToken


@dataclass
class PlanGroup:
    key: tuple
    label: str
    experts: list[str]
    indices: list[int]  # unique requests of this group (indices into Plan.requests)
    cached: int = 0


@dataclass
class Plan:
    requests: list[GenRequest]
    groups: list[PlanGroup]
    cache_keys: list[str]
    hits: dict[int, Generation]  # request index -> cached generation
    same_as: dict[int, int]  # duplicate request index -> first index

    @property
    def naive_loads(self) -> int:
        """Loads a per-question order would make: one for every (question, expert) job."""
        return len(self.requests)

    @property
    def loads(self) -> int:
        return sum(1 for g in self.groups if len(g.indices) > g.cached)

    def rows(self) -> list[str]:
        """One line per group: its model, experts, jobs and cached jobs (under
        ``PLAN_HEADER``)."""
        return [plan_row(g.label, g.experts, len(g.indices), g.cached) for g in self.groups]

    def summary(self) -> str:
        return plan_summary(len(self.requests), len(self.same_as), len(self.hits), self.loads,
                            self.naive_loads)

    def describe(self) -> str:
        return "\n".join([PLAN_HEADER, *self.rows(), self.summary()])


PLAN_HEADER = f"{'model':<44} {'experts':<34} {'jobs':>6} {'cached':>7}"


def plan_row(label: str, experts: list[str], jobs: int, cached: int) -> str:
    return f"{label[:44]:<44} {','.join(experts)[:34]:<34} {jobs:>6} {cached:>7}"


def plan_summary(requests: int, duplicates: int, cached: int, loads: int, naive: int) -> str:
    """The last line of ``Plan.describe``, also for the plans of several stages together."""
    return (f"{requests} generation requests ({duplicates} duplicates), {cached} cached; "
            f"{loads} model loads (naive per-question order: {naive})")


@dataclass
class RunStats:
    loads: int = 0
    naive_loads: int = 0
    requests: int = 0
    generations: int = 0
    cache_hits: int = 0
    failed_generations: int = 0
    generation_seconds: float = 0.0
    load_seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: dict[str, str] = field(default_factory=dict)  # expert -> first error

    def add(self, other: "RunStats") -> "RunStats":
        """Add ``other``'s counts to these (the first error per expert is kept)."""
        for f in fields(self):
            if f.name == "failures":
                for name, msg in other.failures.items():
                    self.failures.setdefault(name, msg)
            else:
                setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self


@dataclass
class Execution:
    """What one ``Executor.run`` call returns."""

    generations: list[Generation]
    stats: RunStats


# The sessions open in this thread (or asyncio task): (executor, its session's stats).
_SESSIONS: ContextVar[tuple[tuple["Executor", RunStats], ...]] = ContextVar("coe_sessions",
                                                                            default=())


class Executor(ABC):
    """Where and when generations run. Implementations: ``LocalExecutor`` (registered as
    ``local``); others register in ``coe.registry.EXECUTORS``."""

    keep_resident: bool = False
    #: whether a model loaded by one ``run`` stays loaded for the next ``run`` of the same
    #: session (unless another model needs its room): a caller may then hand one stage's
    #: requests over in several runs, holding fewer at a time, without a load more
    keeps_loaded: ClassVar[bool] = False

    def __init__(self, config: PoolConfig, cache: ResponseCache | None = None,
                 progress: bool = False, fail_fast: bool = False,
                 keep_resident: bool = False) -> None:
        self.config = config
        self.cache = cache
        self.progress = progress
        self.fail_fast = fail_fast
        self.keep_resident = keep_resident
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

    def _new_backend(self, key: tuple) -> None:
        """Called once per load key, when its backend object is made."""

    def _first_keys(self) -> set:
        """Load keys whose groups should run first (models already loaded)."""
        return set()

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
            key = cache_key(fingerprint, r, backend.keyed_by_question)
            keys.append(key)
            g = groups.get(lk)
            if g is None:
                g = groups[lk] = PlanGroup(key=lk, label=backend.label, experts=[], indices=[])
            if r.expert not in g.experts:
                g.experts.append(r.expert)
            if key in first:
                same_as[i] = first[key]
                continue
            first[key] = i
            g.indices.append(i)
        hits: dict[int, Generation] = {}
        if self.cache is not None:
            cacheable = [i for g in groups.values() if self._backends[g.key].cacheable
                         for i in g.indices]
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
            if self.cache is not None and cacheable:
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

    @abstractmethod
    def release(self) -> None:
        """Unload every model that is not in use."""

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


class _Stopped(Exception):
    """Raised from ``on_result`` to end a group's batch early when the run was interrupted in
    another thread. What finished is already stored."""


class LocalExecutor(Executor):
    keeps_loaded = True

    def __init__(self, config: PoolConfig, cache: ResponseCache | None = None,
                 progress: bool = False, fail_fast: bool = False, keep_resident: bool = False,
                 max_resident: int | None = 1, memory_gb: float | None = None):
        """``max_resident``: how many models holding weights may be loaded at once (None: no
        limit). ``memory_gb``: the budget (GiB) their ``memory_bytes`` must fit in (None: none)."""
        super().__init__(config, cache, progress, fail_fast, keep_resident)
        if max_resident is not None and max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        if memory_gb is not None and memory_gb <= 0:
            raise ValueError("memory_gb must be positive")
        self.max_resident = max_resident
        self.memory_gb = memory_gb
        self._budget = None if memory_gb is None else int(memory_gb * GB)
        self._bytes: dict[tuple, int] = {}  # memory_bytes of each model holding weights
        self._model_locks: dict[tuple, threading.Lock] = {}
        self._cond = threading.Condition()  # guards the residency state below
        self._resident: OrderedDict[tuple, None] = OrderedDict()  # loaded, least recent first
        self._loading: set[tuple] = set()
        self._in_use: set[tuple] = set()
        self._waiting: Counter = Counter()  # threads queued for a model (its lock or residency)

    def _first_keys(self) -> set:
        """Load keys of the models already loaded here: their groups run first."""
        with self._cond:
            return set(self._resident)

    def _new_backend(self, key: tuple) -> None:
        self._model_locks[key] = threading.Lock()

    def stages(self, experts: list[str], last: str | None = None) -> list[list[str]]:
        """The groups holding weights run one after another in any case: each is a stage of
        its own, in plan order (models already loaded first, the group of ``last`` last).
        The endpoint groups run at the same time as each other, after them: one stage."""
        groups: dict[tuple, list[str]] = {}
        for name in experts:
            groups.setdefault(self.config.expert(name).load_key(), []).append(name)
        last_key = self.config.expert(last).load_key() if last else None
        loaded = self._first_keys()
        order = sorted(groups, key=lambda k: (k == last_key, k not in loaded))
        holds = {k: self.backend_for(groups[k][0]).holds_weights for k in order}
        endpoints = [n for k in order if not holds[k] for n in groups[k]]
        return [groups[k] for k in order if holds[k]] + ([endpoints] if endpoints else [])

    # -- residency ------------------------------------------------------------------------
    def _room(self, key: tuple, evicted=()) -> bool:
        """Under ``self._cond``: whether ``key`` may be loaded beside the models holding
        weights that are loaded or loading, less ``evicted``, within ``max_resident`` and the
        memory budget."""
        held = [k for k in (*self._resident, *self._loading)
                if self._backends[k].holds_weights and k not in evicted]
        if not held:
            return True  # alone, it is loaded even if larger than the budget
        if self.max_resident is not None and len(held) >= self.max_resident:
            return False
        return (self._budget is None
                or sum(self._bytes[k] for k in held) + self._bytes[key] <= self._budget)

    def _acquire(self, key: tuple, stats: RunStats) -> Backend:
        """The loaded backend for ``key``, marked in use (the caller holds its model lock)."""
        backend = self._backends[key]
        if backend.holds_weights and key not in self._bytes:
            self._bytes[key] = backend.memory_bytes()  # from file sizes: cheap, once a model
        with self._cond:
            while True:
                if key in self._resident:
                    self._resident.move_to_end(key)
                    self._in_use.add(key)
                    return backend
                if not backend.holds_weights or self._room(key):
                    break
                # evict the least recently used idle model if unloading the idle ones makes
                # room, but not one another thread is queued for: that thread is served first
                # (it needs nothing more), then this one evicts
                idle = [k for k in self._resident if self._backends[k].holds_weights
                        and k not in self._in_use and not self._waiting[k]]
                if idle and self._room(key, idle):
                    self._unload(idle[0])
                    continue
                self._cond.wait()
            self._loading.add(key)
        t0 = time.perf_counter()
        try:
            backend.load()
        except BaseException:
            with self._cond:
                self._loading.discard(key)
                self._cond.notify_all()
            raise
        stats.load_seconds += time.perf_counter() - t0
        stats.loads += 1
        with self._cond:
            self._loading.discard(key)
            self._resident[key] = None
            self._in_use.add(key)
        return backend

    def _done_with(self, key: tuple, broken: bool = False) -> None:
        with self._cond:
            self._in_use.discard(key)
            if broken and key in self._resident:
                try:
                    self._unload(key)
                except Exception:
                    self._resident.pop(key, None)
            self._cond.notify_all()

    def _unload(self, key: tuple) -> None:
        """Under ``self._cond``, for a model that is not in use."""
        self._resident.pop(key, None)
        self._backends[key].unload()

    def release(self) -> None:
        with self._cond:
            for key in [k for k in self._resident if k not in self._in_use]:
                self._unload(key)
            self._cond.notify_all()

    @property
    def resident(self) -> list[str]:
        """Labels of the loaded models, least recently used first."""
        with self._cond:
            return [self._backends[k].label for k in self._resident]

    @property
    def resident_bytes(self) -> int:
        """The ``memory_bytes`` of the loaded models holding weights."""
        with self._cond:
            return sum(self._bytes.get(k, 0) for k in self._resident)

    # -- running --------------------------------------------------------------------------
    def run(self, requests: list[GenRequest], plan: Plan | None = None,
            on_token: OnToken | None = None) -> Execution:
        plan, stats, results = self._begin(requests, plan)
        jobs = [(g, todo) for g in plan.groups
                if (todo := [i for i in g.indices if results[i] is None])]
        per_group = [RunStats() for _ in jobs]  # groups may run in different threads
        try:
            self._run_jobs(plan, jobs, per_group, results, on_token)
        finally:
            for group_stats in per_group:  # in plan order, whatever order they ran in
                stats.add(group_stats)
            self._record(stats)
        for i, j in plan.same_as.items():
            results[i] = results[j]
        return Execution(results, stats)  # type: ignore[arg-type]

    def _run_jobs(self, plan: Plan, jobs: list[tuple[PlanGroup, list[int]]],
                  per_group: list[RunStats], results: list[Generation | None],
                  on_token: OnToken | None) -> None:
        """Run each (group, requests to make): first the groups holding weights, one after
        another in this thread (what is loaded follows the residency rules); then the endpoint
        groups all at once, this thread running the first and a daemon thread each other one.

        The first exception (a ``fail_fast`` error, a bug) starts no other group; the groups
        already running finish their batch (every request bounded by its timeout), then it is
        raised. An interrupt is raised at once and ends the other batches at their next
        result (daemon threads do not keep the process alive meanwhile)."""
        stop = threading.Event()  # a group failed: no group starts after it
        abort = threading.Event()  # interrupted: running batches end at their next result
        failed: list[Exception] = []  # in the order they happened

        def job(k: int) -> None:
            if stop.is_set():
                return
            group, todo = jobs[k]
            ticket = self._queue(group.key)
            try:
                with self._model_locks[group.key]:
                    self._run_group(plan, group, todo, results, per_group[k], ticket,
                                    on_token, abort)
            except Exception as e:
                failed.append(e)
                stop.set()
                raise
            finally:
                self._served(ticket)

        def in_thread(k: int) -> None:
            try:
                job(k)
            except Exception:
                pass  # in ``failed``: the calling thread raises it

        weights = [k for k, (g, _) in enumerate(jobs) if self._backends[g.key].holds_weights]
        endpoints = [k for k in range(len(jobs)) if k not in weights]
        try:
            for k in weights:
                job(k)
            if not endpoints:
                return
            threads = [threading.Thread(target=contextvars.copy_context().run,
                                        args=(in_thread, k), name=f"coe-endpoint-{k}",
                                        daemon=True)
                       for k in endpoints[1:]]
            for t in threads:
                t.start()
            try:
                job(endpoints[0])
            except Exception:
                pass  # in ``failed``: raised below, once the other groups have ended
            for t in threads:
                t.join()
        except BaseException as e:
            stop.set()
            if not isinstance(e, Exception):
                abort.set()  # interrupted (KeyboardInterrupt, SystemExit)
            raise
        if failed:
            raise failed[0]

    def _queue(self, key: tuple) -> list:
        """Count this thread as queued for ``key``; the returned ticket ends it (once)."""
        with self._cond:
            self._waiting[key] += 1
        return [key]

    def _served(self, ticket: list) -> None:
        with self._cond:
            if ticket:
                self._waiting[ticket.pop()] -= 1
                self._cond.notify_all()

    def _run_group(self, plan: Plan, group: PlanGroup, todo: list[int],
                   results: list[Generation | None], stats: RunStats, ticket: list,
                   on_token: OnToken | None = None,
                   abort: threading.Event | None = None) -> None:
        requests = plan.requests
        try:
            backend = self._acquire(group.key, stats)
        except CoeError as e:
            self._fail(results, todo, group, f"load failed: {e}", stats)
            return
        finally:
            self._served(ticket)  # holding the model now: no longer queued for it
        bar = tqdm(total=len(todo), desc=group.label[:40], unit="gen",
                   disable=not self.progress, leave=False)

        def on_result(j: int, gen: Generation) -> None:
            i = todo[j]
            results[i] = gen
            self._store(plan, i, gen, stats, backend.cacheable)
            bar.update(1)
            if abort is not None and abort.is_set():
                raise _Stopped  # the run was interrupted: end this batch here (all stored)

        broken = False
        try:
            batch = [requests[i] for i in todo]
            if on_token is not None and backend.can_stream:
                # a duplicate request (same_as) streams to the first one's index only
                backend.generate(batch, on_result, on_token=lambda j, piece: on_token(todo[j], piece))
            else:
                backend.generate(batch, on_result)
        except _Stopped:
            return  # the run was interrupted
        except StorageError:  # the response cache cannot be written: not the model's fault
            raise
        except Exception as e:  # the model broke mid-batch: keep what finished
            broken = True
            done = sum(1 for i in todo if results[i] is not None)
            self._fail(results, todo, group, f"crashed after {done}/{len(todo)} generations: "
                                             f"{type(e).__name__}: {e}", stats)
        finally:
            bar.close()
            self._done_with(group.key, broken)
        if self.fail_fast:
            for i in todo:
                if results[i] is not None and results[i].error:
                    raise ExpertError(requests[i].expert, results[i].error)

    def _fail(self, results: list, todo: list[int], group: PlanGroup, msg: str,
              stats: RunStats) -> None:
        msg = redact(msg)  # an exception's text may carry a credential (a URL with a password)
        for i in todo:
            if results[i] is None:
                results[i] = Generation(error=msg)
                stats.failed_generations += 1
        for name in group.experts:
            stats.failures.setdefault(name, msg)
        if self.fail_fast:
            raise ExpertError(group.experts[0], msg)

    def close(self) -> None:
        with self._cond:
            for key in list(self._resident):
                self._unload(key)
