"""The Ray executor: each model (set of weights) in a Ray actor of its own, anywhere on a cluster,
kept loaded while the residency policy keeps it.

The driver (this process) plans exactly as the local executor does (the planning is the base
class's): same groups, same duplicates, same cache keys. Each group with uncached requests runs
in a driver thread of its own, so groups run at the same time on their actors:

- **which actor** (``coe.execution.ray_actors``): the model's actor if one is loaded and free;
  else, when every actor of that model is busy with another run, a new *replica* if one more
  fits beside everything loaded without unloading anything (``max_resident``, ``memory_gb``
  and each node's resources; at most ``max_replicas`` per model), else the group waits for a
  busy one;
- **loading** is the residency policy's ``load``: start an actor that reserves the expert's
  resources (``Backend.resources``; its ``memory_bytes`` as Ray's ``memory`` unless the yaml
  reserves memory; a model spanning several GPUs inside a placement group that reserves them
  together on one node) and have it load the model. Unloading kills the actor, so whatever the
  model held (GPU memory included) goes with its process and its reservation with it. What
  stays loaded, and what is unloaded first, is the policy's (LRU of idle models,
  ``keep_resident``), with ``fits`` (``coe.execution.ray_cluster``) bounding it by the nodes;
- **running**: the actor generates every prompt of the group and streams each generation back
  as it finishes (a Ray streaming generator); the driver stores each in the response cache the
  moment it arrives.

Faults are handled by Ray's own restarts: an actor whose process dies is restarted by Ray
(without its model, loaded again by the next call), and a call is retried ``max_restarts``
times (its ``max_task_retries``). For the rerun to make only the unfinished prompts, each item
the actor yields is first written to a small ledger actor, and a rerun starts by yielding the
ledger's items again: Ray drops the ones the driver already has (it numbers a generator's
outputs and discards a retry's repeats), delivers any that were written but never sent, and the
rerun then generates only what is left. One death more than that is the expert's failure,
reported in one line as the local executor reports a crash; the other groups carry on, and the
broken actor is unloaded. An exception in the driver (Ctrl-C) kills the actors of the call.
"""

from __future__ import annotations

import contextvars
import importlib.util
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from coe.core.config import GB, PoolConfig
from coe.core.errors import CoeError, ConfigError, ExpertError
from coe.core.secrets import redact
from coe.core.types import Generation, GenRequest, OnToken
from coe.execution.base import Executor
from coe.execution.plan import Execution, Plan, PlanGroup, RunStats
from coe.execution.ray_actors import WAIT, LoadFailed, ModelActors, Stopped
from coe.execution.ray_cluster import Nodes, join_or_start
from coe.execution.ray_worker import Ledger, first_line
from coe.io.cache import ResponseCache

NEEDS_RAY = "executor 'ray' needs the ray package (pip install 'coe[ray]')"
TIMELINE = 1000  # groups kept in RayExecutor.timeline (a server runs for ever)


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(NEEDS_RAY) from None
    return ray


@dataclass
class GroupSpan:
    """Where and when one group ran (``RayExecutor.timeline``). Times are the actor's clock
    (``time.time()`` on its node), ``submitted`` the driver's; ``nodes`` has one entry per
    actor start seen by this group, so a restart shows as a second node. ``started`` is when
    its model began loading for it, else when it began on the resident model (``loaded``
    None)."""

    label: str
    experts: list[str]
    jobs: int
    submitted: float
    nodes: list[dict] = field(default_factory=list)
    started: float | None = None
    loaded: float | None = None
    finished: float | None = None
    generations: int = 0
    restarts: int = 0
    error: str | None = None


@dataclass(eq=False)
class _Job:
    group: PlanGroup
    todo: list[int]
    call: str
    span: GroupSpan
    stats: RunStats = field(default_factory=RunStats)
    replica: tuple | None = None
    broken: bool = False
    bar: Any = None


class RayExecutor(Executor):
    """``executor: {kind: ray, address: auto}``. Options: ``address`` (see ``ExecutorConfig``
    and ``coe.execution.ray_cluster``), ``runtime_env`` (Ray's, for every actor), ``namespace``,
    ``max_restarts`` (1: a call survives one death of its actor), ``max_replicas`` (2: actors
    per model at most), ``parallel_runs`` (2: a server's batches at once), ``num_cpus``/
    ``num_gpus`` and ``dashboard`` (only when starting a new local instance),
    ``check_resources`` (true: a group whose resources no node has fails at once instead of
    waiting for an autoscaler), ``log_to_driver`` (false: the actors' output stays in Ray's
    logs)."""

    placement = "ray"
    keeps_loaded = True  # an actor stays loaded from one run of a session to the next

    def __init__(self, config: PoolConfig, cache: ResponseCache | None = None,
                 progress: bool = False, fail_fast: bool = False, keep_resident: bool = False,
                 address: str | None = None, runtime_env: dict | None = None,
                 namespace: str | None = None, max_restarts: int = 1, max_replicas: int = 2,
                 parallel_runs: int = 2, num_cpus: int | None = None,
                 num_gpus: int | None = None, dashboard: bool = False,
                 check_resources: bool = True, log_to_driver: bool = False,
                 max_resident: int | None = None, memory_gb: float | None = None):
        """``max_resident``/``memory_gb``/``keep_resident`` go to the residency policy, which
        also asks whether the models fit on the cluster's nodes."""
        super().__init__(config, cache, progress, fail_fast, keep_resident,
                         max_resident=max_resident, memory_gb=memory_gb)
        if importlib.util.find_spec("ray") is None:  # at once, not at the first generation
            raise ConfigError(NEEDS_RAY)
        for name, value in (("max_restarts", max_restarts + 1), ("max_replicas", max_replicas),
                            ("parallel_runs", parallel_runs)):
            if value < 1:
                raise ValueError(f"{name} must be {'0' if name == 'max_restarts' else '1'} "
                                 "or more")
        self.address = address
        self.runtime_env = runtime_env
        self.namespace = namespace
        self.max_restarts = max_restarts
        self.max_replicas = max_replicas
        self.parallel_runs = parallel_runs
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.dashboard = dashboard
        self.check_resources = check_resources
        self.log_to_driver = log_to_driver
        self.timeline: deque[GroupSpan] = deque(maxlen=TIMELINE)  # the latest groups
        self._lock = threading.Lock()
        self._started_ray = False
        self._ledger = None
        self.actors = ModelActors(_ray, config, self._backends, self.residency,
                                  runtime_env=runtime_env, max_restarts=max_restarts,
                                  max_replicas=max_replicas)

    @classmethod
    def from_config(cls, config: PoolConfig, **kwargs) -> "RayExecutor":
        if config.executor.address is not None:
            kwargs.setdefault("address", config.executor.address)
        return super().from_config(config, **kwargs)

    # -- the cluster ----------------------------------------------------------------------
    def connect(self):
        """Join the cluster, or start a private local one (once; see ``ray_cluster``)."""
        ray = _ray()
        with self._lock:
            if not ray.is_initialized():
                self._started_ray = join_or_start(
                    ray, self.address, namespace=self.namespace,
                    log_to_driver=self.log_to_driver, num_cpus=self.num_cpus,
                    num_gpus=self.num_gpus, dashboard=self.dashboard)
            if self._ledger is None:
                self._ledger = ray.remote(Ledger).options(num_cpus=0).remote()
            if self.actors.nodes is None:
                self.actors.nodes = Nodes(ray)
        return ray

    def start(self) -> None:
        self.connect()

    def _first_keys(self) -> set:
        return {key for key, _ in self.residency.loaded()}

    # -- running --------------------------------------------------------------------------
    def run(self, requests: list[GenRequest], plan: Plan | None = None,
            on_token: OnToken | None = None) -> Execution:
        plan, stats, results = self._begin(requests, plan)
        jobs: list[_Job] = []
        try:
            groups = [(g, [i for i in g.indices if results[i] is None]) for g in plan.groups]
            groups = [(g, todo) for g, todo in groups if todo]
            if groups:
                ray = self.connect()
                jobs = [self._job(g, todo, k) for k, (g, todo) in enumerate(groups)]
                self._run_jobs(ray, plan, jobs, results, on_token)
        finally:
            for job in jobs:  # in plan order, whatever order they ran in
                stats.add(job.stats)
                if job.bar is not None:
                    job.bar.close()
            self._record(stats)
        for i, j in plan.same_as.items():
            results[i] = results[j]
        return Execution(results, stats)  # type: ignore[arg-type]

    def _job(self, group: PlanGroup, todo: list[int], position: int) -> _Job:
        span = GroupSpan(label=group.label, experts=list(group.experts), jobs=len(todo),
                         submitted=time.time())
        self.timeline.append(span)
        job = _Job(group, todo, call=uuid.uuid4().hex, span=span)
        if self.progress:
            job.bar = tqdm(total=len(todo), desc=f"{group.label[:30]} (waiting)", unit="gen",
                           position=position, leave=False)
        backend = self._backends[group.key]
        if self.check_resources:
            res = backend.resources()
            shown = {"CPU": res.num_cpus or 0, "GPU": res.num_gpus or 0,
                     "memory": (res.memory_gb or 0) * GB, **res.custom}
            span.error = self.actors.nodes.infeasible(self.actors.demand(group.key),
                                                {k: v for k, v in shown.items() if v})
        return job

    def _run_jobs(self, ray, plan: Plan, jobs: list[_Job], results: list,
                  on_token: OnToken | None) -> None:
        """Each group in a thread of its own; this one waits for them (and sees Ctrl-C).
        The first exception (``fail_fast``, a bug) stops the others, then is raised."""
        abort = threading.Event()
        failed: list[BaseException] = []

        def work(job: _Job) -> None:
            try:
                self._run_group(ray, plan, job, results, on_token, abort)
            except Stopped:
                pass
            except BaseException as e:
                failed.append(e)
                abort.set()

        threads = []
        for job in jobs:
            if job.span.error is not None:  # refused before it started
                self._fail(job, job.span.error, results)
                continue
            threads.append(threading.Thread(target=contextvars.copy_context().run,
                                            args=(work, job), daemon=True,
                                            name=f"coe-ray-{job.group.label[:20]}"))
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(WAIT)
        except BaseException:
            abort.set()
            self._kill_jobs(jobs)  # at once: the threads see the abort at their next check
            raise
        if failed:
            raise failed[0]

    def _kill_jobs(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.replica is not None:
                self.actors.kill_replica(job.replica)

    def _run_group(self, ray, plan: Plan, job: _Job, results: list,
                   on_token: OnToken | None, abort: threading.Event) -> None:
        rk, tickets = self.actors.take(job.group.key, abort)
        job.replica = rk
        try:
            try:
                seconds = self.residency.acquire(rk)
            finally:
                for t in tickets:
                    self.residency.served(t)
        except CoeError as e:
            job.replica = None
            self.actors.free(rk)
            if isinstance(e, LoadFailed) and e.where:
                job.span.nodes.append(e.where)
            self._fail(job, str(e), results)
            return
        except BaseException:
            job.replica = None
            self.actors.free(rk)
            raise
        if seconds is not None:  # loaded for this group: its start is the load's
            worker = self.actors.workers[rk]
            job.stats.loads += 1
            job.stats.load_seconds += worker.load_seconds  # the model's, as the local executor's
            job.span.started = worker.loaded_at - worker.load_seconds
            job.span.loaded = worker.loaded_at
        broken = True
        try:
            if abort.is_set():
                raise Stopped
            broken = self._stream(ray, plan, job, results, on_token, abort)
        finally:
            self.residency.done_with(rk, broken)
            job.replica = None  # no longer this run's: an interrupt leaves it loaded
            self.actors.free(rk)
            self._ledger.forget.remote(job.call)

    def _stream(self, ray, plan: Plan, job: _Job, results: list, on_token: OnToken | None,
                abort: threading.Event) -> bool:
        """Run the group on its actor; whether the actor is broken (unload it) after."""
        worker = self.actors.workers[job.replica]
        stream = worker.actor.run.options(num_returns="streaming").remote(
            job.call, [plan.requests[i] for i in job.todo], self._ledger, on_token is not None)
        while True:
            ready, _ = ray.wait([stream], num_returns=1, timeout=WAIT)
            if abort.is_set():
                raise Stopped
            if not ready:
                continue
            try:
                item = ray.get(next(stream))
            except StopIteration:
                return job.broken
            except ray.exceptions.RayError as e:  # its actor died more than a call may retry
                done = sum(1 for i in job.todo if results[i] is not None)
                where = job.span.nodes[-1]["node"] if job.span.nodes else "unknown node"
                deaths = "died" if not job.span.restarts else \
                    f"died again after {job.span.restarts} restart(s)"
                self._fail(job, f"actor {deaths} on node {where} after "
                                f"{done}/{len(job.todo)} generations: {first_line(e)}", results)
                return True
            self._take(job, item, plan, results, on_token)

    def _take(self, job: _Job, item: tuple, plan: Plan, results: list,
              on_token: OnToken | None) -> None:
        kind, span, stats = item[0], job.span, job.stats
        if kind == "start":
            if span.nodes:
                span.restarts += 1
                if job.bar is not None:
                    job.bar.write(f"{job.group.label}: actor restarted on node "
                                  f"{item[1]['node']} ({item[1]['host']})")
            span.nodes.append(item[1])
            span.started = span.started or item[2]
            self.actors.place(job.replica, item[1])
            if job.bar is not None:
                job.bar.set_description(f"{job.group.label[:30]} @{item[1]['host'][:16]}")
        elif kind == "loaded":  # loaded again by a restarted process
            stats.loads += 1
            stats.load_seconds += item[1]
            span.loaded = item[2]
        elif kind == "out":
            backend = self._backends[job.group.key]
            for j, gen in item[1]:
                i = job.todo[j]
                if results[i] is not None:
                    continue
                results[i] = gen
                self._store(plan, i, gen, stats, backend.can.cacheable)
                if gen.error is None:
                    span.generations += 1
                elif self.fail_fast:
                    raise ExpertError(plan.requests[i].expert, gen.error)
            if on_token is not None:
                for j, piece in item[2]:
                    on_token(job.todo[j], piece)
            if job.bar is not None:
                job.bar.update(len(item[1]))
        elif kind == "end":
            span.finished = item[1]
        elif kind == "fail":
            job.broken = True
            self._fail(job, item[1], results)

    def _fail(self, job: _Job, msg: str, results: list) -> None:
        msg = job.span.error = redact(msg)  # the actor's exception text may carry a credential
        job.span.finished = job.span.finished or time.time()
        for i in job.todo:
            if results[i] is None:
                results[i] = Generation(error=msg)
                job.stats.failed_generations += 1
        for name in job.group.experts:
            job.stats.failures.setdefault(name, msg)
        if self.fail_fast:
            raise ExpertError(job.group.experts[0], msg)

    def close(self) -> None:
        self.residency.unload_all()
        self.actors.close()
        if self._ledger is not None:
            try:
                _ray().kill(self._ledger, no_restart=True)
            except Exception:
                pass
            self._ledger = None
        if self._started_ray:
            _ray().shutdown()
            self._started_ray = False
