"""The flow, once: requests -> routes -> plan -> generations -> answers.

``answer(executor, parts)`` answers several compositions' requests together on one executor
(a run is one part; a served batch holds one part per composition asked for; profiling is one
part of every expert): each part is routed by its composition's router (the route stage), every
expert generation of every part goes into one plan (each model loads once for all of them: the
generate stage), routers that cascade ask their further recruits in rounds (the cascade stage),
then every aggregator generation of every part goes into one more executor call (the aggregate
stage). ``coe eval`` drives the same stages over its strategies.

A part's requests are rows of one ``ResponseTable`` for the whole batch; generations are
deduplicated by the plan, so two parts asking the same expert the same thing share one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from coe.aggregation import Aggregator
from coe.core.config import PoolConfig
from coe.core.request import Request
from coe.core.types import FinalAnswer, QuestionResult, Route
from coe.execution import Executor, Plan
from coe.pipeline.aggregate import Job, aggregate, expected_experts
from coe.pipeline.cascade import CascadeJob, run_cascades
from coe.pipeline.generate import Cells, Generator, Phase, PromptKind
from coe.pipeline.responses import ResponseTable
from coe.pipeline.route import route
from coe.pipeline.routes import NONE, RouteTable
from coe.routing import Router
from coe.text.answers import gold_answer, is_correct


@dataclass
class Composition:
    """How one composition answers: its router, its aggregator, and how its recruits are asked
    (``compose``: as a team member; ``proxy``: a pass-through, the request as it came)."""

    name: str
    router: Router
    aggregator: Aggregator
    kind: PromptKind = "compose"


@dataclass
class Part:
    """One composition's requests in a batch, with their routes if already made. A request
    asked for ``n`` independent answers is ``n`` rows (the same request), ``samples`` saying
    which sample each row is (None: all 0)."""

    composition: Composition
    requests: list[Request]
    routes: RouteTable | list[Route] | None = None
    samples: list[int] | None = None


@dataclass
class Answered:
    results: list[list[QuestionResult]]  # per part, per request
    plan: Plan | None  # the experts' plan (the first round's, with a cascade)
    table: ResponseTable  # every expert generation of the batch
    routes: list[RouteTable]  # per part: the recruits asked
    rows: list[np.ndarray]  # per part: its rows of ``table``
    phases: list[Phase] = field(default_factory=list)


#: ``on_token(part, position, piece)``: a piece of a request's answer as it is decoded (the
#: aggregator's, or a pass-through expert's)
PartToken = Callable[[int, int, str], None]


def _routes(part: Part, names: list[str], config: PoolConfig, blocks: bool) -> RouteTable:
    if isinstance(part.routes, RouteTable):
        return part.routes
    if part.routes is not None:
        return RouteTable.of([q.id for q in part.requests], names, part.routes,
                             unknown=config.expert)
    return route(part.composition.router, part.requests, names, blocks=blocks,
                 unknown=config.expert)[0]


def first_round(routes: RouteTable) -> RouteTable:
    """Each route with only its first recruit (a cascade's first round)."""
    experts = routes.experts.copy()
    experts[:, 1:] = NONE
    return RouteTable(routes.ids, routes.names, experts, routes.weights, routes.info,
                      routes.values)


def prepare(executor: Executor, config: PoolConfig, parts: list[Part]
            ) -> tuple[ResponseTable, list[RouteTable], list[np.ndarray], list[PromptKind],
                       list[int]]:
    """The batch's table, each part's full routes and rows, and each row's prompt kind and
    sample."""
    names = [e.name for e in config.experts]
    requests = [q for p in parts for q in p.requests]
    table = ResponseTable(requests, names, [gold_answer(q) for q in requests], keep_text=True)
    routes, rows, kinds, samples = [], [], [], []
    start = 0
    for p in parts:
        n = len(p.requests)
        rows.append(np.arange(start, start + n))
        routes.append(_routes(p, names, config, executor.keeps_loaded))
        kinds += [p.composition.kind] * n
        samples += p.samples if p.samples is not None else [0] * n
        start += n
    return table, routes, rows, kinds, samples


def _mask(table: ResponseTable, routes: list[RouteTable], rows: list[np.ndarray]) -> np.ndarray:
    need = np.zeros(table.has.shape, bool)
    for r, idx in zip(routes, rows):
        need[idx] = r.mask()
    return need


def answer(executor: Executor, config: PoolConfig, parts: list[Part],
           on_plan: Callable[[Plan], None] | None = None,
           on_token: PartToken | None = None) -> Answered:
    """Answer every part's requests (see the module doc)."""
    table, full, rows, kinds, samples = prepare(executor, config, parts)
    cascades = [p.composition.router.cascade for p in parts]
    asked = [first_round(r) if c is not None else r for r, c in zip(full, cascades)]
    jobs = [Job(p.composition.aggregator, r, table, idx)
            for p, r, idx in zip(parts, asked, rows)]
    last = expected_experts(jobs).most_common(1)
    gen = Generator(executor, config)
    part_of = np.zeros(len(table.questions), np.intp)
    for k, idx in enumerate(rows):
        part_of[idx] = k
    stream = None
    if on_token is not None:
        def stream(_cells: int, row: int, _col: int, piece: str) -> None:
            k = int(part_of[row])
            if parts[k].composition.kind == "proxy":  # a pass-through streams its expert
                on_token(k, row - int(rows[k][0]), piece)
    phase = gen.generate([Cells(table, _mask(table, asked, rows), kinds=kinds,
                                samples=samples)], whole=True,
                         last=last[0][0] if last else None, on_plan=on_plan, on_token=stream)
    phases = [phase]
    todo = [k for k, c in enumerate(cascades) if c is not None]
    if todo:
        done, rounds = run_cascades(gen, [CascadeJob(cascades[k], full[k], table, rows[k],
                                                     parts[k].composition.kind, samples)
                                          for k in todo],
                                    describe=True)
        phases += rounds
        for k, r in zip(todo, done):
            asked[k] = r
            jobs[k] = Job(parts[k].composition.aggregator, r, table, rows[k])
    finals: list[list[FinalAnswer | None]] = [[None] * len(p.requests) for p in parts]

    def sink(k: int, start: int, out: list[FinalAnswer]) -> None:
        finals[k][start:start + len(out)] = out

    def run_aggregation(requests, token):
        return executor.run(requests, on_token=token).generations

    def agg_token(k: int, pos: int, piece: str) -> None:
        if parts[k].composition.kind != "proxy":
            on_token(k, pos, piece)

    aggregate(jobs, sink, run_aggregation, on_token=agg_token if on_token else None)
    results = [results_of(p.requests, r, table, idx, f)
               for p, r, idx, f in zip(parts, asked, rows, finals)]
    return Answered(results, phase.plans[0] if phase.plans else None, table, asked, rows, phases)


def results_of(requests: list[Request], routes: RouteTable, table: ResponseTable,
               rows: np.ndarray, finals: list[FinalAnswer]) -> list[QuestionResult]:
    """One ``QuestionResult`` per request: its route (with who failed), its recruits' responses
    in route order, the final answer and whether it is right (None, not graded, when every
    recruit failed: no answer was given to grade, as ``coe eval`` counts it)."""
    out = []
    for q, route_, i, final in zip(requests, routes[:], rows.tolist(), finals):
        recruits = [j for j in routes.experts[len(out)].tolist() if j != NONE]
        responses = table.responses([i] * len(recruits), recruits)
        route_.failed = {r.expert: r.error for r in responses if r.error}
        out.append(QuestionResult(
            id=q.id, question=q.question, category=q.category, gold=gold_answer(q),
            route=route_, responses=responses, final_answer=final.answer,
            aggregator=final.aggregator, confidence=round(final.confidence, 4),
            votes=final.votes, aggregator_response=final.response, note=final.note,
            clusters=final.clusters,
            correct=None if all_failed(responses) else is_correct(final.answer, q),
            choices=q.choices))
    return out


def all_failed(responses) -> bool:
    """Whether every expert asked failed (a question no one answered)."""
    return bool(responses) and all(r.error is not None for r in responses)


def plan(executor: Executor, config: PoolConfig, parts: list[Part]) -> tuple[list[RouteTable],
                                                                             Plan]:
    """The routes and the experts' plan of ``parts`` (a cascade's first round), generating
    nothing: what ``--dry-run`` shows."""
    table, full, rows, kinds, samples = prepare(executor, config, parts)
    asked = [first_round(r) if p.composition.router.cascade is not None else r
             for p, r in zip(parts, full)]
    jobs = [Job(p.composition.aggregator, r, table, idx) for p, r, idx in zip(parts, asked, rows)]
    last = expected_experts(jobs).most_common(1)
    gen = Generator(executor, config)
    need = _mask(table, asked, rows)
    r, c = np.nonzero(need)
    part = Cells(table, need, kinds=kinds, samples=samples)
    requests, _ = gen.requests(part, r.tolist(), c.tolist())
    return full, executor.plan([q for q in requests if q is not None],
                               last=last[0][0] if last else None)
