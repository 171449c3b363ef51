"""One evaluation job: every strategy over the same questions, each generation made once.

The job
1. routes the questions for every strategy (routers are built with the public
   ``build_router``; a router that cannot be built for this pool is skipped with a note);
2. takes the *union* of all (question, expert) pairs any strategy recruits, plus every expert
   on the validation questions when ``best-single`` is asked for, and hands it to the load-once
   executor in **one** call (each model loaded once, identical requests made once, the
   response cache consulted first and filled as each generation finishes);
3. asks every ``llm`` aggregation strategy for its aggregation requests, runs all of them in
   one more executor call, and gives each strategy its own generations back;
4. scores each strategy on its own subset of the shared generations.

Step 3 uses the aggregators unchanged: they are built on a stand-in executor that first only
records the requests they make, then serves the real generations for the same requests.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from coe.aggregators import build_aggregator, vote
from coe.answers import gold_answer, is_correct
from coe.config import PoolConfig
from coe.errors import CoeError, ConfigError
from coe.eval.scoring import Accuracy, Outcome, StrategyScore, score_strategy
from coe.eval.strategies import (StrategySpec, all_specs, has_categories, random_routes,
                                 select, single_routes, split_validation)
from coe.executor import RunStats
from coe.experts.base import Generation, GenRequest
from coe.orchestrator import Orchestrator
from coe.questions import Question
from coe.results import ExpertResponse, FinalAnswer, response_from
from coe.routers import Recruit, Route, build_router


@dataclass
class EvalOptions:
    strategies: str | list[str] | None = None  # names or patterns; None: every available one
    validation: list[Question] | None = None  # picks best-single; else a seeded split
    validation_source: str = ""
    val_fraction: float = 0.5
    seed: int = 0
    random_k: int = 3
    aggregator_expert: str | None = None  # for the llm strategies (default: yaml / route's)
    cache: bool | str | Path = True
    resume: bool = False
    progress: bool = False
    log: Callable[[str], None] | None = None


@dataclass
class Phase:
    """One executor call of the job."""

    name: str
    requests: int = 0
    unique: int = 0
    cached: int = 0
    generations: int = 0
    replayed: int = 0  # of ``generations``: read from replay records, not generated
    failed: int = 0
    loads: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class EvalResult:
    config: PoolConfig
    questions: list[Question]
    specs: list[StrategySpec]
    scores: list[StrategyScore]
    outcomes: dict[str, list[Outcome]]
    skipped: dict[str, str]
    validation: list[Question]
    validation_source: str
    validation_accuracy: dict[str, Accuracy]
    best_single: str | None
    strength: dict[str, float]
    strength_source: dict[str, str]
    stats: RunStats
    phases: list[Phase]
    wall_seconds: float
    responses: dict[tuple[str, str], ExpertResponse] = field(default_factory=dict)
    val_responses: dict[tuple[str, str], ExpertResponse] = field(default_factory=dict)
    seed: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def generations(self) -> int:
        return self.stats.generations

    @property
    def replayed(self) -> int:
        return sum(p.replayed for p in self.phases)

    @property
    def cache_hits(self) -> int:
        return self.stats.cache_hits

    def score(self, name: str) -> StrategyScore:
        return next(s for s in self.scores if s.name == name)

    def counts_line(self) -> str:
        s = self.stats
        return (f"generations: {s.generations} (replayed from records: {self.replayed}, "
                f"new model generations: {s.generations - self.replayed}), "
                f"cache hits: {s.cache_hits}, failed: {s.failed_generations}, "
                f"model loads: {s.loads} (naive per-question order: {s.naive_loads})")


def _request_key(r: GenRequest) -> tuple:
    return (r.expert, r.question_id, r.stage, r.prompt, r.messages,
            r.sampling.model_dump_json())


class _DeferredExecutor:
    """Stands in for the executor inside aggregators: first records the requests and answers
    with placeholders, then (``serve``) returns the real generations for the same requests."""

    def __init__(self):
        self.pending: list[GenRequest] = []
        self._served: dict[tuple, Generation] | None = None

    def run(self, requests: list[GenRequest], plan=None) -> list[Generation]:
        if self._served is None:
            self.pending.extend(requests)
            return [Generation(error="deferred") for _ in requests]
        return [self._served[_request_key(r)] for r in requests]

    def serve(self, generations: list[Generation]) -> None:
        self._served = {_request_key(r): g for r, g in zip(self.pending, generations)}


def _log(opts: EvalOptions, msg: str) -> None:
    if opts.log:
        opts.log(msg)


def _run_phase(name: str, orch: Orchestrator, requests: list[GenRequest], opts: EvalOptions,
               last: str | None = None) -> tuple[list[Generation], Phase]:
    ex = orch.executor
    before = replace(ex.stats, failures=dict(ex.stats.failures))
    t0 = time.perf_counter()
    plan = ex.plan(requests, last=last)  # ``last``'s weights stay loaded for the next phase
    replay = {e.name for e in orch.config.experts if e.backend == "replay"}
    unique = [i for g in plan.groups for i in g.indices]
    phase = Phase(name, requests=len(requests), unique=len(unique), cached=len(plan.hits))
    phase.replayed = sum(1 for i in unique if requests[i].expert in replay)
    if requests:
        _log(opts, f"[{name}] " + plan.describe().replace("\n", f"\n[{name}] "))
    gens = ex.run(requests, plan) if requests else []  # the last model stays loaded
    phase.generations = ex.stats.generations - before.generations
    phase.failed = ex.stats.failed_generations - before.failed_generations
    phase.loads = ex.stats.loads - before.loads
    phase.replayed = min(phase.replayed, phase.generations)
    phase.seconds = time.perf_counter() - t0
    return gens, phase


def _union_routes(questions: list[Question], per_spec: list[list[Route]],
                  order: list[str]) -> list[Route]:
    rank = {n: i for i, n in enumerate(order)}
    out = []
    for i, q in enumerate(questions):
        names = {n for routes in per_spec for n in routes[i].names}
        out.append(Route(question_id=q.id, experts=[Recruit(name=n) for n in
                                                    sorted(names, key=rank.__getitem__)]))
    return out


def _responses(questions, routes, gens) -> dict[tuple[str, str], ExpertResponse]:
    it = iter(gens)
    out = {}
    for q, route in zip(questions, routes):
        for name in route.names:
            out[(q.id, name)] = response_from(name, next(it), q)
    return out


def _llm_expert_for(route: Route, opts: EvalOptions, config: PoolConfig) -> str:
    # the choice LLMAggregator makes: the router's pick, the configured one, the first recruit
    return route.aggregator or opts.aggregator_expert or config.aggregator.expert \
        or route.experts[0].name


def evaluate(config: PoolConfig, questions: list[Question],
             opts: EvalOptions | None = None) -> EvalResult:
    """Run every selected strategy over ``questions`` (which need gold answers)."""
    opts = opts or EvalOptions()
    t_start = time.perf_counter()
    if opts.resume and opts.cache is False:
        raise ConfigError("--resume needs the response cache (drop --no-cache)")
    if not any(gold_answer(q) is not None for q in questions):
        raise CoeError("no question has a gold answer: nothing to score")
    if opts.aggregator_expert:
        config.expert(opts.aggregator_expert)  # unknown name: one-line ConfigError
    specs = select(all_specs(config, opts.random_k), opts.strategies)
    skipped: dict[str, str] = {}
    notes: list[str] = []

    # -- validation questions (best-single only) ------------------------------------------
    validation: list[Question] = []
    val_source = ""
    if any(s.kind == "best-single" for s in specs):
        if opts.validation:
            validation, val_source = list(opts.validation), opts.validation_source or "file"
        elif opts.val_fraction > 0 and len(questions) >= 2:
            validation, questions = split_validation(questions, opts.val_fraction, opts.seed)
            val_source = (f"seeded split of the question file (seed {opts.seed}, "
                          f"{len(validation)} validation / {len(questions)} test)")
            notes.append(f"best-single is picked on {val_source}; every strategy is scored on "
                         f"the {len(questions)} test questions only")
        else:
            skipped["best-single"] = "no validation questions (--validation or --val-fraction)"
    if not questions:
        raise CoeError("no test questions left to score")

    orch = Orchestrator(config, router="all", aggregator="vote", cache=opts.cache,
                        progress=opts.progress)
    try:
        return _evaluate(orch, config, questions, validation, val_source, specs, skipped,
                         notes, opts, t_start)
    finally:
        orch.close()


def _evaluate(orch, config, questions, validation, val_source, specs, skipped, notes, opts,
              t_start) -> EvalResult:
    names = [e.name for e in config.experts]
    ex = orch.executor
    ex.stats = RunStats()
    if opts.resume:
        _log(opts, "resuming: generations already in the response cache are not redone")

    # -- routes per strategy --------------------------------------------------------------
    routers: dict[tuple[str, int | None], tuple[list[Route] | None, float, str]] = {}

    def routed(kind: str, k: int | None):
        key = (kind, k)
        if key not in routers:
            if kind == "category" and not has_categories(config):
                routers[key] = (None, 0.0, "the pool declares no categories")
            else:
                t0 = time.perf_counter()
                try:
                    router = build_router(kind, config, ex, k)
                    routes = router.route(questions)
                    routers[key] = (routes, time.perf_counter() - t0, "")
                except Exception as e:  # an unavailable or unfit router: skip, say why
                    routers[key] = (None, 0.0, f"{kind} router unavailable: "
                                               f"{type(e).__name__}: {e}")
        return routers[key]

    routes_of: dict[str, list[Route]] = {}
    route_seconds: dict[str, float] = {}
    for s in specs:
        if s.name in skipped:
            continue
        if s.kind == "single":
            routes_of[s.name] = single_routes(questions, s.expert, "single expert")
        elif s.kind == "random":
            routes_of[s.name] = random_routes(questions, names, s.k, opts.seed)
        elif s.kind == "oracle":
            routes_of[s.name] = [Route(question_id=q.id, experts=[Recruit(name=n) for n in names],
                                       reason="every expert (oracle)") for q in questions]
        elif s.kind == "router":
            k = s.k or (None if s.router == "all" else config.router.k)
            routes, secs, why = routed(s.router, k)
            if routes is None:
                skipped[s.name] = why
                continue
            if s.aggregator == "llm":
                replayed = sorted({_llm_expert_for(r, opts, config) for r in routes}
                                  & {e.name for e in config.experts if e.backend == "replay"})
                if replayed:
                    skipped[s.name] = (f"the llm aggregator would be a replay expert "
                                       f"({', '.join(replayed)}), which can only repeat its "
                                       f"recorded answers (use --aggregator-expert)")
                    continue
            routes_of[s.name] = [r.model_copy(deep=True) for r in routes]
            route_seconds[s.name] = secs

    best_spec = next((s for s in specs if s.kind == "best-single" and s.name not in skipped),
                     None)

    # -- expert generations: the union, in one executor call ------------------------------
    union = _union_routes(questions, list(routes_of.values()), names)
    all_covered = all(len(r.experts) == len(names) for r in union)
    val_routes = [Route(question_id=q.id, experts=[Recruit(name=n) for n in names])
                  for q in validation] if best_spec else []
    val_requests = orch.expert_requests(validation, val_routes) if best_spec else []
    phases: list[Phase] = []
    val_resp: dict[tuple[str, str], ExpertResponse] = {}
    if best_spec and not all_covered:
        # The test generations depend on the pick: validate first, then add the pick.
        gens, phase = _run_phase("validation", orch, val_requests, opts)
        phases.append(phase)
        val_resp = _responses(validation, val_routes, gens)
        val_requests = []
    val_acc: dict[str, Accuracy] = {}
    best: str | None = None

    def pick_best() -> str:
        for n in names:
            acc = val_acc.setdefault(n, Accuracy())
            for q in validation:
                ok = is_correct(val_resp[(q.id, n)].answer, q)
                if ok is not None:
                    acc.add(ok)
        strength = {e.name: e.strength or 0.0 for e in config.experts}
        # highest validation accuracy; ties to the stronger prior, then pool order
        return max(names, key=lambda n: (val_acc[n].value or 0.0, strength[n], -names.index(n)))

    if best_spec and val_resp:
        best = pick_best()
        routes_of[best_spec.name] = single_routes(questions, best, f"best on validation: {best}")
        union = _union_routes(questions, list(routes_of.values()), names)
    test_requests = orch.expert_requests(questions, union)
    # the aggregator most llm strategies will use: its weights go last and stay loaded
    agg_experts = Counter(_llm_expert_for(r, opts, config) for s in specs
                          if s.aggregator == "llm" and s.name in routes_of
                          for r in routes_of[s.name])
    last = agg_experts.most_common(1)[0][0] if agg_experts else None
    gens, phase = _run_phase("experts", orch, val_requests + test_requests, opts, last=last)
    phases.append(phase)
    if val_requests:
        val_resp = _responses(validation, val_routes, gens[:len(val_requests)])
        gens = gens[len(val_requests):]
    responses = _responses(questions, union, gens)
    if best_spec and best is None:
        best = pick_best()
        routes_of[best_spec.name] = single_routes(questions, best, f"best on validation: {best}")
    if best_spec:
        best_spec.description = (f"{best} (validation accuracy "
                                 f"{val_acc[best].value:.1%} on {val_acc[best].n})")

    # -- vote tie-breaks: yaml strength, else validation accuracy -------------------------
    strength: dict[str, float] = {}
    strength_source: dict[str, str] = {}
    for e in config.experts:
        if e.strength is not None:
            strength[e.name], strength_source[e.name] = e.strength, "yaml"
        elif e.name in val_acc and val_acc[e.name].n:
            strength[e.name], strength_source[e.name] = val_acc[e.name].value, "validation"

    # -- aggregation ----------------------------------------------------------------------
    per_q = {name: [[responses[(q.id, n)] for n in r.names] for q, r in zip(questions, rs)]
             for name, rs in routes_of.items()}
    finals: dict[str, list[FinalAnswer]] = {}
    deferred = _DeferredExecutor()
    llm_aggs = {}
    for s in specs:
        if s.name not in routes_of or s.kind == "oracle":
            continue
        if s.aggregator == "llm":
            agg = build_aggregator("llm", config, deferred, strength=strength,
                                   expert=opts.aggregator_expert)
            agg.aggregate(questions, routes_of[s.name], per_q[s.name])  # records requests
            llm_aggs[s.name] = agg
        else:
            agg = build_aggregator(s.aggregator, config, None, strength=strength)
            finals[s.name] = agg.aggregate(questions, routes_of[s.name], per_q[s.name])
    if llm_aggs:
        gens, phase = _run_phase("aggregation", orch, deferred.pending, opts)
        phases.append(phase)
        deferred.serve(gens)
        for name, agg in llm_aggs.items():
            finals[name] = agg.aggregate(questions, routes_of[name], per_q[name])

    replay = {e.name for e in config.experts if e.backend == "replay"}
    if replay and not any(r.prompt_tokens or r.completion_tokens for (_, n), r in
                          responses.items() if n in replay):
        notes.append("the replay records carry no token counts: tokens and cost of replay "
                     "experts show as 0")

    # -- outcomes and scores --------------------------------------------------------------
    outcomes: dict[str, list[Outcome]] = {}
    scores: list[StrategyScore] = []
    kept = [s for s in specs if s.name in routes_of]
    for s in kept:
        rows = []
        for i, (q, route) in enumerate(zip(questions, routes_of[s.name])):
            resp = per_q[s.name][i]
            judged = [is_correct(r.answer, q) for r in resp if r.error is None]
            any_right = None if gold_answer(q) is None else any(bool(j) for j in judged)
            agg_response = None
            note = ""
            if s.kind == "oracle":
                answer = gold_answer(q) if any_right else vote(resp, strength)[0]
                correct = any_right
            else:
                final = finals[s.name][i]
                answer, note = final.answer, final.note
                agg_response = final.response
                correct = is_correct(answer, q)
            rows.append(Outcome(question_id=q.id, category=q.category, answer=answer,
                                correct=correct, recruited=route.names, used=list(resp),
                                any_right=any_right, aggregator=agg_response, note=note))
        outcomes[s.name] = rows
        score = score_strategy(s.name, s.description, rows, config,
                               route_seconds.get(s.name, 0.0))
        if s.kind == "single" or s.kind == "best-single":
            score.recruit_oracle = Accuracy()  # same as the accuracy: not informative
        scores.append(score)
    return EvalResult(
        config=config, questions=questions, specs=kept, scores=scores, outcomes=outcomes,
        skipped={s.name: skipped[s.name] for s in specs if s.name in skipped},
        validation=validation, validation_source=val_source, validation_accuracy=val_acc,
        best_single=best, strength=strength, strength_source=strength_source,
        stats=ex.stats, phases=phases, wall_seconds=time.perf_counter() - t_start,
        responses=responses, val_responses=val_resp, seed=opts.seed, notes=notes)
