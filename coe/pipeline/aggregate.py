"""The aggregate stage: each job's final answers from its experts' responses.

A *job* is one aggregator over one route table's requests, reading their responses from a
question set's ``ResponseTable`` (a composition's share of a served batch; one strategy on the
test or the validation questions of an evaluation). Aggregators are driven the one way they
know: ``requests`` (the generations they need), every generating job's requests in **one**
executor call (each aggregator model loads once for all of them), then ``aggregate``.

Aggregators that generate nothing (``vote``, ``single``, ``learned``) see their requests in
blocks of ``BLOCK``: the ``ExpertResponse`` objects they take are built for a block, then
dropped, so 100,000 questions are aggregated holding a few megabytes of responses. Those that
generate (``llm``) take every request at once: their prompts hold the experts' texts.

The final answers go to ``sink(job index, first position, finals)`` block by block.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from coe.aggregation import Aggregator
from coe.core.types import ExpertResponse, FinalAnswer, Generation, GenRequest
from coe.pipeline.responses import ResponseTable
from coe.pipeline.routes import NONE, RouteTable

#: requests whose responses are built and aggregated at a time by the aggregators that need
#: no generation: a few megabytes of ``ExpertResponse`` objects, however many requests
BLOCK = 2048

#: ``sink(job, start, finals)``: the job's final answers of positions start.. in order
Sink = Callable[[int, int, list[FinalAnswer]], None]
#: ``on_token(job, position, piece)``: a piece of an aggregator's answer as it streams
JobToken = Callable[[int, int, str], None]


@dataclass
class Job:
    """One aggregator over ``routes``: rows ``rows`` of ``table`` (None: all, in order)."""

    aggregator: Aggregator
    routes: RouteTable
    table: ResponseTable
    rows: np.ndarray | None = None

    def row_of(self, start: int, stop: int) -> np.ndarray:
        return np.arange(start, stop) if self.rows is None else self.rows[start:stop]

    def questions(self, start: int, stop: int) -> list:
        qs = self.table.questions
        return [qs[i] for i in self.row_of(start, stop).tolist()]

    def responses(self, start: int, stop: int,
                  cells: dict[tuple[int, int], ExpertResponse] | None = None
                  ) -> list[list[ExpertResponse]]:
        """Each request's recruits' responses, in route order (built from the table, or from
        ``cells`` already built for these rows)."""
        rows = self.row_of(start, stop).tolist()
        if cells is None:
            cells = build_cells(self.table, rows)
        return [[cells[(i, j)] for j in recruits if j != NONE]
                for i, recruits in zip(rows, self.routes.experts[start:stop].tolist())]


def build_cells(table: ResponseTable, rows: list[int]) -> dict[tuple[int, int], ExpertResponse]:
    """The responses of ``rows``, by (row, expert), built once for every job that reads them."""
    sub = np.asarray(rows, np.intp)
    r, c = np.nonzero(table.has[sub])
    r = sub[r]
    return dict(zip(zip(r.tolist(), c.tolist()), table.responses(r, c)))


def expected_experts(jobs: list[Job]) -> Counter:
    """How many generations the jobs' aggregators will ask of each expert (known from the
    routes before any expert answers): the plan keeps the most used one loaded."""
    used: Counter = Counter()
    for job in jobs:
        if job.aggregator.generates:
            used += job.aggregator.experts(job.routes)
    return used


def aggregate(jobs: list[Job], sink: Sink,
              generate: Callable[[list[GenRequest], Callable | None], list[Generation]],
              on_token: JobToken | None = None, block: int | None = None) -> None:
    """Every job's final answers into ``sink``. ``generate(requests, on_token)`` makes the
    generating jobs' requests (the executor's run, one call)."""
    block = block or BLOCK
    generating = [k for k, job in enumerate(jobs) if job.aggregator.generates]
    if generating:
        _generating(jobs, generating, sink, generate, on_token)
    others = [k for k in range(len(jobs)) if k not in set(generating)]
    # jobs over the same rows of the same table share the responses built for a block
    by_rows: dict[tuple, list[int]] = {}
    for k in others:
        job = jobs[k]
        key = (id(job.table), None if job.rows is None else job.rows.tobytes(), len(job.routes))
        by_rows.setdefault(key, []).append(k)
    for ks in by_rows.values():
        n = len(jobs[ks[0]].routes)
        for start in range(0, n, block):
            stop = min(start + block, n)
            cells = build_cells(jobs[ks[0]].table, jobs[ks[0]].row_of(start, stop).tolist())
            for k in ks:
                job = jobs[k]
                finals = job.aggregator.aggregate(job.questions(start, stop),
                                                  job.routes[start:stop],
                                                  job.responses(start, stop, cells), None)
                sink(k, start, finals)


def _generating(jobs: list[Job], ks: list[int], sink: Sink, generate,
                on_token: JobToken | None) -> None:
    asked: dict[int, list[GenRequest]] = {}
    state: dict[int, tuple] = {}
    for k in ks:
        job = jobs[k]
        n = len(job.routes)
        qs, routes, resp = job.questions(0, n), job.routes[:], job.responses(0, n)
        state[k] = (qs, routes, resp)
        asked[k] = job.aggregator.requests(qs, routes, resp)
    flat = [r for k in ks for r in asked[k]]
    owner: list[tuple[int, int]] = []  # flat request -> (job, position)
    for k in ks:  # the n-th request about a question id is the n-th row with that id (a
        index: dict[str, list[int]] = {}  # request's several samples share one id)
        for i, q in enumerate(state[k][0]):
            index.setdefault(q.id, []).append(i)
        seen: dict[str, int] = {}
        for r in asked[k]:
            at = index.get(r.question_id, [])
            n = seen[r.question_id] = seen.get(r.question_id, -1) + 1
            owner.append((k, at[min(n, len(at) - 1)] if at else -1))
    stream = None
    if on_token is not None:
        def stream(i: int, piece: str) -> None:
            k, pos = owner[i]
            if pos >= 0:
                on_token(k, pos, piece)
    gens = iter(generate(flat, stream) if flat else [])
    for k in ks:
        qs, routes, resp = state[k]
        mine = [next(gens) for _ in asked[k]] or None
        sink(k, 0, jobs[k].aggregator.aggregate(qs, routes, resp, mine))
