"""The residency policy: which models stay loaded, shared by every executor.

Executors decide *where* a model runs (this process, a Ray actor); this decides *whether* it may
be loaded now and what is unloaded to make room. A model is identified by its load key, and the
executor hands over, for each, how to ``load`` and ``unload`` it, whether it holds weights and
the bytes it holds (``Slot``).

The rules:

- a model holding weights is loaded only while fewer than ``max_resident`` such models are
  loaded (None: no cap) and, with a ``memory_gb`` budget, while their bytes plus its own fit in
  it; a model alone is always loaded, even one larger than the budget. An endpoint (holding
  nothing) is never limited;
- otherwise the least recently used *idle* models are unloaded first, if unloading the idle
  ones makes room; else the caller waits until a model becomes idle;
- an idle model another caller is queued for (``queue``) is not unloaded before that caller has
  used it, so concurrent runs that need the same models share their loads;
- a model that broke while in use is unloaded (``done_with(broken=True)``);
- ``fits`` (given by an executor that places models on machines of their own, Ray): whether a
  set of models can be loaded together at all (each node's CPUs, GPUs and memory); it bounds
  what is loaded as ``max_resident`` and ``memory_gb`` do, and ``room_for`` asks, without
  unloading anything, whether one more would fit now (how a busy model gets a replica);
- ``keep_resident``: whether models stay loaded when the last session ends (a server) or are
  released (a batch command).

Thread-safe: one condition variable guards everything. The policy never calls ``load`` while
holding it (a load takes seconds), so other callers keep being served meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Hashable

from coe.core.config import GB


@dataclass
class Slot:
    """What the policy needs of one model: how to load and unload it, whether it holds weights
    (else it is an endpoint: never limited) and the bytes it holds once loaded."""

    label: str
    load: Callable[[], None]
    unload: Callable[[], None]
    holds_weights: bool = True
    bytes: int = 0
    where: str = "this process"  # for /health: this process, or a Ray node, host and pid
    node: str = ""  # the node holding it ("": this machine), for /metrics
    pid: int | None = None  # the process holding it, when not this one


@dataclass(frozen=True)
class Resident:
    """One loaded model, as reported (least recently used first)."""

    label: str
    where: str
    bytes: int
    in_use: bool
    node: str = ""
    pid: int | None = None


class Residency:
    def __init__(self, max_resident: int | None = 1, memory_gb: float | None = None,
                 keep_resident: bool = False, fits: Callable[[list], bool] | None = None):
        if max_resident is not None and max_resident < 1:
            raise ValueError("max_resident must be at least 1")
        if memory_gb is not None and memory_gb <= 0:
            raise ValueError("memory_gb must be positive")
        self.max_resident = max_resident
        self.memory_gb = memory_gb
        self.keep_resident = keep_resident
        self.budget = None if memory_gb is None else int(memory_gb * GB)
        self.fits = fits
        self._slots: dict[Hashable, Slot] = {}
        self._cond = threading.Condition()
        self._resident: OrderedDict[Hashable, None] = OrderedDict()  # least recent first
        self._loading: set = set()
        self._in_use: set = set()
        self._waiting: Counter = Counter()  # callers queued for a model

    # -- the models ---------------------------------------------------------------------------
    def add(self, key: Hashable, slot: Slot) -> None:
        """Make model ``key`` known (once; later calls keep the first slot)."""
        with self._cond:
            self._slots.setdefault(key, slot)

    def loaded(self) -> set:
        """The keys of the loaded models."""
        with self._cond:
            return set(self._resident)

    def residents(self) -> list[Resident]:
        with self._cond:
            return [Resident(s.label, s.where, s.bytes, k in self._in_use, s.node, s.pid)
                    for k in self._resident for s in (self._slots[k],)]

    def resident_bytes(self) -> int:
        with self._cond:
            return sum(self._slots[k].bytes for k in self._resident
                       if self._slots[k].holds_weights)

    # -- queueing -------------------------------------------------------------------------------
    def queue(self, key: Hashable) -> list:
        """Count the caller as queued for ``key``; the returned ticket ends it (``served``)."""
        with self._cond:
            self._waiting[key] += 1
        return [key]

    def served(self, ticket: list) -> None:
        with self._cond:
            if ticket:
                self._waiting[ticket.pop()] -= 1
                self._cond.notify_all()

    # -- loading and unloading -------------------------------------------------------------------
    def _room(self, key: Hashable, evicted=()) -> bool:
        """Under the lock: whether ``key`` may be loaded beside the models holding weights that
        are loaded or loading, less ``evicted``."""
        held = [k for k in (*self._resident, *self._loading)
                if self._slots[k].holds_weights and k not in evicted]
        if not held:
            return True  # alone, it is loaded even if larger than the budget
        if self.max_resident is not None and len(held) >= self.max_resident:
            return False
        if (self.budget is not None
                and sum(self._slots[k].bytes for k in held) + self._slots[key].bytes
                > self.budget):
            return False
        return self.fits is None or self.fits([*held, key])

    def room_for(self, key: Hashable) -> bool:
        """Whether ``key`` (known, not loaded) could be loaded now without unloading anything."""
        with self._cond:
            return not self._slots[key].holds_weights or self._room(key)

    def acquire(self, key: Hashable) -> float | None:
        """Model ``key`` loaded and marked in use: None when it was loaded already, else the
        seconds its load took. A failed load raises (nothing is left marked)."""
        slot = self._slots[key]
        with self._cond:
            while True:
                if key in self._resident:
                    self._resident.move_to_end(key)
                    self._in_use.add(key)
                    return None
                if not slot.holds_weights or self._room(key):
                    break
                # evict the least recently used idle model if unloading the idle ones makes
                # room, but not one another caller is queued for: that caller is served first
                # (it needs nothing more), then this one evicts
                idle = [k for k in self._resident if self._slots[k].holds_weights
                        and k not in self._in_use and not self._waiting[k]]
                if idle and self._room(key, idle):
                    self._unload(idle[0])
                    continue
                self._cond.wait()
            self._loading.add(key)
        t0 = time.perf_counter()
        try:
            slot.load()
        except BaseException:
            with self._cond:
                self._loading.discard(key)
                self._cond.notify_all()
            raise
        with self._cond:
            self._loading.discard(key)
            self._resident[key] = None
            self._in_use.add(key)
        return time.perf_counter() - t0

    def done_with(self, key: Hashable, broken: bool = False) -> None:
        """The caller is done with model ``key``; a broken one is unloaded at once."""
        with self._cond:
            self._in_use.discard(key)
            if broken and key in self._resident:
                try:
                    self._unload(key)
                except Exception:
                    self._resident.pop(key, None)
            self._cond.notify_all()

    def _unload(self, key: Hashable) -> None:
        """Under the lock, for a model that is not in use."""
        self._resident.pop(key, None)
        self._slots[key].unload()

    def release(self) -> None:
        """Unload every model not in use."""
        with self._cond:
            for key in [k for k in self._resident if k not in self._in_use]:
                self._unload(key)
            self._cond.notify_all()

    def unload_all(self) -> None:
        """Unload everything (closing)."""
        with self._cond:
            for key in list(self._resident):
                self._unload(key)
            self._cond.notify_all()
