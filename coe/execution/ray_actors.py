"""The Ray executor's model actors (``coe.execution.ray``): starting and killing them as the
residency policy loads and unloads models, and choosing the actor (replica) a group runs on.

A model is known to the residency policy once per *replica*, as ``(load key, r)``. Loading
replica ``r`` starts an actor that reserves the model's resources (``ray_cluster.demand``) and
has it load the model; unloading kills the actor (and removes its placement group), so what
the model held goes with its process. Ray restarts a process that dies, for ever (its next
call loads the model again); a call is retried ``max_restarts`` times.

**Replicas.** A group runs on the model's loaded actor that no other group is using. When
every loaded actor of the model is busy (with another run: a server's other batch, another
thread's run), the group gets a new replica only if one more fits *as things are*: within
``max_resident``, ``memory_gb`` and the nodes' resources, without unloading any model (an idle
model is never evicted to make a replica), and at most ``max_replicas`` per model. Otherwise
it waits for a busy actor of its model. So a hot model gets a second replica exactly when
spare room lets two groups of it run at once; idle replicas are unloaded, least recently used
first, like any model, when room is needed.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from coe.core.config import PoolConfig
from coe.core.errors import CoeError
from coe.execution.ray_cluster import Nodes, actor_options, demand
from coe.execution.ray_worker import GroupWorker, first_line
from coe.execution.residency import Residency, Slot

WAIT = 0.5  # seconds between checks for an interrupted run (no outcome depends on it)


class Stopped(Exception):
    """The run was interrupted while this group waited or ran."""


class LoadFailed(CoeError):
    """A model's actor could not load it (the message names the node: ``where``)."""

    def __init__(self, message: str, where: dict | None = None):
        super().__init__(message)
        self.where = where


@dataclass
class Worker:
    actor: Any
    placement_group: Any
    where: dict
    load_seconds: float = 0.0  # its model's load, as the actor measured it
    loaded_at: float = 0.0  # when it ended (the node's clock)


class ModelActors:
    """The actors of one executor's models, keyed ``(load key, replica)``."""

    def __init__(self, ray_module: Callable, config: PoolConfig, backends: dict,
                 residency: Residency, *, runtime_env: dict | None, max_restarts: int,
                 max_replicas: int) -> None:
        self._ray = ray_module  # imports ray when called (coe.execution.ray._ray)
        self.config = config
        self.backends = backends  # load key -> Backend (the executor's)
        self.residency = residency
        self.runtime_env = runtime_env
        self.max_restarts = max_restarts
        self.max_replicas = max_replicas
        self.nodes: Nodes | None = None  # set once the executor has joined the cluster
        self.workers: dict[tuple, Worker] = {}  # loaded actors
        self._starting: dict[tuple, tuple] = {}  # (actor, placement group) while loading
        self._slots: dict[tuple, Slot] = {}
        self._demands: dict[tuple, dict] = {}  # load key -> what its actor reserves
        self._replicas: dict[tuple, list[tuple]] = {}  # load key -> its replicas' keys
        self._busy: set[tuple] = set()  # replicas a group is using
        self._cond = threading.Condition()
        residency.fits = self.fits

    # -- what the residency policy asks ----------------------------------------------------
    def demand(self, key: tuple) -> dict:
        if key not in self._demands:
            backend = self.backends[key]
            held = backend.memory_bytes() if backend.can.holds_weights else 0
            self._demands[key] = demand(backend.resources(), held)
        return self._demands[key]

    def fits(self, rks: list) -> bool:
        """Whether these replicas' actors fit on the nodes (placed ones where they run)."""
        if self.nodes is None:
            return True
        return self.nodes.fits([(w.where["node_id"] if (w := self.workers.get(rk)) else None,
                                 self.demand(rk[0])) for rk in rks])

    def slot(self, rk: tuple) -> Slot:
        """Replica ``rk``'s slot in the residency policy (made once)."""
        if rk not in self._slots:
            key, r = rk
            backend = self.backends[key]
            label = backend.label if r == 0 else f"{backend.label} (replica {r + 1})"
            self._slots[rk] = Slot(label, lambda: self._start(rk), lambda: self._stop(rk),
                                   backend.can.holds_weights, self.demand(key).get("memory", 0),
                                   where="starting")
            self.residency.add(rk, self._slots[rk])
        return self._slots[rk]

    # -- loading and unloading -------------------------------------------------------------
    def _start(self, rk: tuple) -> None:
        ray = self._ray()
        key = rk[0]
        backend = self.backends[key]
        cfg = next(e for e in self.config.experts if e.load_key() == key)
        opts, pg = actor_options(ray, backend.resources(), backend.gang_size(),
                                 self.demand(key).get("memory", 0), self.runtime_env)
        actor = ray.remote(GroupWorker).options(
            name=f"coe:{cfg.name}:{uuid.uuid4().hex[:8]}", max_restarts=-1,
            max_task_retries=self.max_restarts, **opts,
        ).remote(cfg, self.config.base_dir.resolve())  # a worker's working directory differs
        self._starting[rk] = (actor, pg)
        try:
            out = ray.get(actor.load.remote())
        except ray.exceptions.RayError as e:  # killed while loading (an interrupted run)
            out = ("fail", f"load failed: actor died: {first_line(e)}", None)
        finally:
            self._starting.pop(rk, None)
        if out[0] != "ok":
            self.kill(actor, pg)
            raise LoadFailed(out[1], out[2])
        self.workers[rk] = Worker(actor, pg, out[1], out[2], out[3])
        self.place(rk, out[1])

    def place(self, rk: tuple, where: dict) -> None:
        """Where replica ``rk``'s process runs (after a restart: its new process)."""
        slot = self._slots[rk]
        slot.where = f"{where['node']} ({where['host']}) pid {where['pid']}"
        slot.node, slot.pid = where["node"], where["pid"]
        if rk in self.workers:
            self.workers[rk].where = where

    def _stop(self, rk: tuple) -> None:
        worker = self.workers.pop(rk, None)
        if worker is not None:
            self.kill(worker.actor, worker.placement_group)
        self._slots[rk].where, self._slots[rk].pid = "unloaded", None

    def kill(self, actor, pg) -> None:
        ray = self._ray()
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            pass
        if pg is not None:
            try:
                ray.util.remove_placement_group(pg)
            except Exception:
                pass

    def kill_replica(self, rk: tuple) -> None:
        """Kill replica ``rk``'s actor at once (an interrupted run); its group unloads it."""
        worker = self.workers.get(rk)
        actor, pg = (worker.actor, None) if worker else self._starting.get(rk, (None, None))
        if actor is not None:
            self.kill(actor, pg)

    def close(self) -> None:
        """Kill the actors still loading (the policy unloads the loaded ones)."""
        for actor, pg in list(self._starting.values()):
            self.kill(actor, pg)
        self.nodes = None

    # -- which replica a group runs on (see the module doc) -----------------------------------
    def take(self, key: tuple, abort: threading.Event) -> tuple[tuple, list]:
        """A replica of model ``key`` for one group, marked busy, and the residency tickets
        taken while waiting for one (the caller serves them once it holds the model)."""
        tickets: list = []
        with self._cond:
            reps = self._replicas.setdefault(key, [])
            while True:
                if abort.is_set():
                    for t in tickets:
                        self.residency.served(t)
                    raise Stopped
                loaded = self.residency.loaded()
                free = [rk for rk in reps if rk not in self._busy]
                pick = next((rk for rk in free if rk in loaded), None)
                if pick is None and not any(rk in self._busy for rk in reps):
                    pick = reps[0] if reps else (key, 0)  # none in use: load the first
                if pick is None:  # every loaded one is busy: another if it fits as things are
                    spare = free[0] if free else (
                        (key, len(reps)) if len(reps) < self.max_replicas else None)
                    if spare is not None:
                        self.slot(spare)
                        if self.residency.room_for(spare):
                            pick = spare
                if pick is not None:
                    self.slot(pick)
                    if pick not in reps:
                        reps.append(pick)
                    self._busy.add(pick)
                    return pick, tickets
                if not tickets:  # not unloaded when it becomes idle: this group is next
                    tickets = [self.residency.queue(rk) for rk in reps]
                self._cond.wait(WAIT)

    def free(self, rk: tuple) -> None:
        with self._cond:
            self._busy.discard(rk)
            self._cond.notify_all()
