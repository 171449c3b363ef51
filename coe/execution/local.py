"""The local executor: every model in this process, one model used by one thread at a time,
as many loaded as the residency limits allow (see ``coe.execution.base`` for the interface)."""

from __future__ import annotations

import contextvars
import threading

from tqdm.auto import tqdm

from coe.backends import Backend
from coe.core.config import PoolConfig
from coe.core.errors import CoeError, ExpertError, StorageError
from coe.core.secrets import redact
from coe.core.types import Generation, GenRequest, OnToken
from coe.execution.base import Executor
from coe.execution.plan import Execution, Plan, PlanGroup, RunStats
from coe.execution.residency import Slot
from coe.io.cache import ResponseCache


class _Stopped(Exception):
    """Raised from ``on_result`` to end a group's batch early when the run was interrupted in
    another thread. What finished is already stored."""


class LocalExecutor(Executor):
    """Every model in this process. Placement is trivial (here); what stays loaded is the
    residency policy's (``coe.execution.residency``), which this executor feeds with its
    backends' ``load``/``unload`` and sizes. Each model has a lock: two threads never use one
    model at once."""

    placement = "process"
    keeps_loaded = True  # a model loaded by one run stays for the next run of the session

    def __init__(self, config: PoolConfig, cache: ResponseCache | None = None,
                 progress: bool = False, fail_fast: bool = False, keep_resident: bool = False,
                 max_resident: int | None = 1, memory_gb: float | None = None):
        """``max_resident``: how many models holding weights may be loaded at once (None: no
        limit). ``memory_gb``: the budget (GiB) their ``memory_bytes`` must fit in (None: none)."""
        super().__init__(config, cache, progress, fail_fast, keep_resident,
                         max_resident=max_resident, memory_gb=memory_gb)
        self._model_locks: dict[tuple, threading.Lock] = {}

    def _new_backend(self, key: tuple) -> None:
        backend = self._backends[key]
        self._model_locks[key] = threading.Lock()
        holds = backend.can.holds_weights
        self.residency.add(key, Slot(backend.label, backend.load, backend.unload, holds,
                                     backend.memory_bytes() if holds else 0))

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
        holds = {k: self.backend_for(groups[k][0]).can.holds_weights for k in order}
        endpoints = [n for k in order if not holds[k] for n in groups[k]]
        return [groups[k] for k in order if holds[k]] + ([endpoints] if endpoints else [])

    def _acquire(self, key: tuple, stats: RunStats) -> Backend:
        """The loaded backend for ``key``, marked in use (the caller holds its model lock)."""
        seconds = self.residency.acquire(key)
        if seconds is not None:
            stats.load_seconds += seconds
            stats.loads += 1
        return self._backends[key]

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
            ticket = self.residency.queue(group.key)
            try:
                with self._model_locks[group.key]:
                    self._run_group(plan, group, todo, results, per_group[k], ticket,
                                    on_token, abort)
            except Exception as e:
                failed.append(e)
                stop.set()
                raise
            finally:
                self.residency.served(ticket)

        def in_thread(k: int) -> None:
            try:
                job(k)
            except Exception:
                pass  # in ``failed``: the calling thread raises it

        weights = [k for k, (g, _) in enumerate(jobs) if self._backends[g.key].can.holds_weights]
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
            self.residency.served(ticket)  # holding the model now: no longer queued for it
        bar = tqdm(total=len(todo), desc=group.label[:40], unit="gen",
                   disable=not self.progress, leave=False)

        def on_result(j: int, gen: Generation) -> None:
            i = todo[j]
            results[i] = gen
            self._store(plan, i, gen, stats, backend.can.cacheable)
            bar.update(1)
            if abort is not None and abort.is_set():
                raise _Stopped  # the run was interrupted: end this batch here (all stored)

        broken = False
        try:
            batch = [requests[i] for i in todo]
            if on_token is not None and backend.can.stream:
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
            self.residency.done_with(group.key, broken)
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
        self.residency.unload_all()
