"""The worker side of the Ray executor (``coe.execution.ray``): the actor that holds one
model and runs its plan groups (``GroupWorker``), and the ledger of what each running call has
yielded (``Ledger``), which makes a restarted actor's rerun generate only what is left."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
from pathlib import Path

from coe.backends import create_backend
from coe.core.config import ExpertConfig
from coe.core.errors import CoeError
from coe.core.types import GenRequest

CHUNK = 512  # generations per streamed item at most (a replay finishes thousands at once)
_END = object()


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}".rstrip(": ")


class Ledger:
    """What each running group's actor has yielded so far (a Ray actor; see the module doc)."""

    def __init__(self) -> None:
        self._items: dict[str, list] = {}

    def record(self, call: str, item: tuple) -> None:
        self._items.setdefault(call, []).append(item)

    def items(self, call: str) -> list:
        return list(self._items.get(call, ()))

    def forget(self, call: str) -> None:
        self._items.pop(call, None)


class GroupWorker:
    """The actor of one model (one set of weights): ``load`` once, then ``run`` any number of
    plan groups, one at a time, until the executor kills it (the model is unloaded or the
    executor closes). A process that dies is restarted by Ray without its model: the next
    ``run`` loads it again.

    ``load`` returns ``("ok", where, seconds, t)`` or ``("fail", message, where)``. ``run`` yields
    ``("start", where, t)``, ``("loaded", seconds, t)`` when it had to load the model (after a
    restart), then ``("out", results, tokens)`` items (``results``: ``(j, Generation)``,
    ``tokens``: ``(j, text)``, ``j`` indexing the requests given), and finally ``("end", t)``
    or ``("fail", message)``.
    """

    def __init__(self, config: ExpertConfig, base_dir: Path) -> None:
        self.backend = create_backend(config, base_dir)
        self.loaded = False

    @staticmethod
    def where() -> dict:
        import ray

        return {"node": ray.util.get_node_ip_address(), "host": socket.gethostname(),
                "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}

    def _load(self) -> float:
        t0 = time.perf_counter()
        self.backend.load()
        self.loaded = True
        return time.perf_counter() - t0

    @staticmethod
    def _load_failed(where: dict, e: Exception) -> str:
        return (f"load failed on node {where['node']} ({where['host']}): "
                f"{e if isinstance(e, CoeError) else first_line(e)}")

    def load(self) -> tuple:
        where = self.where()
        try:
            seconds = self._load()
            return "ok", where, seconds, time.time()
        except Exception as e:
            return "fail", self._load_failed(where, e), where

    def run(self, call: str, requests: list[GenRequest], ledger, stream_tokens: bool):
        import ray

        def emit(item: tuple) -> tuple:
            ray.get(ledger.record.remote(call, item))  # before it is sent: see the module doc
            return item

        done: set[int] = set()
        for item in ray.get(ledger.items.remote(call)):  # a rerun: what was yielded before
            if item[0] == "out":
                done.update(j for j, _ in item[1])
            yield item
        where = self.where()
        yield emit(("start", where, time.time()))
        try:
            if not self.loaded:  # a restarted process: load the model again
                yield emit(("loaded", self._load(), time.time()))
        except Exception as e:
            yield emit(("fail", self._load_failed(where, e)))
            return
        todo = [j for j in range(len(requests)) if j not in done]
        pending: queue.Queue = queue.Queue()
        crash: list[BaseException] = []

        def work() -> None:
            try:
                batch = [requests[j] for j in todo]
                on_result = lambda k, gen: pending.put(("r", todo[k], gen))  # noqa: E731
                if stream_tokens and self.backend.can.stream:
                    self.backend.generate(batch, on_result,
                                          on_token=lambda k, piece: pending.put(("t", todo[k], piece)))
                else:
                    self.backend.generate(batch, on_result)
            except BaseException as e:  # the model broke: what finished is already queued
                crash.append(e)
            finally:
                pending.put(_END)

        threading.Thread(target=work, name="coe-generate", daemon=True).start()
        finished = len(done)
        ended = False
        while not ended:
            entries = [pending.get()]
            while len(entries) < CHUNK:
                try:
                    entries.append(pending.get_nowait())
                except queue.Empty:
                    break
            ended = entries[-1] is _END
            results = [(j, gen) for kind, j, gen in (e for e in entries if e is not _END)
                       if kind == "r"]
            tokens = [(j, piece) for kind, j, piece in (e for e in entries if e is not _END)
                      if kind == "t"]
            finished += len(results)
            if results or tokens:
                yield emit(("out", results, tokens))
        if crash:
            self.loaded = False  # a broken model is not reused
            yield emit(("fail", f"crashed on node {where['node']} ({where['host']}) after "
                                f"{finished}/{len(requests)} generations: "
                                f"{first_line(crash[0])}"))
            return
        yield emit(("end", time.time()))

    def unload(self) -> None:
        if self.loaded:
            self.backend.unload()
            self.loaded = False
