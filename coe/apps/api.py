"""The Python API: requests -> routes -> plan -> generations -> answers.

    orch = Orchestrator.from_yaml("experts.yaml", router="category", aggregator="vote")
    run = orch.run(questions, output="answers.jsonl")
    for r in run.results: print(r.id, r.final_answer, r.confidence)

An ``Orchestrator`` holds the pool, a router, an aggregator and an executor, and nothing about
any one run: ``run`` keeps its state in local variables, so one orchestrator may serve several
threads at once (a server), and the executor is the one place that serialises access to each
model. The executor is injectable (``executor=``: an ``Executor`` or a registered name; by
default the yaml's ``executor.kind``, ``local``). Whether models stay loaded after a run is
the executor's policy (``keep_resident``): a batch run frees them at the end, a server keeps
them for the next request.

The flow itself is ``coe.pipeline.flow`` (the same for ``coe run``, ``coe serve``, ``coe
profile`` and the stages ``coe eval`` drives); an orchestrator is a composition (router +
aggregator) bound to a pool and an executor, with a run's bookkeeping: the output file,
``--resume``, the accuracy.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from coe.aggregation import Aggregator, build_aggregator
from coe.core.config import PoolConfig, load_config
from coe.core.types import ExpertResponse, FinalAnswer, GenRequest, Question, QuestionResult, Route
from coe.execution import Executor, Plan, RunStats, build_executor
from coe.io.cache import ResponseCache, open_cache
from coe.io.output import ResultWriter
from coe.pipeline import flow
from coe.pipeline.preflight import files_read
from coe.routing import Router, build_router
from coe.text.answers import describe_ungraded, gold_answer, gold_problem, is_correct
from coe.text.prompts import build_request


@dataclass
class RunResult:
    results: list[QuestionResult]
    stats: RunStats  # every executor call of this run: routing, experts, aggregation
    wall_seconds: float = 0.0
    resumed: int = 0  # questions already in the output file, not rerun
    plan: Plan | None = None
    #: question id -> why its gold answer cannot be graded (``coe.text.answers.gold_problem``):
    #: those questions are left out of ``accuracy``
    ungraded: dict[str, str] = field(default_factory=dict)

    @property
    def graded(self) -> int:
        return sum(1 for r in self.results if r.correct is not None)

    @property
    def failed(self) -> list[str]:
        """Questions with a gold answer on which every expert failed: left out of
        ``accuracy`` and counted here, as ``coe eval`` counts them (no answer to grade)."""
        return [r.id for r in self.results
                if r.gold is not None and r.id not in self.ungraded
                and flow.all_failed(r.responses)]

    @property
    def accuracy(self) -> float | None:
        graded = [r.correct for r in self.results if r.correct is not None]
        return sum(graded) / len(graded) if graded else None

    def accuracy_line(self) -> str | None:
        """``accuracy against gold: 85.7% (7 graded questions)``, then the questions every
        expert failed on and what was not graded; None when no question has a gold answer."""
        failed = len(self.failed)
        if self.accuracy is None and not self.ungraded and not failed:
            return None
        acc = "none graded" if self.accuracy is None else \
            f"{self.accuracy:.1%} ({self.graded} graded question{'s' * (self.graded != 1)})"
        line = f"accuracy against gold: {acc}"
        if failed:
            line += (f"; {failed} question{'s' * (failed != 1)} left out: every expert "
                     f"failed (rerun with --resume once they can answer)")
        if self.ungraded:
            n = len(self.ungraded)
            line += (f"; {n} question{'s' * (n != 1)} could not be graded "
                     f"({describe_ungraded(self.ungraded)})")
        return line


@dataclass
class DryRun:
    routes: list[Route]
    plan: Plan
    notes: list[str] = field(default_factory=list)


class Orchestrator:
    def __init__(self, config: PoolConfig, router: str | Router | None = None,
                 aggregator: str | Aggregator | None = None, k: int | None = None,
                 cache: bool | str | Path | ResponseCache = True, progress: bool = False,
                 fail_fast: bool = False, executor: str | Executor | None = None,
                 keep_resident: bool = False):
        """``cache``, ``progress``, ``fail_fast`` and ``keep_resident`` configure the executor
        the orchestrator builds; an ``Executor`` passed in comes configured (and is not closed
        by ``close``)."""
        if k is not None and (isinstance(k, bool) or not isinstance(k, int)):
            raise TypeError(f"k must be an int or None, got {type(k).__name__}")
        if k is not None and k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self._closed = False
        self.config = config
        self.k = k if k is not None else config.router.k
        self._owns_executor = not isinstance(executor, Executor)
        if isinstance(executor, Executor):
            self.executor = executor
            self.cache = executor.cache
        else:
            self.cache = open_cache(config, cache)
            self.executor = build_executor(config, cache=self.cache, progress=progress,
                                           fail_fast=fail_fast, serving=keep_resident,
                                           kind=executor)
        self.router = (router if isinstance(router, Router)
                       else build_router(router or config.router.kind, config, self.executor, self.k))
        self.aggregator = (aggregator if isinstance(aggregator, Aggregator)
                           else build_aggregator(aggregator or config.aggregator.kind, config,
                                                 strength=self.strength))

    @classmethod
    def from_yaml(cls, path: str | Path, **kwargs) -> "Orchestrator":
        return cls(load_config(path), **kwargs)

    @property
    def strength(self) -> dict[str, float]:
        """Prior strength of each expert (breaks vote ties)."""
        return {e.name: e.strength for e in self.config.experts if e.strength is not None}

    # -- stages ---------------------------------------------------------------------------
    def route(self, questions: list[Question | dict]) -> list[Route]:
        questions = self._accept(questions)
        return self.router.route(questions)

    def _accept(self, questions) -> list[Question]:
        """The API boundary of ``run``, ``arun``, ``route`` and ``dry_run``: an open
        orchestrator, and a list of questions (``Question``s, or dicts of their fields)."""
        if self._closed:
            raise RuntimeError("orchestrator is closed")
        return as_questions(questions)

    @property
    def composition(self) -> flow.Composition:
        return flow.Composition("orchestrator", self.router, self.aggregator)

    def expert_requests(self, questions: list[Question], routes: list[Route]) -> list[GenRequest]:
        return [build_request(self.config.expert(name), q)
                for q, route in zip(questions, routes) for name in route.names]

    def plan(self, questions: list[Question], routes: list[Route]) -> Plan:
        """The experts' plan (a cascade's first round); the aggregation stage's model (if
        any) goes last, so it is still loaded when aggregation starts."""
        return flow.plan(self.executor, self.config,
                         [flow.Part(self.composition, questions, routes)])[1]

    def dry_run(self, questions: list[Question | dict]) -> DryRun:
        questions = self._accept(questions)
        cascade = self.router.cascade
        with self.executor.session():
            full, plan = flow.plan(self.executor, self.config,
                                   [flow.Part(self.composition, questions)])
        routes = full[0][:]
        notes = []
        if cascade is not None:
            notes.append(f"{cascade.describe()}: the plan shows each question's first recruit; "
                         "later rounds are planned as they come")
        after = self.aggregator.experts(routes) if self.aggregator.generates else None
        if after:
            notes.append(f"then {sum(after.values())} aggregation generations "
                         f"(aggregator: {', '.join(n for n, _ in after.most_common())})")
        return DryRun(routes, plan, notes)

    def run(self, questions: list[Question | dict],
            output: str | Path | ResultWriter | None = None, resume: bool = False,
            on_plan=None) -> RunResult:
        """Answer ``questions`` (``Question``s or dicts of their fields, ids unique); with
        ``output``, append each result to that JSONL file (locked while the run writes it:
        another writer is refused), or to a ``ResultWriter`` made already (it holds the lock
        and its ``resume``), closed when the run ends. ``on_plan(plan)`` is called once the
        expert plan is known, before any model loads."""
        questions = unique_ids(self._accept(questions))
        t0 = time.perf_counter()
        writer = (output if isinstance(output, ResultWriter) else
                  ResultWriter(output, resume=resume, questions=questions,
                               inputs=files_read(self.config, self.cache is not None and self.cache))
                  if output else None)
        results: list[QuestionResult] = []
        resumed, plan = 0, None
        with self.executor.session() as stats:
            try:
                if writer and writer.done:
                    resumed = sum(1 for q in questions if q.id in writer.done)
                    questions = [q for q in questions if q.id not in writer.done]
                if questions:
                    done = flow.answer(self.executor, self.config,
                                       [flow.Part(self.composition, questions)], on_plan)
                    results, plan = done.results[0], done.plan
                    if writer:
                        for r in results:
                            writer.write(r)
            finally:
                if writer:
                    writer.close()
        ungraded = {q.id: why for q in questions if (why := gold_problem(q))}
        return RunResult(results, stats, time.perf_counter() - t0, resumed, plan, ungraded)

    async def arun(self, questions: list[Question | dict], **kwargs) -> RunResult:
        """``run`` for async code (a server, a notebook): it runs in a worker thread, so the
        event loop keeps serving while the models work."""
        questions = unique_ids(self._accept(questions))
        return await asyncio.to_thread(self.run, questions, **kwargs)

    @staticmethod
    def result(q: Question, route: Route, resp: list[ExpertResponse],
                final: FinalAnswer) -> QuestionResult:
        return QuestionResult(
            id=q.id, question=q.question, category=q.category, gold=gold_answer(q), route=route,
            responses=resp, final_answer=final.answer, aggregator=final.aggregator,
            confidence=round(final.confidence, 4), votes=final.votes,
            aggregator_response=final.response, note=final.note, clusters=final.clusters,
            correct=None if flow.all_failed(resp) else is_correct(final.answer, q),
            choices=q.choices)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_executor:
            self.executor.close()
            if self.cache is not None:
                self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def as_questions(questions) -> list[Question]:
    """``questions`` as a list of ``Question``: each item a ``Question`` or a dict of its
    fields. Anything else is a ``TypeError``, an invalid dict a ``ValueError``, each naming the
    index."""
    if isinstance(questions, (Question, dict)):
        raise TypeError(f"questions must be a list of Question or dict, got one "
                        f"{type(questions).__name__}: pass a list: [question]")
    if isinstance(questions, (str, bytes)) or not isinstance(questions, (list, tuple)):
        raise TypeError(f"questions must be a list of Question or dict, "
                        f"got {type(questions).__name__}")
    out = []
    for i, q in enumerate(questions):
        if isinstance(q, dict):
            try:
                q = Question.model_validate(q)
            except ValidationError as e:
                first = e.errors()[0]
                where = ".".join(str(p) for p in first["loc"]) or "record"
                msg = "missing" if first["type"] == "missing" else first["msg"]
                raise ValueError(f"questions[{i}]: field {where!r}: {msg}") from None
        elif not isinstance(q, Question):
            raise TypeError(f"questions[{i}]: expected a Question or a dict, "
                            f"got {type(q).__name__}")
        out.append(q)
    return out


def unique_ids(questions: list[Question]) -> list[Question]:
    """``questions`` when their ids are unique (a run's output and ``--resume`` go by id)."""
    first: dict[str, int] = {}
    for i, q in enumerate(questions):
        if q.id in first:
            raise ValueError(f"questions[{i}]: duplicate id {q.id!r} "
                             f"(first at questions[{first[q.id]}])")
        first[q.id] = i
    return questions
