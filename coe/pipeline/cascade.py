"""The cascade stage: routers that cascade (``Router.cascade``, ``coe.routing.cascade``) ask
their recruits in rounds.

Each round asks, for every request of every cascading job not yet confident, its next
recruit: one ``generate`` call per round for all jobs (one batch per model), only the cells no
earlier round or other job already made. A job's routes become the recruits actually asked;
the reason of each says how many of how many (``cascade: asked 2 of 4``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coe.pipeline.generate import Cells, Generator, Phase, PromptKind
from coe.pipeline.responses import ResponseTable
from coe.pipeline.routes import NONE, RouteTable
from coe.routing.cascade import Cascade


@dataclass
class CascadeJob:
    """A cascading router's full routes (every recruit it may ask, strongest first) over rows
    ``rows`` of ``table`` (None: all)."""

    cascade: Cascade
    routes: RouteTable
    table: ResponseTable
    rows: np.ndarray | None = None
    kind: PromptKind = "compose"
    samples: list[int] | None = None  # per row of ``table``: which of its n samples it is

    def row_index(self) -> np.ndarray:
        return np.arange(len(self.routes)) if self.rows is None else self.rows


def _asked(full: RouteTable, count: np.ndarray) -> RouteTable:
    slots = np.arange(full.experts.shape[1])[None, :]
    return RouteTable(full.ids, full.names, np.where(slots < count[:, None], full.experts, NONE),
                      full.weights, full.info, full.values)


def run_cascades(generator: Generator, jobs: list[CascadeJob], name: str = "cascade",
                 describe: bool = False) -> tuple[list[RouteTable], list[Phase]]:
    """Each job's rounds; returns each job's routes as asked (and the rounds' phases). With
    ``describe``, each route's reason ends with how many recruits it asked."""
    counts, lengths = [], []
    for job in jobs:
        length = (job.routes.experts != NONE).sum(axis=1)
        lengths.append(length)
        counts.append(np.minimum(length, 1))
    phases = []
    open_ = list(range(len(jobs)))
    while open_:
        parts = []
        for k in open_:
            job = jobs[k]
            rows = job.row_index()
            need = np.zeros(job.table.has.shape, bool)
            need[rows] = _asked(job.routes, counts[k]).mask() & ~job.table.has[rows]
            if need.any():
                parts.append(Cells(job.table, need, job.kind, samples=job.samples))
        if parts:
            phases.append(generator.generate(parts, name=name))
        still = []
        for k in open_:
            job, count, length = jobs[k], counts[k], lengths[k]
            todo = np.flatnonzero(count < length)
            if not len(todo):
                continue
            table = _asked(job.routes, count)
            rows = job.row_index()
            asked_now = count[todo]
            cells_rows = np.repeat(rows[todo], asked_now)
            cols = np.concatenate([table.experts[i, :c] for i, c in zip(todo, asked_now)])
            built = iter(job.table.responses(cells_rows, cols))
            resp = [[next(built) for _ in range(c)] for c in asked_now.tolist()]
            questions = [job.table.questions[i] for i in rows[todo].tolist()]
            unsure = job.cascade.open_questions(questions, asked_now.tolist(),
                                                length[todo].tolist(), resp)
            if unsure:
                count[todo[unsure]] += 1
                still.append(k)
        open_ = still
    out = []
    for job, count, length in zip(jobs, counts, lengths):
        table = _asked(job.routes, count)
        if describe:
            table = table.with_reasons([f"; cascade: asked {c} of {n}"
                                        for c, n in zip(count.tolist(), length.tolist())])
        out.append(table)
    return out, phases
