"""Micro-batching: requests that arrive close together are answered as one batch.

A request becomes a ``Job`` in a bounded queue (full: ``QueueFull``, the app answers 429).
One loop takes the first waiting job, then every job that arrives within ``window`` seconds
(up to ``max_batch``), and answers them together in a worker thread: each composition routes
its own questions (a request that asks tools of a composition is then delegated to one recruit,
and one that asks what no recruit can honour fails with ``Refused``: ``honour``), then every
expert generation of the batch goes into one executor plan (each
model is loaded at most once per batch, a backend gets all of the batch's prompts for it in
one call), then every aggregator generation into one more call: ``coe.pipeline.flow.answer``.
Up to ``parallel`` batches run at once (the executor's ``parallel_runs``: 1 on the local
executor, whose models share one process's cores; 2 on Ray, where each model has a process of
its own, so a batch needing other models than the running one starts at once); the models stay
resident between them (the executor's ``keep_resident``), and the requests that arrive while
the batches run form the next one.

A job whose client went away (or whose time ran out) before its batch started is dropped from
the batch; once started it runs to the end (its generations are cached either way).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from coe.apps.serve.compositions import Composition
from coe.apps.serve.honour import Refused, settle
from coe.core.config import PoolConfig
from coe.core.types import Question, QuestionResult
from coe.execution import Executor, RunStats
from coe.pipeline import flow
from coe.pipeline.route import route

log = logging.getLogger("coe.serve")


class QueueFull(Exception):
    """The queue holds ``max_queue`` jobs; ``retry_after`` is a hint in seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"queue full, retry after {retry_after}s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """The job was dropped before its batch started."""


@dataclass(eq=False)
class Job:
    """One HTTP request's rows: its requests (a completion's prompts), each ``n`` times (its
    samples). The future gives the list of their results, request by request and sample by
    sample, or the one result of a request with one row (``single``)."""

    composition: Composition
    questions: list[Question]
    future: asyncio.Future
    tokens: asyncio.Queue | None = None  # streamed (row, piece) of the answer
    samples: list[int] = field(default_factory=list)
    single: bool = True
    cancelled: bool = False
    started: bool = False
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def question(self) -> Question:
        return self.questions[0]

    def cancel(self) -> None:
        """Drop the job if its batch has not started (a client that went away)."""
        self.cancelled = True


@dataclass
class BatchReport:
    size: int
    seconds: float
    stats: RunStats
    distinct_weights: int
    failures: Counter


class Batcher:
    """Call ``start`` and ``stop`` in the server's event loop, ``submit`` from its handlers."""

    def __init__(self, executor: Executor, config: PoolConfig, window: float = 0.02,
                 max_batch: int = 64, max_queue: int = 256,
                 on_batch: Callable[[BatchReport], None] | None = None, parallel: int = 1):
        if max_batch < 1 or max_queue < 1 or parallel < 1:
            raise ValueError("max_batch, max_queue and parallel must be at least 1")
        self.executor = executor
        self.config = config
        self.window = window
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.parallel = parallel  # batches running at once (the executor's parallel_runs)
        self._running: set[asyncio.Task] = set()
        self._queue: asyncio.Queue[Job] | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_batch_seconds = 1.0

    # -- lifecycle (in the server's event loop) ------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.max_queue)
        self._task = asyncio.create_task(self._run_forever(), name="coe-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop (the server stopped accepting before this)."""
        if self._task is None:
            return
        await self._queue.join()
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    def submit(self, composition: Composition, question: Question | list[Question],
               stream: bool = False, n: int = 1) -> Job:
        """Queue ``question`` (or several: a completion's prompts), each asked for ``n``
        independent answers (``GenRequest.sample``)."""
        qs = question if isinstance(question, list) else [question]
        rows = [q for q in qs for _ in range(n)]
        job = Job(composition, rows, self._loop.create_future(),
                  asyncio.Queue() if stream else None, samples=list(range(n)) * len(qs),
                  single=not isinstance(question, list) and n == 1)
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull(max(1, round(self._last_batch_seconds))) from None
        return job

    # -- the loop ------------------------------------------------------------------------
    async def _next_batch(self) -> list[Job]:
        batch = [await self._queue.get()]
        deadline = self._loop.time() + self.window
        while len(batch) < self.max_batch:
            if not self._queue.empty():  # already waiting: no need to wait for it
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - self._loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run_forever(self) -> None:
        """Form a batch whenever fewer than ``parallel`` are running, and run it."""
        slots = asyncio.Semaphore(self.parallel)
        while True:
            await slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                slots.release()
                raise
            task = asyncio.create_task(self._run_batch(batch), name="coe-batch")
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(lambda _: slots.release())

    async def _run_batch(self, batch: list[Job]) -> None:
        try:
            live = []
            for job in batch:
                if job.cancelled or job.future.done():
                    self._resolve(job, error=Cancelled())
                else:
                    job.started = True
                    live.append(job)
            if live:
                await asyncio.to_thread(self._answer, live)
        except Exception as e:  # never let one batch stop the service
            log.exception("batch failed")
            for job in batch:
                self._resolve(job, error=e)
        finally:
            for _ in batch:
                self._queue.task_done()

    # -- one batch (in a worker thread) --------------------------------------------------
    def _resolve(self, job: Job, result: list[QuestionResult] | None = None,
                 error: BaseException | None = None) -> None:
        def set_it() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result[0] if job.single else result)

        if self._loop is None:
            return
        try:
            if asyncio.get_running_loop() is self._loop:
                set_it()
                return
        except RuntimeError:
            pass
        self._loop.call_soon_threadsafe(set_it)

    def _route(self, comp: Composition, rows: list[tuple[Job, int]],
               names: list[str]) -> list[tuple[flow.Part, list[tuple[Job, int]]]]:
        """One composition's rows routed, and split into the parts they are answered in: as
        routed, and (tools) delegated to one recruit each (``honour.settle``). A job one of
        whose rows cannot be honoured fails (``Refused``)."""
        questions = [job.questions[r] for job, r in rows]
        routes, _ = route(comp.flow.router, questions, names, blocks=False,
                          unknown=self.config.expert)
        if comp.delegated is None:  # a pass-through: checked before it was queued
            return [(flow.Part(comp.flow, questions, routes, [j.samples[r] for j, r in rows]),
                     rows)]
        keep, moved, failed = [], [], set()
        for k, (row, r) in enumerate(zip(rows, routes[:])):
            if row[0] in failed:
                continue
            try:
                other = settle(questions[k], r, self.config, self.executor.capabilities)
            except Refused as e:
                failed.add(row[0])
                self._resolve(row[0], error=e)
                continue
            (keep if other is None else moved).append((k, other))
        out = []
        for flow_, chosen, given in ((comp.flow, keep, None), (comp.delegated, moved, True)):
            chosen = [(k, r) for k, r in chosen if rows[k][0] not in failed]
            if chosen:
                idx = [k for k, _ in chosen]
                out.append((flow.Part(flow_, [questions[k] for k in idx],
                                      [r for _, r in chosen] if given else routes.take(idx),
                                      [rows[k][0].samples[rows[k][1]] for k in idx]),
                            [rows[k] for k in idx]))
        return out

    def _answer(self, jobs: list[Job]) -> None:
        t0 = time.perf_counter()
        by_comp: dict[str, list[Job]] = {}
        for job in jobs:
            by_comp.setdefault(job.composition.name, []).append(job)
        parts: list[flow.Part] = []
        owners: list[list[tuple[Job, int]]] = []  # per part, per row: (job, its row)
        names = [e.name for e in self.config.experts]
        with self.executor.session() as stats:
            for name, group in by_comp.items():
                rows = [(job, r) for job in group for r in range(len(job.questions))]
                try:  # a router that fails fails its composition's requests, not the batch
                    for part, mine in self._route(group[0].composition, rows, names):
                        parts.append(part)
                        owners.append(mine)
                except Exception as e:
                    log.warning("routing for %s failed: %s: %s", name, type(e).__name__, e)
                    for job in group:
                        self._resolve(job, error=e)
            if not parts:
                return
            weights: set = set()

            def on_plan(plan) -> None:
                weights.update(g.key for g in plan.groups)

            def on_token(part: int, index: int, piece: str) -> None:
                job, row = owners[part][index]
                if job.tokens is not None:
                    self._loop.call_soon_threadsafe(job.tokens.put_nowait, (row, piece))

            try:
                streams = any(job.tokens is not None for job in jobs)  # else: no pieces
                results = flow.answer(self.executor, self.config, parts, on_plan=on_plan,
                                      on_token=on_token if streams else None).results
            except Exception as e:
                log.warning("batch of %d failed: %s: %s", len(jobs), type(e).__name__, e)
                for job in jobs:
                    self._resolve(job, error=e)
                return
        failures: Counter = Counter()
        answered: dict[Job, dict[int, QuestionResult]] = {}
        for mine, got in zip(owners, results):
            for (job, row), result in zip(mine, got):
                failures.update(r.expert for r in result.responses if r.error)
                answered.setdefault(job, {})[row] = result
        for job, by_row in answered.items():
            self._resolve(job, [by_row[r] for r in range(len(job.questions))])
        seconds = time.perf_counter() - t0
        self._last_batch_seconds = seconds
        if self.on_batch is not None:
            self.on_batch(BatchReport(len(jobs), seconds, stats, len(weights), failures))
