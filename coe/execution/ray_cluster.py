"""The Ray executor's view of the cluster (``coe.execution.ray``): joining or starting it, what
an actor reserves, and whether a set of actors fits on its nodes.

**Joining or starting.** ``address`` names a cluster to join (``auto``: the one ``ray start``
began on this machine; ``ray://host:10001``; an IP and port). Unset: ``$RAY_ADDRESS``, else a
running ``ray start`` cluster on this machine, else a new local instance, shut down by the
executor's ``close``. ``local``: always a new local instance.

A local instance that coe starts itself is **private**: every process of it (GCS, raylet,
workers, agents) binds 127.0.0.1 only, and the dashboard is not started unless asked
(``dashboard: true``, then on 127.0.0.1 too). Ray 2.x binds its listeners to the node's IP and
has no public option to make that the loopback address on Linux: its single-machine mode
(``ENABLE_RAY_CLUSTER`` off, what it does on Windows and macOS) does exactly that, so coe turns
it on for the one ``ray.init`` that starts the instance (and for one that joins an instance at a
loopback address, which Ray would otherwise look for at the node's external IP). A cluster
that coe joins is left as it was configured (see the README's security note).

Ray's driver installs a C++ failure-signal handler that takes SIGTERM from Python's own
handler, prints a stack dump and aborts the process once Ray shuts down (exit 134): coe turns
it off in its own process, and keeps its own Python SIGTERM handler across ``ray.init``, so
SIGTERM stops ``coe serve`` and ``coe run`` as it does with the local executor.

**Fitting.** A model's actor reserves its resources (``Backend.resources``) and, unless the
yaml reserves memory itself, its ``memory_bytes`` as Ray's ``memory`` resource, for as long as
the model stays loaded. ``fits`` packs the reservations of a set of actors (those already
placed on the node they run on, the others first-fit, largest first) into the nodes' totals:
the residency policy asks it before loading a model, so a model that does not fit beside the
loaded ones unloads the least recently used idle ones first instead of waiting for ever.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from coe.core.config import GB, Resources
from coe.core.errors import ConfigError
from coe.execution.ray_worker import first_line

NODES_TTL = 2.0  # seconds the nodes' totals are reused between fits checks


def disable_failure_signal_handler(ray) -> None:
    """No C++ failure-signal handler in this (driver) process: see the module doc."""
    ray._private.ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


@contextmanager
def _loopback(ray):
    """Ray's single-machine mode for one ``ray.init``: the node's IP is 127.0.0.1."""
    constants = ray._private.ray_constants
    before = constants.ENABLE_RAY_CLUSTER
    constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = before


def start_private(ray, *, dashboard: bool = False, **kwargs) -> None:
    """Start a new local Ray instance bound to 127.0.0.1 (``kwargs`` go to ``ray.init``)."""
    disable_failure_signal_handler(ray)
    with _loopback(ray):
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1",
                 **kwargs)


def _on_loopback(address: str) -> bool:
    """Whether a cluster address (``host:port``, ``ray://host:port``) names this machine's
    loopback interface: a private instance, which Ray would otherwise look for at the node's
    external IP."""
    host = urlsplit(address if "://" in address else f"//{address}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _join(ray, address: str | None, **kwargs) -> None:
    target = address or os.environ.get("RAY_ADDRESS", "")
    if _on_loopback(target):
        with _loopback(ray):
            ray.init(address=address, **kwargs)
    else:
        ray.init(address=address, **kwargs)


@contextmanager
def _own_sigterm():
    """``ray.init`` in the main thread replaces the SIGTERM handler with one exiting at once:
    keep coe's (``coe run`` stops as on Ctrl-C: what finished is kept)."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def join_or_start(ray, address: str | None, *, namespace: str | None, log_to_driver: bool,
                  num_cpus: int | None, num_gpus: int | None, dashboard: bool) -> bool:
    """Connect this process to Ray (see the module doc); True when it started the instance."""
    with _own_sigterm():
        return _join_or_start(ray, address, namespace=namespace, log_to_driver=log_to_driver,
                              num_cpus=num_cpus, num_gpus=num_gpus, dashboard=dashboard)


def _join_or_start(ray, address: str | None, *, namespace: str | None, log_to_driver: bool,
                   num_cpus: int | None, num_gpus: int | None, dashboard: bool) -> bool:
    common: dict[str, Any] = dict(namespace=namespace, logging_level=logging.ERROR,
                                  log_to_driver=log_to_driver)
    disable_failure_signal_handler(ray)
    try:
        if address not in (None, "local"):
            _join(ray, address, **common)
            return False
        if address is None:
            if os.environ.get("RAY_ADDRESS"):
                _join(ray, None, **common)
                return False
            # the cluster `ray start` began on this machine (Ray's own record of it), if any;
            # not address="auto", which also joins any other Ray instance running here
            started_here = ray._private.services.find_bootstrap_address(None)
            if started_here:
                _join(ray, started_here, **common)
                return False
        sizes = {k: v for k, v in (("num_cpus", num_cpus), ("num_gpus", num_gpus))
                 if v is not None}
        start_private(ray, dashboard=dashboard, **sizes, **common)
        return True
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"at {address!r}" if address else "(RAY_ADDRESS or local)"
        raise ConfigError(f"ray executor: cannot join or start Ray {where}: {first_line(e)} "
                          "(start one with `ray start --head`)") from None


# -- what an actor reserves -------------------------------------------------------------------
def demand(res: Resources, memory_bytes: int) -> dict[str, float]:
    """The resources one actor holds on its node: CPUs, GPUs, memory (bytes: the yaml's
    ``memory_gb``, else the model's ``memory_bytes``) and custom ones; zeros left out."""
    need = {"CPU": res.num_cpus or 0, "GPU": res.num_gpus or 0,
            "memory": int(res.memory_gb * GB) if res.memory_gb else memory_bytes,
            **res.custom}
    return {k: v for k, v in need.items() if v}


def actor_options(ray, res: Resources, gang: int, memory: int, runtime_env: dict | None
                  ) -> tuple[dict, Any]:
    """The actor's options and its placement group (None unless ``gang > 1``)."""
    cpus = res.num_cpus or 0
    gpus = res.num_gpus or 0
    opts: dict[str, Any] = dict(num_cpus=cpus, num_gpus=gpus)
    if memory:
        opts["memory"] = memory
    if res.custom:
        opts["resources"] = dict(res.custom)
    if runtime_env:
        opts["runtime_env"] = runtime_env
    if gang <= 1:
        return opts, None
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = []
    for rank in range(gang):
        b: dict[str, float] = {"GPU": gpus / gang} if gpus else {}
        if rank == 0:
            b.update({"CPU": cpus} if cpus else {})
            b.update({"memory": memory} if memory else {})
            b.update(res.custom)
        bundles.append(b or {"CPU": 0.01})
    pg = placement_group(bundles, strategy="STRICT_PACK")  # one node: tensor parallelism
    # the actor drives the ranks, which vLLM starts as Ray workers in the group's bundles
    opts.update(num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
        pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True))
    return opts, pg


def _show(d: dict) -> str:
    return ", ".join(f"{k} {v / GB:.1f} GiB" if k == "memory" else f"{k} {v:g}"
                     for k, v in d.items())


class Nodes:
    """The alive nodes' resource totals (refreshed every ``NODES_TTL`` seconds)."""

    def __init__(self, ray) -> None:
        self.ray = ray
        self._lock = threading.Lock()
        self._totals: dict[str, dict] = {}
        self._at = float("-inf")

    def totals(self) -> dict[str, dict]:
        with self._lock:
            if time.monotonic() - self._at > NODES_TTL:
                self._totals = {n["NodeID"]: dict(n["Resources"]) for n in self.ray.nodes()
                                if n.get("Alive")}
                self._at = time.monotonic()
            return self._totals

    def fits(self, actors: list[tuple[str | None, dict]]) -> bool:
        """Whether ``actors`` ((node id or None: not placed yet, demand)) fit on the nodes."""
        free = {n: dict(t) for n, t in self.totals().items()}
        unplaced = []
        for node, need in actors:
            if node in free:
                for k, v in need.items():
                    free[node][k] = free[node].get(k, 0) - v
            else:
                unplaced.append(need)
        for need in sorted(unplaced, key=lambda d: (d.get("GPU", 0), d.get("memory", 0),
                                                    d.get("CPU", 0)), reverse=True):
            node = next((n for n, f in free.items()
                         if all(f.get(k, 0) >= v - 1e-9 for k, v in need.items())), None)
            if node is None:
                return False
            for k, v in need.items():
                free[node][k] = free[node].get(k, 0) - v
        return True

    def infeasible(self, need: dict, shown: dict) -> str | None:
        """Why no node could ever run an actor needing ``need`` (None: one can). ``shown``:
        what the message lists (the yaml's and the backend's resources, and memory when it
        is what no node has)."""
        nodes = list(self.totals().values())
        if not need or any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
            return None
        if "memory" in need and not any(n.get("memory", 0) >= need["memory"] for n in nodes):
            shown = {**shown, "memory": need["memory"]}
        best = max(nodes, key=lambda n: sum(n.get(k, 0) >= v for k, v in shown.items()),
                   default={})
        return (f"needs {_show(shown)} on one node, which no node of the Ray cluster has "
                f"(largest: {_show({k: best.get(k, 0) for k in shown})})")
