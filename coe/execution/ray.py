"""The Ray executor: each plan group runs in a Ray actor of its own, anywhere on a cluster.

The driver (this process) plans exactly as the local executor does (the planning is the base
class's): same groups, same duplicates, same cache keys. For every group with uncached
requests it then starts an actor that reserves the expert's resources (``Backend.resources``:
the yaml's ``resources`` over the backend's defaults; a model spanning several GPUs,
``gang_size() > 1``, inside a placement group that reserves them together on one node). The
actor loads the model once, generates every prompt of the group and streams each generation
back as it finishes (a Ray streaming generator); the driver stores each in the response cache
the moment it arrives. Which groups run at once and which wait for resources is Ray's
scheduler's decision. When its group is done the actor is killed at once, so whatever the model
held (GPU memory included) goes with its process and the resources it reserved go to the next
waiting group. There is no residency: a server (``keep_resident``) loads each model once per
batch. (Keeping actors between batches would hold their resources, and a group waiting for them
would wait for ever.)

Faults are handled by Ray's own retry settings: every actor has ``max_restarts=1`` and its
generator ``max_task_retries=1``, so an actor, worker or node that dies mid-group is restarted
once (wherever the resources are) and the generator runs again. For the rerun to make only the
unfinished prompts, each item the actor yields is first written to a small ledger actor, and a
rerun starts by yielding the ledger's items again: Ray drops the ones the driver already has (it
numbers a generator's outputs and discards a retry's repeats), delivers any that were written
but never sent, and the rerun then generates only what is left. A second death is the expert's
failure, reported in one line as the local executor reports a crash; the other groups carry on.
An exception in the driver (Ctrl-C) kills every actor of the call.

Why a ledger actor rather than the driver resubmitting the unfinished prompts itself: the
restart and the retry stay Ray's (its counters, its placement, its node-failure detection),
and the ledger is only memory, a few lines long.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from coe.core.config import GB, PoolConfig, Resources
from coe.core.errors import ConfigError, ExpertError
from coe.core.types import Generation, GenRequest, OnToken
from coe.execution.base import Executor
from coe.execution.plan import Execution, Plan, PlanGroup, RunStats
from coe.execution.ray_worker import GroupWorker, Ledger, first_line
from coe.io.cache import ResponseCache

NEEDS_RAY = "executor 'ray' needs the ray package (pip install 'coe[ray]')"
TIMELINE = 1000  # groups kept in RayExecutor.timeline (a server runs for ever)


def _ray():
    try:
        import ray
    except ImportError:
        raise ConfigError(NEEDS_RAY) from None
    return ray


_first_line = first_line



# -- the driver side ------------------------------------------------------------------------
@dataclass
class GroupSpan:
    """Where and when one group ran (``RayExecutor.timeline``). Times are the actor's clock
    (``time.time()`` on its node); ``nodes`` has one entry per actor start, so a restart
    shows as a second node."""

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


@dataclass
class _Job:
    group: PlanGroup
    todo: list[int]
    call: str
    span: GroupSpan
    resources: dict
    actor: Any = None
    stream: Any = None
    placement_group: Any = None
    bar: Any = None


class RayExecutor(Executor):
    """``executor: {kind: ray, address: auto}``. Options: ``address`` (see ``ExecutorConfig``),
    ``runtime_env`` (Ray's, for every actor: ``env_vars``, ``py_modules``...), ``namespace``,
    ``max_restarts`` (1: a group survives one death of its actor), ``num_cpus``/``num_gpus``
    (only when starting a new local instance), ``check_resources`` (true: a group whose
    resources no node of the cluster has fails at once instead of waiting for an autoscaler),
    ``log_to_driver`` (false: the actors' own output stays in Ray's logs)."""

    placement = "ray"
    keeps_loaded = False  # each group's actor ends with the group

    def __init__(self, config: PoolConfig, cache: ResponseCache | None = None,
                 progress: bool = False, fail_fast: bool = False, keep_resident: bool = False,
                 address: str | None = None, runtime_env: dict | None = None,
                 namespace: str | None = None, max_restarts: int = 1,
                 num_cpus: int | None = None, num_gpus: int | None = None,
                 check_resources: bool = True, log_to_driver: bool = False,
                 max_resident: int | None = None, memory_gb: float | None = None):
        """``max_resident``/``memory_gb``/``keep_resident`` go to the residency policy; until
        actors are kept between calls it holds nothing here (each group's actor ends with the
        group), and Ray's resources decide what runs at once."""
        super().__init__(config, cache, progress, fail_fast, keep_resident,
                         max_resident=max_resident, memory_gb=memory_gb)
        if importlib.util.find_spec("ray") is None:  # at once, not at the first generation
            raise ConfigError(NEEDS_RAY)
        if max_restarts < 0:
            raise ValueError("max_restarts must be 0 or more")
        self.address = address
        self.runtime_env = runtime_env
        self.namespace = namespace
        self.max_restarts = max_restarts
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.check_resources = check_resources
        self.log_to_driver = log_to_driver
        self.timeline: deque[GroupSpan] = deque(maxlen=TIMELINE)  # the latest groups
        self._lock = threading.Lock()
        self._started_ray = False
        self._ledger = None

    @classmethod
    def from_config(cls, config: PoolConfig, **kwargs) -> "RayExecutor":
        if config.executor.address is not None:
            kwargs.setdefault("address", config.executor.address)
        return super().from_config(config, **kwargs)

    # -- the cluster ----------------------------------------------------------------------
    def connect(self):
        """Join the cluster (once): ``address``, else ``RAY_ADDRESS``, else a running local
        one, else a new local instance (shut down again by ``close``)."""
        ray = _ray()
        with self._lock:
            if not ray.is_initialized():
                kw: dict[str, Any] = dict(address=None if self.address == "local" else self.address,
                                          namespace=self.namespace, logging_level=logging.ERROR,
                                          log_to_driver=self.log_to_driver)
                if self.num_cpus is not None:
                    kw["num_cpus"] = self.num_cpus
                if self.num_gpus is not None:
                    kw["num_gpus"] = self.num_gpus
                if self.address in (None, "local"):
                    kw["include_dashboard"] = False
                try:
                    ray.init(**kw)
                except (ConnectionError, RuntimeError, ValueError) as e:
                    where = f"at {self.address!r}" if self.address else "(RAY_ADDRESS or local)"
                    raise ConfigError(f"ray executor: cannot join or start Ray {where}: "
                                      f"{_first_line(e)} (start one with `ray start --head`)"
                                      ) from None
                self._started_ray = True
            if self._ledger is None:
                self._ledger = ray.remote(Ledger).options(num_cpus=0).remote()
        return ray

    def _options(self, ray, res: Resources, gang: int) -> tuple[dict, Any]:
        """The actor's options and its placement group (None unless ``gang > 1``)."""
        cpus = res.num_cpus or 0
        gpus = res.num_gpus or 0
        opts: dict[str, Any] = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=self.max_restarts,
                                    max_task_retries=self.max_restarts)
        if res.memory_gb:
            opts["memory"] = int(res.memory_gb * GB)
        if res.custom:
            opts["resources"] = dict(res.custom)
        if self.runtime_env:
            opts["runtime_env"] = self.runtime_env
        if gang <= 1:
            return opts, None
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundles = []
        for rank in range(gang):
            b = {"GPU": gpus / gang} if gpus else {}
            if rank == 0 and cpus:
                b["CPU"] = cpus
            bundles.append(b or {"CPU": 0.01})
        pg = placement_group(bundles, strategy="STRICT_PACK")  # one node: tensor parallelism
        # the actor drives the ranks, which vLLM starts as Ray workers in the group's bundles
        opts.update(num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
            pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
        return opts, pg

    def _infeasible(self, ray, res: Resources) -> str | None:
        """Why no node of the cluster could ever run an actor needing ``res`` (None: one can)."""
        need = {"CPU": res.num_cpus or 0, "GPU": res.num_gpus or 0,
                "memory": (res.memory_gb or 0) * GB, **res.custom}
        need = {k: v for k, v in need.items() if v}
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        if not need or any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
            return None

        def show(d: dict) -> str:
            return ", ".join(f"{k} {v / GB:.1f} GiB" if k == "memory" else f"{k} {v:g}"
                             for k, v in d.items())
        best = max(nodes, key=lambda n: sum(n.get(k, 0) >= v for k, v in need.items()),
                   default={})
        return (f"needs {show(need)} on one node, which no node of the Ray cluster has "
                f"(largest: {show({k: best.get(k, 0) for k in need})})")

    # -- running --------------------------------------------------------------------------
    def run(self, requests: list[GenRequest], plan: Plan | None = None,
            on_token: OnToken | None = None) -> Execution:
        plan, stats, results = self._begin(requests, plan)
        jobs: list[_Job] = []
        ok = False
        try:
            groups = [(g, [i for i in g.indices if results[i] is None]) for g in plan.groups]
            groups = [(g, todo) for g, todo in groups if todo]
            if groups:
                ray = self.connect()
                for position, (group, todo) in enumerate(groups):
                    jobs.append(self._submit(ray, plan, group, todo, on_token is not None,
                                             position))
                self._collect(ray, jobs, plan, results, stats, on_token)
            ok = True
        finally:
            self._finish(jobs, cancelled=not ok)
            self._record(stats)
        for i, j in plan.same_as.items():
            results[i] = results[j]
        return Execution(results, stats)  # type: ignore[arg-type]

    def _submit(self, ray, plan: Plan, group: PlanGroup, todo: list[int], stream_tokens: bool,
                position: int) -> _Job:
        backend = self._backends[group.key]
        res = backend.resources()
        span = GroupSpan(label=group.label, experts=list(group.experts), jobs=len(todo),
                         submitted=time.time())
        self.timeline.append(span)
        job = _Job(group, todo, call=uuid.uuid4().hex, span=span,
                   resources=res.model_dump(exclude_defaults=True))
        if self.progress:
            job.bar = tqdm(total=len(todo), desc=f"{group.label[:30]} (waiting)", unit="gen",
                           position=position, leave=False)
        if self.check_resources and (why := self._infeasible(ray, res)):
            span.error = why
            return job
        opts, job.placement_group = self._options(ray, res, backend.gang_size())
        job.actor = ray.remote(GroupWorker).options(
            name=f"coe:{group.experts[0]}:{job.call[:8]}", **opts,
        ).remote(self.config.expert(group.experts[0]),
                 self.config.base_dir.resolve())  # a worker's working directory differs
        job.stream = job.actor.run.options(num_returns="streaming").remote(
            job.call, [plan.requests[i] for i in todo], self._ledger, stream_tokens)
        return job

    def _collect(self, ray, jobs: list[_Job], plan: Plan, results: list, stats: RunStats,
                 on_token: OnToken | None) -> None:
        for job in jobs:
            if job.stream is None:  # refused before it started
                self._fail(job, job.span.error, results, stats)
        live = {id(job.stream): job for job in jobs if job.stream is not None}
        while live:
            # a bounded wait, so Ctrl-C is seen between waits
            ready, _ = ray.wait([j.stream for j in live.values()], num_returns=1, timeout=0.5)
            for stream in ready:
                job = live[id(stream)]
                try:
                    item = ray.get(next(stream))
                except StopIteration:
                    del live[id(stream)]
                    self._end(ray, job)  # its resources go to the next waiting group
                    continue
                except ray.exceptions.RayError as e:  # its actor died more than it may restart
                    del live[id(stream)]
                    self._end(ray, job)
                    done = sum(1 for i in job.todo if results[i] is not None)
                    where = job.span.nodes[-1]["node"] if job.span.nodes else "unknown node"
                    deaths = "died" if not job.span.restarts else \
                        f"died again after {job.span.restarts} restart(s)"
                    self._fail(job, f"actor {deaths} on node {where} after "
                                    f"{done}/{len(job.todo)} generations: {_first_line(e)}",
                               results, stats)
                    continue
                self._take(job, item, plan, results, stats, on_token)

    def _take(self, job: _Job, item: tuple, plan: Plan, results: list, stats: RunStats,
              on_token: OnToken | None) -> None:
        kind, span = item[0], job.span
        if kind == "start":
            if span.nodes:
                span.restarts += 1
                if job.bar is not None:
                    job.bar.write(f"{job.group.label}: actor restarted on node "
                                  f"{item[1]['node']} ({item[1]['host']})")
            span.nodes.append(item[1])
            span.started = span.started or item[2]
            if job.bar is not None:
                job.bar.set_description(f"{job.group.label[:30]} @{item[1]['host'][:16]}")
        elif kind == "loaded":
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
            self._fail(job, item[1], results, stats)

    def _fail(self, job: _Job, msg: str, results: list, stats: RunStats) -> None:
        from coe.core.secrets import redact

        msg = job.span.error = redact(msg)  # the actor's exception text may carry a credential
        job.span.finished = job.span.finished or time.time()
        for i in job.todo:
            if results[i] is None:
                results[i] = Generation(error=msg)
                stats.failed_generations += 1
        for name in job.group.experts:
            stats.failures.setdefault(name, msg)
        if self.fail_fast:
            raise ExpertError(job.group.experts[0], msg)

    def _end(self, ray, job: _Job) -> None:
        """Kill the group's actor and free its placement group (once)."""
        if job.bar is not None:
            job.bar.close()
            job.bar = None
        if job.actor is not None:
            try:
                ray.kill(job.actor, no_restart=True)
            except Exception:  # already gone
                pass
            job.actor = None
        if job.placement_group is not None:
            try:
                ray.util.remove_placement_group(job.placement_group)
            except Exception:
                pass
            job.placement_group = None
        if self._ledger is not None:
            self._ledger.forget.remote(job.call)

    def _finish(self, jobs: list[_Job], cancelled: bool) -> None:
        """End every group still running: all of them after an exception (Ctrl-C)."""
        if jobs:
            ray = _ray()
            for job in jobs:
                self._end(ray, job)

    def release(self) -> None:
        """Nothing stays loaded between calls: each group's actor ends with the group."""

    def close(self) -> None:
        if self._ledger is not None:
            try:
                _ray().kill(self._ledger, no_restart=True)
            except Exception:
                pass
            self._ledger = None
        if self._started_ray:
            _ray().shutdown()
            self._started_ray = False
