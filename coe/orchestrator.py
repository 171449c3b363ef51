"""The orchestration API: questions -> routes -> plan -> generations -> answers.

    orch = Orchestrator.from_yaml("experts.yaml", router="category", aggregator="vote")
    run = orch.run(questions, output="answers.jsonl")
    for r in run.results: print(r.id, r.final_answer, r.confidence)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from coe.aggregators import Aggregator, build_aggregator
from coe.answers import gold_answer, is_correct
from coe.cache import ResponseCache, default_cache_path
from coe.config import PoolConfig, load_config
from coe.executor import Executor, Plan, RunStats
from coe.experts.base import GenRequest
from coe.output import ResultWriter
from coe.prompts import build_request
from coe.questions import Question
from coe.results import QuestionResult, response_from
from coe.routers import Route, Router, build_router


@dataclass
class RunResult:
    results: list[QuestionResult]
    stats: RunStats
    wall_seconds: float = 0.0
    resumed: int = 0  # questions already in the output file, not rerun
    plan: Plan | None = None

    @property
    def accuracy(self) -> float | None:
        graded = [r.correct for r in self.results if r.correct is not None]
        return sum(graded) / len(graded) if graded else None


@dataclass
class DryRun:
    routes: list[Route]
    plan: Plan
    notes: list[str] = field(default_factory=list)


class Orchestrator:
    def __init__(self, config: PoolConfig, router: str | Router | None = None,
                 aggregator: str | Aggregator | None = None, k: int | None = None,
                 cache: bool | str | Path | ResponseCache = True, progress: bool = False,
                 fail_fast: bool = False):
        self.config = config
        if cache is True:
            cache = ResponseCache(config.resolve_path(config.cache) if config.cache
                                  else default_cache_path())
        elif isinstance(cache, (str, Path)):
            cache = ResponseCache(cache)
        self.cache: ResponseCache | None = None if cache is False else cache
        self.executor = Executor(config, self.cache, progress=progress, fail_fast=fail_fast)
        self.k = k if k is not None else config.router.k
        self.router = (router if isinstance(router, Router)
                       else build_router(router or config.router.kind, config, self.executor, self.k))
        self.aggregator = (aggregator if isinstance(aggregator, Aggregator)
                           else build_aggregator(aggregator or config.aggregator.kind, config,
                                                 self.executor, strength=self.strength))

    @classmethod
    def from_yaml(cls, path: str | Path, **kwargs) -> "Orchestrator":
        return cls(load_config(path), **kwargs)

    @property
    def strength(self) -> dict[str, float]:
        """Prior strength of each expert (breaks vote ties)."""
        return {e.name: e.strength for e in self.config.experts if e.strength is not None}

    # -- stages ---------------------------------------------------------------------------
    def route(self, questions: list[Question]) -> list[Route]:
        return self.router.route(questions)

    def expert_requests(self, questions: list[Question], routes: list[Route]) -> list[GenRequest]:
        return [build_request(self.config.expert(name), q)
                for q, route in zip(questions, routes) for name in route.names]

    def _next_stage_expert(self) -> str | None:
        """The model the aggregation stage will use, when it is known in advance."""
        return getattr(self.aggregator, "expert", None)

    def dry_run(self, questions: list[Question]) -> DryRun:
        routes = self.route(questions)
        plan = self.executor.plan(self.expert_requests(questions, routes),
                                  last=self._next_stage_expert())
        notes = []
        if self.aggregator.name == "llm":
            notes.append(f"then {len(questions)} aggregation generations "
                         f"(aggregator: {self.config.aggregator.expert or 'chosen per route'})")
        return DryRun(routes, plan, notes)

    def run(self, questions: list[Question], output: str | Path | None = None,
            resume: bool = False, on_plan=None) -> RunResult:
        """Answer ``questions``; with ``output``, append each result to that JSONL file.
        ``on_plan(plan)`` is called once the expert plan is known, before any model loads."""
        t0 = time.perf_counter()
        self.executor.stats = RunStats()
        writer = ResultWriter(output, resume=resume) if output else None
        resumed = 0
        try:
            if writer and writer.done:
                resumed = sum(1 for q in questions if q.id in writer.done)
                questions = [q for q in questions if q.id not in writer.done]
            results: list[QuestionResult] = []
            plan = None
            if questions:
                routes = self.route(questions)
                requests = self.expert_requests(questions, routes)
                plan = self.executor.plan(requests, last=self._next_stage_expert())
                if on_plan is not None:
                    on_plan(plan)
                gens = iter(self.executor.run(requests, plan))
                responses = []
                for q, route in zip(questions, routes):
                    resp = [response_from(name, next(gens), q) for name in route.names]
                    route.failed = {r.expert: r.error for r in resp if r.error}
                    responses.append(resp)
                finals = self.aggregator.aggregate(questions, routes, responses)
                for q, route, resp, final in zip(questions, routes, responses, finals):
                    result = QuestionResult(
                        id=q.id, question=q.question, category=q.category, gold=gold_answer(q),
                        route=route, responses=resp, final_answer=final.answer,
                        aggregator=final.aggregator, confidence=round(final.confidence, 4),
                        votes=final.votes, aggregator_response=final.response, note=final.note,
                        correct=is_correct(final.answer, q))
                    results.append(result)
                    if writer:
                        writer.write(result)
        finally:
            if writer:
                writer.close()
            self.executor.close()
        return RunResult(results, self.executor.stats, time.perf_counter() - t0, resumed, plan)

    def close(self) -> None:
        self.executor.close()
        if self.cache is not None:
            self.cache.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
