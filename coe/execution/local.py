"""The local executor: every model in this process, one model used by one thread at a time,
as many loaded as the residency limits allow (see ``coe.execution.base`` for the interface)."""

from __future__ import annotations

import contextvars
import threading
import time
from collections import Counter, OrderedDict

from tqdm.auto import tqdm

from coe.backends import Backend
from coe.core.config import GB, PoolConfig
from coe.core.errors import CoeError, ExpertError, StorageError
from coe.core.secrets import redact
from coe.core.types import Generation, GenRequest, OnToken
from coe.execution.base import Executor
from coe.execution.plan import Execution, Plan, PlanGroup, RunStats
from coe.io.cache import ResponseCache


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
