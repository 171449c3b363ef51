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

Aggregators are driven the way the orchestrator drives them: ``requests`` (what generations
they need), one executor call for all of them, then ``aggregate`` with those generations.

``EvaluationJob`` runs the stages in that order, one method each; ``evaluate`` is the job as a
function.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from coe.aggregators import Aggregator, build_aggregator, vote
from coe.aggregators.base import aggregate_together
from coe.answers import (
    describe_ungraded,
    gold_answer,
    gold_problem,
    is_correct,
    response_from,
)
from coe.config import PoolConfig
from coe.errors import CoeError, ConfigError
from coe.eval.scoring import Accuracy, Outcome, StrategyScore, score_strategy
from coe.eval.strategies import (
    StrategySpec,
    all_specs,
    has_categories,
    overlap,
    random_routes,
    select,
    single_routes,
    split_validation,
)
from coe.executor import RunStats
from coe.orchestrator import Orchestrator
from coe.routers import build_router
from coe.types import ExpertResponse, FinalAnswer, Generation, GenRequest, Question, Recruit, Route


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
    #: test question id -> why it cannot be graded (no gold answer, or one naming no answer)
    ungraded: dict[str, str] = field(default_factory=dict)
    #: test questions also among the validation questions (``strategies.overlap``); None when
    #: no validation questions were used
    validation_overlap: dict | None = None
    validation_failed: dict[str, int] = field(default_factory=dict)  # expert -> generations

    @property
    def graded_questions(self) -> int:
        return len(self.questions) - len(self.ungraded)

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


def _log(opts: EvalOptions, msg: str) -> None:
    if opts.log:
        opts.log(msg)


def _all_routes(questions: list[Question], names: list[str], reason: str = "") -> list[Route]:
    return [Route(question_id=q.id, experts=[Recruit(name=n) for n in names], reason=reason)
            for q in questions]


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


class EvaluationJob:
    """Every selected strategy over ``questions`` (which need gold answers). ``run`` calls the
    stages in order; each reads what the previous ones left on the job."""

    def __init__(self, config: PoolConfig, questions: list[Question],
                 opts: EvalOptions | None = None):
        self.config = config
        self.opts = opts or EvalOptions()
        self.questions = list(questions)
        self.names = [e.name for e in config.experts]
        self.replay = {e.name for e in config.experts if e.backend == "replay"}
        self.specs = select(all_specs(config, self.opts.random_k), self.opts.strategies)
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.validation: list[Question] = []
        self.val_source = ""
        self.orch: Orchestrator | None = None
        self.phases: list[Phase] = []
        self.routes_of: dict[str, list[Route]] = {}  # strategy -> its routes on the test set
        self.route_seconds: dict[str, float] = {}
        self.responses: dict[tuple[str, str], ExpertResponse] = {}  # (question id, expert)
        self.val_resp: dict[tuple[str, str], ExpertResponse] = {}
        self.val_acc: dict[str, Accuracy] = {}
        self.val_failed: dict[str, int] = {}  # expert -> failed validation generations
        self.best: str | None = None
        self.strength: dict[str, float] = {}
        self.strength_source: dict[str, str] = {}
        self.finals: dict[str, list[FinalAnswer]] = {}
        self.ungraded: dict[str, str] = {}
        self.overlap: dict | None = None

    def run(self) -> EvalResult:
        t0 = time.perf_counter()
        self.check()
        self.hold_out_validation()
        self.check_overlap()
        self.find_ungraded()
        with Orchestrator(self.config, router="all", aggregator="vote", cache=self.opts.cache,
                          progress=self.opts.progress) as orch, orch.executor.session() as stats:
            self.orch = orch
            if self.opts.resume:
                _log(self.opts, "resuming: generations already in the response cache are not redone")
            self.route_strategies()
            self.answer_experts()
            self.break_ties()
            self.aggregate()
        scores, outcomes = self.score()
        kept = [s for s in self.specs if s.name in self.routes_of]
        return EvalResult(
            config=self.config, questions=self.questions, specs=kept, scores=scores,
            outcomes=outcomes, skipped={s.name: self.skipped[s.name] for s in self.specs
                                        if s.name in self.skipped},
            validation=self.validation, validation_source=self.val_source,
            validation_accuracy=self.val_acc, best_single=self.best, strength=self.strength,
            strength_source=self.strength_source, stats=stats, phases=self.phases,
            wall_seconds=time.perf_counter() - t0, responses=self.responses,
            val_responses=self.val_resp, seed=self.opts.seed, notes=self.notes,
            ungraded=self.ungraded, validation_overlap=self.overlap,
            validation_failed=self.val_failed)

    # -- 1. inputs --------------------------------------------------------------------------
    def check(self) -> None:
        if self.opts.resume and self.opts.cache is False:
            raise ConfigError("--resume needs the response cache (drop --no-cache)")
        if not any(gold_answer(q) is not None for q in self.questions):
            problems = {q.id: why for q in self.questions if (why := gold_problem(q))}
            if problems:
                raise CoeError("no question has a gold answer that can be graded "
                               f"({describe_ungraded(problems)})")
            raise CoeError("no question has a gold answer: nothing to score")
        if self.opts.aggregator_expert:
            self.config.expert(self.opts.aggregator_expert)  # unknown name: one-line error

    def hold_out_validation(self) -> None:
        """The questions best-single is picked on: ``--validation``, else a seeded split of
        the question file (then left out of the test)."""
        if not any(s.kind == "best-single" for s in self.specs):
            pass
        elif self.opts.validation:
            self.validation = list(self.opts.validation)
            self.val_source = self.opts.validation_source or "file"
        elif self.opts.val_fraction > 0 and len(self.questions) >= 2:
            self.validation, self.questions = split_validation(
                self.questions, self.opts.val_fraction, self.opts.seed)
            self.val_source = (f"seeded split of the question file (seed {self.opts.seed}, "
                               f"{len(self.validation)} validation / {len(self.questions)} test)")
            self.notes.append(f"best-single is picked on {self.val_source}; every strategy is "
                              f"scored on the {len(self.questions)} test questions only")
        else:
            self.skipped["best-single"] = "no validation questions (--validation or --val-fraction)"
        if not self.questions:
            raise CoeError("no test questions left to score")

    def check_overlap(self) -> None:
        """Warn when the questions best-single is picked on share questions (by id or text)
        with the test set: the pick would then be made partly on the test."""
        if not self.validation:
            return
        self.overlap = overlap(self.validation, self.questions)
        if self.overlap["questions"]:
            o = self.overlap
            note = (f"warning: the validation questions ({self.val_source}) overlap the test "
                    f"set: {o['questions']} of the {len(self.questions)} test questions "
                    f"(same id: {o['same_id']}, same text: {o['same_text']}); best-single is "
                    "picked partly on the test questions")
            self.notes.insert(0, note)
            _log(self.opts, note)

    def find_ungraded(self) -> None:
        """The test questions no strategy can be graded on, and why."""
        self.ungraded = {q.id: gold_problem(q) or "no gold answer" for q in self.questions
                         if gold_answer(q) is None}

    # -- 2. routes --------------------------------------------------------------------------
    def route_strategies(self) -> None:
        """The routes of every strategy on the test questions. A router that cannot serve
        this pool, or a model-using aggregator that would be a replay, is skipped with why."""
        routed: dict[tuple[str, int | None], tuple[list[Route] | None, float, str]] = {}
        for s in self.specs:
            if s.name in self.skipped or s.kind == "best-single":
                continue
            if s.kind == "single":
                self.routes_of[s.name] = single_routes(self.questions, s.expert, "single expert")
            elif s.kind == "random":
                self.routes_of[s.name] = random_routes(self.questions, self.names, s.k,
                                                       self.opts.seed)
            elif s.kind == "oracle":
                self.routes_of[s.name] = _all_routes(self.questions, self.names,
                                                     "every expert (oracle)")
            else:
                k = s.k or (None if s.router == "all" else self.config.router.k)
                key = (s.router, k)
                if key not in routed:
                    routed[key] = self._route_with(s.router, k)
                routes, secs, why = routed[key]
                why = why or self._replayed_aggregator(s, routes)
                if why:
                    self.skipped[s.name] = why
                    continue
                self.routes_of[s.name] = [r.model_copy(deep=True) for r in routes]
                self.route_seconds[s.name] = secs

    def _route_with(self, kind: str, k: int | None) -> tuple[list[Route] | None, float, str]:
        if kind == "category" and not has_categories(self.config):
            return None, 0.0, "the pool declares no categories"
        t0 = time.perf_counter()
        try:
            routes = build_router(kind, self.config, self.orch.executor, k).route(self.questions)
        except Exception as e:  # an unavailable or unfit router: skip, say why
            return None, 0.0, f"{kind} router unavailable: {type(e).__name__}: {e}"
        return routes, time.perf_counter() - t0, ""

    def _aggregator(self, spec: StrategySpec) -> Aggregator:
        return build_aggregator(spec.aggregator, self.config, strength=self.strength,
                                expert=self.opts.aggregator_expert)

    def _replayed_aggregator(self, spec: StrategySpec, routes: list[Route]) -> str:
        """Why a strategy whose aggregator would generate with a replay expert is skipped."""
        replayed = sorted(set(self._aggregator(spec).experts(routes)) & self.replay)
        if not replayed:
            return ""
        return (f"the {spec.aggregator} aggregator would be a replay expert "
                f"({', '.join(replayed)}), which can only repeat its recorded answers "
                f"(use --aggregator-expert)")

    # -- 3. expert generations: the union, in one executor call -------------------------------
    def answer_experts(self) -> None:
        """Every (question, expert) pair any strategy needs, plus every expert on the
        validation questions for best-single, in one executor call. When best-single's pick
        would add test generations no other strategy needs, validation runs first."""
        best_spec = next((s for s in self.specs if s.kind == "best-single"
                          and s.name not in self.skipped), None)
        val_routes = _all_routes(self.validation, self.names) if best_spec else []
        union = _union_routes(self.questions, list(self.routes_of.values()), self.names)
        if best_spec and not all(len(r.experts) == len(self.names) for r in union):
            gens = self._phase("validation", self.orch.expert_requests(self.validation, val_routes))
            self.val_resp = _responses(self.validation, val_routes, gens)
            self.pick_best(best_spec)
            union = _union_routes(self.questions, list(self.routes_of.values()), self.names)
            val_routes = []
        val_requests = self.orch.expert_requests(self.validation, val_routes)
        gens = self._phase("experts", val_requests + self.orch.expert_requests(self.questions, union),
                           last=self._aggregation_model())
        if val_requests:
            self.val_resp = _responses(self.validation, val_routes, gens[:len(val_requests)])
        self.responses = _responses(self.questions, union, gens[len(val_requests):])
        if best_spec and self.best is None:
            self.pick_best(best_spec)

    def pick_best(self, spec: StrategySpec) -> None:
        """The expert most accurate on the validation questions (ties: the stronger prior,
        then pool order) becomes best-single's route. A failed generation is left out of the
        expert's validation accuracy (as on the test) but counts against it in the pick: an
        expert that could not answer is not the one to rely on."""
        for n in self.names:
            acc = self.val_acc.setdefault(n, Accuracy())
            for q in self.validation:
                if self.val_resp[(q.id, n)].error is not None:
                    self.val_failed[n] = self.val_failed.get(n, 0) + 1
                    continue
                ok = is_correct(self.val_resp[(q.id, n)].answer, q)
                if ok is not None:
                    acc.add(ok)
        prior = {e.name: e.strength or 0.0 for e in self.config.experts}

        def rank(n: str) -> tuple:
            a, tried = self.val_acc[n], self.val_acc[n].n + self.val_failed.get(n, 0)
            return a.correct / tried if tried else 0.0, prior[n], -self.names.index(n)

        self.best = max(self.names, key=rank)
        self.routes_of[spec.name] = single_routes(self.questions, self.best,
                                                  f"best on validation: {self.best}")
        best, failed = self.val_acc[self.best], self.val_failed.get(self.best, 0)
        spec.description = (f"{self.best} (validation accuracy "
                            + ("-" if best.value is None else f"{best.value:.1%}")
                            + f" on {best.n}" + (f", {failed} failed" if failed else "") + ")")

    def _aggregation_model(self) -> str | None:
        """The model most aggregations will use: its weights go last and stay loaded."""
        used: Counter = Counter()
        for s in self.specs:
            if s.name in self.routes_of and s.kind != "oracle":
                used += self._aggregator(s).experts(self.routes_of[s.name])
        top = used.most_common(1)
        return top[0][0] if top else None

    def _phase(self, name: str, requests: list[GenRequest],
               last: str | None = None) -> list[Generation]:
        """One executor call of the job, recorded as a ``Phase``."""
        t0 = time.perf_counter()
        ex = self.orch.executor
        plan = ex.plan(requests, last=last)  # ``last``'s weights stay loaded for the next phase
        unique = [i for g in plan.groups for i in g.indices]
        phase = Phase(name, requests=len(requests), unique=len(unique), cached=len(plan.hits))
        if requests:
            _log(self.opts, f"[{name}] " + plan.describe().replace("\n", f"\n[{name}] "))
        done = ex.run(requests, plan) if requests else None
        if done is not None:
            phase.generations = done.stats.generations
            phase.failed = done.stats.failed_generations
            phase.loads = done.stats.loads
        replayed = sum(1 for i in unique if requests[i].expert in self.replay)
        phase.replayed = min(replayed, phase.generations)
        phase.seconds = time.perf_counter() - t0
        self.phases.append(phase)
        return done.generations if done is not None else []

    # -- 4. tie-breaks and aggregation --------------------------------------------------------
    def break_ties(self) -> None:
        """Vote ties go to the stronger expert: the yaml's strength, else validation accuracy."""
        for e in self.config.experts:
            if e.strength is not None:
                self.strength[e.name], self.strength_source[e.name] = e.strength, "yaml"
            elif e.name in self.val_acc and self.val_acc[e.name].n:
                self.strength[e.name] = self.val_acc[e.name].value
                self.strength_source[e.name] = "validation"

    def _per_question(self, name: str) -> list[list[ExpertResponse]]:
        return [[self.responses[(q.id, n)] for n in r.names]
                for q, r in zip(self.questions, self.routes_of[name])]

    def aggregate(self) -> None:
        """Each strategy's final answers. Aggregators that need generations get them from one
        executor call for all strategies."""
        jobs = {s.name: (self._aggregator(s), self.routes_of[s.name], self._per_question(s.name))
                for s in self.specs if s.name in self.routes_of and s.kind != "oracle"}
        self.finals = aggregate_together(self.questions, jobs,
                                         lambda requests: self._phase("aggregation", requests))
        if self.replay and not any(r.prompt_tokens or r.completion_tokens for (_, n), r in
                                   self.responses.items() if n in self.replay):
            self.notes.append("the replay records carry no token counts: tokens and cost of "
                              "replay experts show as 0")

    # -- 5. scores ----------------------------------------------------------------------------
    def score(self) -> tuple[list[StrategyScore], dict[str, list[Outcome]]]:
        scores, outcomes = [], {}
        for s in self.specs:
            if s.name not in self.routes_of:
                continue
            outcomes[s.name] = self._outcomes(s)
            score = score_strategy(s.name, s.description, outcomes[s.name], self.config,
                                   self.route_seconds.get(s.name, 0.0))
            if s.kind in ("single", "best-single"):
                score.recruit_oracle = Accuracy()  # same as the accuracy: not informative
            scores.append(score)
        return scores, outcomes

    def _outcomes(self, s: StrategySpec) -> list[Outcome]:
        rows = []
        for i, (q, route, resp) in enumerate(zip(self.questions, self.routes_of[s.name],
                                                 self._per_question(s.name))):
            any_right = None if gold_answer(q) is None else \
                any(bool(is_correct(r.answer, q)) for r in resp if r.error is None)
            if s.kind == "oracle":
                answer = gold_answer(q) if any_right else vote(resp, self.strength)[0]
                correct, note, agg_response = any_right, "", None
            else:
                final = self.finals[s.name][i]
                answer, note, agg_response = final.answer, final.note, final.response
                correct = is_correct(answer, q)
            failed = any(r.error is not None for r in resp) or \
                (agg_response is not None and agg_response.error is not None)
            if failed:
                correct = any_right = None
            rows.append(Outcome(question_id=q.id, category=q.category, answer=answer,
                                correct=correct, recruited=route.names, used=list(resp),
                                any_right=any_right, aggregator=agg_response, note=note,
                                failed=failed))
        return rows


def evaluate(config: PoolConfig, questions: list[Question],
             opts: EvalOptions | None = None) -> EvalResult:
    """Run every selected strategy over ``questions`` (which need gold answers)."""
    return EvaluationJob(config, questions, opts).run()
