"""One evaluation job: every strategy over the same questions, each generation made once.

The job
1. routes the questions for every strategy (routers are built with the public
   ``build_router``; a router that cannot be built for this pool is skipped with a note), on
   the test questions and, when ``best-single`` is asked for, on the validation questions;
2. takes the *union* of all (question, expert) pairs any strategy recruits on the test
   questions, plus every expert on the validation questions (best-single is picked there, and
   so every strategy can be scored there at no generation more), and hands it to the
   load-once executor (each model loaded once, identical requests made once, the response
   cache consulted first and filled as each generation finishes);
3. asks every ``llm`` aggregation strategy for its aggregation requests on both sets, runs
   all of them in one more executor call, and gives each strategy its own generations back;
4. scores each strategy on its own subset of the shared generations, on both sets;
5. compares each strategy with best-single, question by question, on both sets
   (``coe.apps.eval.compare``), and recommends one from the validation comparisons alone
   (``coe.apps.eval.recommend``).

The route, aggregate and score stages run on a ``QuestionSet`` (the test or the validation
questions, with what each stage leaves for them), so the validation scores are made exactly
as the test's. Aggregators are driven the way the orchestrator drives them: ``requests``
(what generations they need), one executor call for all of them, then ``aggregate`` with
those generations.

``EvaluationJob`` runs the stages in that order, one method each; ``evaluate`` is the job as a
function.

**Time and memory grow linearly with questions x experts**, and what is held per question is
small, so 100,000 questions x 8 replayed experts evaluate in well under 1 GiB:

- routes are ``RouteTable``s (expert indices and weights in arrays), outcomes are
  ``OutcomeTable``s, and the generations are one ``ResponseTable`` per question set: per
  (question, expert) the extracted answer, whether it is right, tokens, seconds and why it
  failed or was cut off. The generation's *text* is kept only when a strategy's aggregator
  may read it (anything but ``vote`` and ``single``: an ``llm`` aggregator builds its prompt
  from the responses) or ``keep_texts`` asks (``--record`` writes them);
- the expert generations are planned and run in the executor's ``stages``: with the local
  executor, one model's requests at a time (the models run one after another anyway, so no
  load is added), so the job never holds more than one model's requests and generations;
  each generation is reduced to its cell of the table as its stage returns. (An executor
  that runs every model at once, Ray, has one stage: it holds every generation of the phase
  until the phase ends.) Replay experts are sent requests without a prompt (their backend
  answers by question id), so none is built;
- aggregators that need no generation (``vote``, ``single``, the oracle's vote) see the
  questions in blocks of ``BLOCK``: the ``ExpertResponse`` objects they take are built for a
  block, then dropped. Aggregators that generate (``llm``) get every question of both sets
  at once, as their generations must be one executor call: their prompts hold the experts'
  texts;
- the comparisons read the outcome tables' arrays (a few boolean arrays per strategy);
- nothing per question is held for the report: ``outcomes.jsonl`` is written row by row from
  the tables.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from coe.aggregation import Aggregator, VoteAggregator, build_aggregator, vote
from coe.aggregation.base import aggregate_together
from coe.aggregation.single import SingleAggregator
from coe.apps.api import Orchestrator
from coe.apps.eval.compare import Comparison, compare, holm
from coe.apps.eval.recommend import Recommendation, recommend, recommended_pool
from coe.apps.eval.responses import ResponseTable
from coe.apps.eval.routes import NONE, RouteTable
from coe.apps.eval.scoring import Accuracy, OutcomeTable, StrategyScore, score_strategy
from coe.apps.eval.strategies import (
    StrategySpec,
    all_specs,
    has_categories,
    overlap,
    random_table,
    select,
    split_validation,
)
from coe.core.config import PoolConfig
from coe.core.errors import CoeError, ConfigError
from coe.core.types import ExpertResponse, Generation, GenRequest, Question
from coe.execution import PLAN_HEADER, RunStats, plan_row, plan_summary
from coe.routing import Router, build_router
from coe.routing.cascade import Cascade
from coe.text.answers import describe_ungraded, gold_answer, gold_problem
from coe.text.prompts import build_request

#: questions whose responses are built and aggregated at a time by the aggregators that
#: need no generation: a few megabytes of ``ExpertResponse`` objects, however many questions
BLOCK = 2048

#: expert requests handed to the executor in one run at most, when it keeps a model loaded
#: from one run to the next (the local executor): one model's share of 100,000 questions is
#: given in a few runs, so at most this many requests and generations are held at a time
CHUNK = 16384

#: questions routed by one ``Router.route`` call at most, when the executor keeps a model
#: loaded from one run to the next (a router may generate: skill keywords): the router's
#: ``Route`` objects for 100,000 questions are never all held at once
ROUTE_BLOCK = 8192

#: aggregators known to read only the experts' extracted answers: when every strategy's
#: aggregator is one of these, the job keeps no generation text
ANSWER_ONLY = (VoteAggregator, SingleAggregator)

#: the yaml router fields that hold what a router learned (``coe train-router``, ``coe profile``)
TRAINED_FILES = ("model_file", "profiles")



@dataclass
class EvalOptions:
    strategies: str | list[str] | None = None  # names or patterns; None: every available one
    validation: list[Question] | None = None  # picks best-single; else a seeded split
    validation_source: str = ""
    val_fraction: float = 0.5
    seed: int = 0
    random_k: int = 3
    #: cascades to evaluate (knn+learned~<budget>), average experts per question
    budgets: tuple[float, ...] = (2.0, 3.0)
    aggregator_expert: str | None = None  # for the llm strategies (default: yaml / route's)
    cache: bool | str | Path = True
    resume: bool = False
    progress: bool = False
    log: Callable[[str], None] | None = None
    keep_texts: bool = False  # keep every generation's text (``--record`` writes them)


@dataclass
class Phase:
    """One stage of the job: the expert generations (``validation``, ``experts``) or the
    aggregators' (``aggregation``), with what the executor calls made of it."""

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
class QuestionSet:
    """The questions the route, aggregate and score stages run on (the test questions or the
    validation questions) and what each stage leaves for them."""

    name: str  # test | validation
    questions: list[Question]
    ids: list[str] = field(default_factory=list)  # shared by every RouteTable of the set
    gold: list[str | None] = field(default_factory=list)  # normalised gold answers
    routes_of: dict[str, RouteTable] = field(default_factory=dict)  # strategy -> its routes
    route_seconds: dict[str, float] = field(default_factory=dict)
    responses: ResponseTable | None = None  # the experts' generations
    outcomes: dict[str, OutcomeTable] = field(default_factory=dict)
    scores: list[StrategyScore] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ids = [q.id for q in self.questions]
        self.gold = [gold_answer(q) for q in self.questions]


@dataclass
class EvalResult:
    config: PoolConfig
    questions: list[Question]
    specs: list[StrategySpec]
    scores: list[StrategyScore]
    #: strategy -> its outcome on each test question (a sequence of ``Outcome``)
    outcomes: dict[str, OutcomeTable]
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
    #: (question id, expert) -> ExpertResponse of the test and the validation questions
    #: (``ResponseTable``s; ``text`` is empty unless texts were kept)
    responses: Mapping[tuple[str, str], ExpertResponse] = field(default_factory=dict)
    val_responses: Mapping[tuple[str, str], ExpertResponse] = field(default_factory=dict)
    seed: int = 0
    notes: list[str] = field(default_factory=list)
    #: test question id -> why it cannot be graded (no gold answer, or one naming no answer)
    ungraded: dict[str, str] = field(default_factory=dict)
    #: test questions also among the validation questions (``strategies.overlap``); None when
    #: no validation questions were used
    validation_overlap: dict | None = None
    validation_failed: dict[str, int] = field(default_factory=dict)  # expert -> generations
    #: every strategy scored on the validation questions too (empty: no best-single)
    val_scores: list[StrategyScore] = field(default_factory=list)
    val_outcomes: dict[str, OutcomeTable] = field(default_factory=dict)
    #: question set (validation, test) -> strategy -> its comparison with best-single
    comparisons: dict[str, dict[str, Comparison]] = field(default_factory=dict)
    #: strategy -> why its validation figures may be in-sample (a router trained on them)
    in_sample: dict[str, str] = field(default_factory=dict)
    recommendation: Recommendation | None = None
    recommended_pool: dict | None = None  # the recommendation's pool yaml
    no_recommendation: str = ""  # why there is none

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

    def val_score(self, name: str) -> StrategyScore:
        return next(s for s in self.val_scores if s.name == name)

    def counts_line(self) -> str:
        s = self.stats
        return (f"generations: {s.generations} (replayed from records: {self.replayed}, "
                f"new model generations: {s.generations - self.replayed}), "
                f"cache hits: {s.cache_hits}, failed: {s.failed_generations}, "
                f"model loads: {s.loads} (naive per-question order: {s.naive_loads})")


def _log(opts: EvalOptions, msg: str) -> None:
    if opts.log:
        opts.log(msg)


@contextmanager
def _gc_skips_what_exists() -> Iterator[None]:
    """Leave the objects alive now (the questions: millions of small Python objects for
    100,000 questions) out of the cyclic garbage collector's scans until the block ends
    (``gc.freeze``, then ``gc.unfreeze``). The job makes and drops millions of short-lived
    objects (responses, routes, final answers); each full collection they trigger would walk
    every question again: at 100,000 questions x 8 experts that was 75 s of a 97 s
    aggregation. Nothing is collected any later than it would be: the frozen objects are
    the caller's, alive throughout."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _generates(agg: Aggregator) -> bool:
    """Whether the aggregator asks for generations of its own (overrides ``requests``)."""
    return type(agg).requests is not Aggregator.requests




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
        self.specs = select(all_specs(config, self.opts.random_k, self.opts.budgets),
                            self.opts.strategies)
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.validation: list[Question] = []
        self.val_source = ""
        self.orch: Orchestrator | None = None
        self.phases: list[Phase] = []
        self.test: QuestionSet | None = None  # the test questions and what they hold
        self.val: QuestionSet | None = None  # the validation questions (with best-single)
        self.router_k: dict[str, int | None] = {}  # router strategy -> the k it routed with
        self.cascade_of: dict[tuple, Cascade] = {}  # (router, k, budget) -> its cascade
        self.cascades: dict[str, Cascade] = {}  # cascade strategy -> its cascade
        self.in_sample: dict[str, str] = {}  # strategy -> why its validation is in-sample
        self.val_acc: dict[str, Accuracy] = {}
        self.val_failed: dict[str, int] = {}  # expert -> failed validation generations
        self.best: str | None = None
        self.strength: dict[str, float] = {}
        self.strength_source: dict[str, str] = {}
        self.ungraded: dict[str, str] = {}
        self.overlap: dict | None = None
        self.comparisons: dict[str, dict[str, Comparison]] = {}
        self.recommendation: Recommendation | None = None
        self.recommended_pool: dict | None = None
        self.no_recommendation = ""

    @property
    def sets(self) -> list[QuestionSet]:
        """The question sets the stages run on: validation (if any) first, then test."""
        return [s for s in (self.val, self.test) if s is not None]

    def run(self) -> EvalResult:
        t0 = time.perf_counter()
        self.check()
        self.hold_out_validation()
        self.check_overlap()
        self.find_ungraded()
        with _gc_skips_what_exists(), \
                Orchestrator(self.config, router="all", aggregator="vote", cache=self.opts.cache,
                             progress=self.opts.progress) as orch, \
                orch.executor.session() as stats:
            self.orch = orch
            if self.opts.resume:
                _log(self.opts, "resuming: generations already in the response cache are not redone")
            self.route_strategies()
            self.answer_experts()
            self.run_cascades()
            self.break_ties()
            self.aggregate()
        for qs in self.sets:
            self.score(qs)
        self.compare()
        self.recommend()
        test, val = self.test, self.val
        kept = [s for s in self.specs if s.name in test.routes_of]
        return EvalResult(
            config=self.config, questions=test.questions, specs=kept, scores=test.scores,
            outcomes=test.outcomes, skipped={s.name: self.skipped[s.name] for s in self.specs
                                             if s.name in self.skipped},
            validation=self.validation, validation_source=self.val_source,
            validation_accuracy=self.val_acc, best_single=self.best, strength=self.strength,
            strength_source=self.strength_source, stats=stats, phases=self.phases,
            wall_seconds=time.perf_counter() - t0, responses=test.responses,
            val_responses=val.responses if val is not None else {},
            seed=self.opts.seed, notes=self.notes, ungraded=self.ungraded,
            validation_overlap=self.overlap, validation_failed=self.val_failed,
            val_scores=val.scores if val is not None else [],
            val_outcomes=val.outcomes if val is not None else {},
            comparisons=self.comparisons, in_sample=self.in_sample,
            recommendation=self.recommendation, recommended_pool=self.recommended_pool,
            no_recommendation=self.no_recommendation)

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
        """The questions best-single is picked on (and every strategy is also scored on):
        ``--validation``, else a seeded split of the question file (then left out of the
        test)."""
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
            self.notes.append(f"best-single is picked on {self.val_source}; the test figures "
                              f"are over the {len(self.questions)} test questions only")
        else:
            self.skipped["best-single"] = "no validation questions (--validation or --val-fraction)"
        if not self.questions:
            raise CoeError("no test questions left to score")
        self.test = QuestionSet("test", self.questions)
        if self.validation:
            self.val = QuestionSet("validation", self.validation)

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
                    f"(same id: {o['same_id']}, same text: {o['same_text']}); best-single and "
                    "the recommendation are chosen partly on the test questions")
            self.notes.insert(0, note)
            _log(self.opts, note)

    def find_ungraded(self) -> None:
        """The test questions no strategy can be graded on, and why."""
        self.ungraded = {q.id: gold_problem(q) or "no gold answer"
                         for q, g in zip(self.test.questions, self.test.gold) if g is None}

    # -- 2. routes --------------------------------------------------------------------------
    def route_strategies(self) -> None:
        """The routes of every strategy on every question set (best-single's come with its
        pick). A router that cannot serve this pool, or a model-using aggregator that would be
        a replay, is skipped with why."""
        routed: dict[tuple[str, int | None], tuple[dict | None, str, str]] = {}
        for s in self.specs:
            if s.name in self.skipped or s.kind == "best-single":
                continue
            if s.kind in ("single", "random", "oracle"):
                for qs in self.sets:
                    qs.routes_of[s.name] = self._fixed_routes(s, qs)
                continue
            k = s.k or (None if s.router == "all" else self.config.router.k)
            if s.budget is not None and s.k is None and self.config.router.budget is None:
                k = None  # a cascade the yaml does not set: its depth is chosen on validation
            key = (s.router, k, s.budget)
            if key not in routed:
                routed[key] = self._route_with(s.router, k, s.budget)
            tables, why, in_sample = routed[key]
            why = (why or self._replayed_aggregator(s, [t for t, _ in tables.values()])
                   or self._untrained_aggregator(s))
            if why:
                self.skipped[s.name] = why
                continue
            for qs in self.sets:
                qs.routes_of[s.name], qs.route_seconds[s.name] = tables[qs.name]
            self.router_k[s.name] = k
            if key in self.cascade_of:
                self.cascades[s.name] = self.cascade_of[key]
                self.router_k[s.name] = self.cascade_of[key].max_experts
            if in_sample:
                self.in_sample[s.name] = in_sample

    def _fixed_routes(self, s: StrategySpec, qs: QuestionSet) -> RouteTable:
        if s.kind == "single":
            return RouteTable.fixed(qs.ids, self.names, [s.expert], "single expert",
                                    confidence=1.0)
        if s.kind == "random":
            return random_table(qs.ids, self.names, s.k, self.opts.seed)
        return RouteTable.fixed(qs.ids, self.names, self.names, "every expert (oracle)")

    def _route_with(self, kind: str, k: int | None,
                    budget: float | None = None) -> tuple[dict | None, str, str]:
        """({question set: (routes, seconds)}, why the router is unavailable ("" if it is
        not), why its validation routes may be in-sample ("" if they may not)). With
        ``budget``, the router cascades: its routes are every recruit a question may ask,
        and its ``Cascade`` is kept in ``cascade_of``."""
        if kind == "category" and not has_categories(self.config):
            return None, "the pool declares no categories", ""
        config = self.config
        if budget is not None:
            config = config.model_copy(update={"router": config.router.model_copy(
                update={"budget": budget, "k": k})})
        try:
            router = build_router(kind, config, self.orch.executor, k)
            if budget is not None:
                if getattr(router, "cascade", None) is None:
                    raise ConfigError(f"the {kind} router does not cascade")
                self.cascade_of[(kind, k, budget)] = router.cascade
            tables = {qs.name: self._route_set(router, qs) for qs in self.sets}
        except Exception as e:  # an unavailable or unfit router: skip, say why
            return None, f"{kind} router unavailable: {type(e).__name__}: {e}", ""
        in_sample = ("" if self.val is None
                     else self._trained_on(kind, k, router, tables["validation"][0]))
        return tables, "", in_sample

    def _route_set(self, router: Router, qs: QuestionSet) -> tuple[RouteTable, float]:
        """The router's routes of one question set, in blocks, and the seconds they took."""
        ex, n = self.orch.executor, len(qs.questions)
        step = ROUTE_BLOCK if ex.keeps_loaded else max(n, 1)
        blocks, secs = [], 0.0
        for start in range(0, n, step):
            t0 = time.perf_counter()
            routes = router.route(qs.questions[start:start + step])
            secs += time.perf_counter() - t0
            blocks.append(RouteTable.of(qs.ids[start:start + step], self.names, routes,
                                        unknown=self.config.expert))
        return RouteTable.concat(qs.ids, blocks), secs

    def _trained_on(self, kind: str, k: int | None, router: Router,
                    val_routes: RouteTable) -> str:
        """Why the router's validation routes may be in-sample ("" if not): it reads a trained
        file of the yaml (``router.model_file``, ``router.profiles``: without the file it
        routes otherwise, or cannot route) and does not say it scores the questions it was
        trained on out-of-fold (``Router.cross_fitted``). Whether the file was trained on
        these validation questions is not known here: the note says it may have been."""
        files = {f: v for f in TRAINED_FILES if (v := getattr(self.config.router, f, None))}
        if getattr(router, "cross_fitted", False):
            return ""
        used = [f"router.{f} ({v})" for f, v in files.items()
                if not self._routes_without(f, kind, k, val_routes)]
        if not used:
            return ""
        return (f"the {kind} router routes by {' and '.join(used)} and does not score the "
                "questions it was trained on out-of-fold (Router.cross_fitted is false): if "
                "that was trained on these validation questions, its validation figures are "
                "in-sample (optimistic)")

    def _routes_without(self, field: str, kind: str, k: int | None,
                        val_routes: RouteTable) -> bool:
        """Whether the router routes the validation questions as it did with the yaml's
        ``router.<field>`` unset (False: it fails or routes otherwise: it uses the file)."""
        bare = self.config.model_copy(update={"router": self.config.router.model_copy(
            update={field: None})})
        try:
            plain, _ = self._route_set(build_router(kind, bare, self.orch.executor, k), self.val)
        except Exception:  # it needs the file
            return False
        return (np.array_equal(plain.experts, val_routes.experts)
                and np.array_equal(plain.weights, val_routes.weights))

    def _aggregator(self, spec: StrategySpec) -> Aggregator:
        return build_aggregator(spec.aggregator, self.config, strength=self.strength,
                                expert=self.opts.aggregator_expert)

    def _untrained_aggregator(self, spec: StrategySpec) -> str:
        """Why a strategy whose aggregator lacks its trained part (the learned selector) is
        skipped: it would only repeat another strategy (the learned aggregator votes)."""
        why = getattr(self._aggregator(spec), "fallback", "")
        return f"the {spec.aggregator} aggregator is not trained: {why}" if why else ""

    def _replayed_aggregator(self, spec: StrategySpec, tables: list[RouteTable]) -> str:
        """Why a strategy whose aggregator would generate with a replay expert is skipped."""
        agg = self._aggregator(spec)
        replayed = sorted({n for t in tables for n in agg.experts(t)} & self.replay)
        if not replayed:
            return ""
        return (f"the {spec.aggregator} aggregator would be a replay expert "
                f"({', '.join(replayed)}), which can only repeat its recorded answers "
                f"(use --aggregator-expert)")

    # -- 3. expert generations: the union, made once ------------------------------------------
    def _keep_texts(self) -> bool:
        """Whether generation texts are kept: asked for, or some strategy's aggregator may
        read them (anything but vote and single, which read the extracted answers)."""
        return self.opts.keep_texts or any(
            not isinstance(self._aggregator(s), ANSWER_ONLY) for s in self.specs
            if s.name in self.test.routes_of and s.kind not in ("oracle", "best-single"))

    def _union(self) -> np.ndarray:
        """Test questions x experts: the generations some strategy needs."""
        need = np.zeros((len(self.test.questions), len(self.names)), bool)
        for name, routes in self.test.routes_of.items():
            if name not in self.cascades:  # a cascade's generations are asked round by round
                need |= routes.mask()
        return need

    def answer_experts(self) -> None:
        """Every (question, expert) pair any strategy needs, plus every expert on the
        validation questions for best-single, made once. When best-single's pick would add
        test generations no other strategy needs, validation runs first."""
        best_spec = next((s for s in self.specs if s.kind == "best-single"
                          and s.name not in self.skipped), None)
        keep = self._keep_texts()
        test, val = self.test, self.val
        test.responses = ResponseTable(test.questions, self.names, test.gold, keep)
        every = np.ones((len(self.validation), len(self.names)), bool)
        if val is not None:
            val.responses = ResponseTable(val.questions, self.names, val.gold, keep)
        need = self._union()
        val_need = every if val is not None else every[:0]
        if best_spec and not need.all():
            self._generate("validation", [(val.responses, every)])
            self.pick_best(best_spec)
            need, val_need = self._union(), every[:0]
        parts = [(test.responses, need)]
        if len(val_need):
            parts.insert(0, (val.responses, val_need))
        self._generate("experts", parts, last=self._aggregation_model())
        if best_spec and self.best is None:
            self.pick_best(best_spec)

    def run_cascades(self) -> None:
        """Each cascade strategy's rounds on every set (``coe.routing.cascade``): its questions ask
        their first recruit, then the unsure ones their next, one ``_generate`` per round
        (only what no other strategy already made); its routes become the recruits asked."""
        for name, cascade in self.cascades.items():
            for qs in self.sets:
                qs.routes_of[name] = self._cascade(name, cascade, qs)

    def _cascade(self, name: str, cascade: Cascade, qs: QuestionSet) -> RouteTable:
        full = qs.routes_of[name]
        length = (full.experts != NONE).sum(axis=1)
        count = np.minimum(length, 1)
        slots = np.arange(full.experts.shape[1])[None, :]

        def asked() -> RouteTable:
            return RouteTable(full.ids, full.names,
                              np.where(slots < count[:, None], full.experts, NONE),
                              full.weights, full.info, full.values)

        while True:
            table = asked()
            need = table.mask() & ~qs.responses.has
            if need.any():
                self._generate(f"cascade {name}", [(qs.responses, need)])
            todo = np.flatnonzero(count < length)
            if not len(todo):
                return table
            asked_now = count[todo]
            rows = np.repeat(todo, asked_now)
            cols = np.concatenate([table.experts[i, :c] for i, c in zip(todo, asked_now)])
            built = iter(qs.responses.responses(rows, cols))
            resp = [[next(built) for _ in range(c)] for c in asked_now.tolist()]
            unsure = cascade.open_questions([qs.questions[i] for i in todo], count[todo].tolist(),
                                            length[todo].tolist(), resp)
            if not unsure:
                return table
            count[todo[unsure]] += 1

    def pick_best(self, spec: StrategySpec) -> None:
        """The expert most accurate on the validation questions (ties: the stronger prior,
        then pool order) becomes best-single's route. A failed generation is left out of the
        expert's validation accuracy (as on the test) but counts against it in the pick: an
        expert that could not answer is not the one to rely on."""
        v = self.val.responses
        ok = v.has & ~v.failed
        for j, n in enumerate(self.names):
            failed = int((v.has[:, j] & v.failed[:, j]).sum())
            if failed:
                self.val_failed[n] = self.val_failed.get(n, 0) + failed
            acc = self.val_acc.setdefault(n, Accuracy())
            acc.correct += int((ok[:, j] & (v.right[:, j] == 1)).sum())
            acc.n += int((ok[:, j] & (v.right[:, j] >= 0)).sum())
        prior = {e.name: e.strength or 0.0 for e in self.config.experts}
        rank_of = {n: i for i, n in enumerate(self.names)}

        def rank(n: str) -> tuple:
            a, tried = self.val_acc[n], self.val_acc[n].n + self.val_failed.get(n, 0)
            return a.correct / tried if tried else 0.0, prior[n], -rank_of[n]

        self.best = max(self.names, key=rank)
        for qs in self.sets:
            qs.routes_of[spec.name] = RouteTable.fixed(qs.ids, self.names, [self.best],
                                                       f"best on validation: {self.best}",
                                                       confidence=1.0)
        best, failed = self.val_acc[self.best], self.val_failed.get(self.best, 0)
        spec.description = (f"{self.best} (validation accuracy "
                            + ("-" if best.value is None else f"{best.value:.1%}")
                            + f" on {best.n}" + (f", {failed} failed" if failed else "") + ")")

    def _aggregation_model(self) -> str | None:
        """The model most aggregations will use: its weights go last and stay loaded."""
        used: Counter = Counter()
        for s in self.specs:
            if s.name in self.test.routes_of and s.kind != "oracle":
                used += self._aggregator(s).experts(self.test.routes_of[s.name])
        top = used.most_common(1)
        return top[0][0] if top else None


    @staticmethod
    def _request(q: Question, cfg, promptless: bool) -> GenRequest:
        if promptless:  # a replay answers by question id: no prompt to build
            return GenRequest(expert=cfg.name, question_id=q.id, sampling=cfg.sampling)
        return build_request(cfg, q)

    def _generate(self, name: str, parts: list[tuple[ResponseTable, np.ndarray]],
                  last: str | None = None) -> None:
        """One phase of expert generations: the cells of each (table, questions x experts
        mask), planned and run stage by stage (``Executor.stages``: one model at a time for
        the local executor, so no load is added) and, where the executor keeps a model loaded
        from one run to the next, in runs of at most ``CHUNK`` requests; each run's
        generations go into their tables as it returns, then are dropped. The plan table is
        logged a stage at a time, once the stage has run; a ``Phase`` records the totals."""
        t0 = time.perf_counter()
        ex = self.orch.executor
        wanted = np.zeros(len(self.names), bool)
        for _, mask in parts:
            wanted |= mask.any(axis=0)
        experts = [n for n, w in zip(self.names, wanted) if w]
        col = {n: j for j, n in enumerate(self.names)}
        configs = {col[n]: self.config.expert(n) for n in experts}
        promptless = {col[n]: not ex.backend_for(n).uses_prompt for n in experts}
        phase = Phase(name)
        duplicates = loads = 0
        header = [PLAN_HEADER]
        for stage in ex.stages(experts, last=last):
            cols = sorted(col[n] for n in stage)  # each question's experts in pool order
            cells = []  # (table, question, expert) of every request of the stage, in order
            for table, mask in parts:
                rows, which = np.nonzero(mask[:, cols])
                cells += zip([table] * len(rows), rows.tolist(),
                             np.asarray(cols)[which].tolist())
            step = CHUNK if ex.keeps_loaded else max(len(cells), 1)
            groups: dict[tuple, list] = {}  # load key -> [label, experts, jobs, cached]
            for start in range(0, len(cells), step):
                chunk = cells[start:start + step]
                requests = [self._request(t.questions[i], configs[j], promptless[j])
                            for t, i, j in chunk]
                plan = ex.plan(requests, last=last)
                done = ex.run(requests, plan)
                gens: list[Generation] = done.generations
                for table in {id(t): t for t, _, _ in chunk}.values():
                    mine = [k for k, (t, _, _) in enumerate(chunk) if t is table]
                    table.fill([chunk[k][1] for k in mine], [chunk[k][2] for k in mine],
                               [gens[k] for k in mine])
                unique = [i for g in plan.groups for i in g.indices]
                phase.requests += len(requests)
                phase.unique += len(unique)
                phase.cached += len(plan.hits)
                phase.generations += done.stats.generations
                phase.failed += done.stats.failed_generations
                phase.loads += done.stats.loads
                phase.replayed += sum(1 for i in unique if requests[i].expert in self.replay
                                      and gens[i].error is None and not gens[i].cached)
                duplicates += len(plan.same_as)
                for g in plan.groups:
                    row = groups.setdefault(g.key, [g.label, g.experts, 0, 0])
                    row[2] += len(g.indices)
                    row[3] += g.cached
            loads += sum(1 for _, _, jobs, cached in groups.values() if jobs > cached)
            _log(self.opts, "\n".join(f"[{name}] {line}" for line in
                                      header + [plan_row(*row) for row in groups.values()]))
            header = []
        if phase.requests:
            _log(self.opts, f"[{name}] " + plan_summary(phase.requests, duplicates, phase.cached,
                                                       loads, phase.requests))
        phase.seconds = time.perf_counter() - t0
        self.phases.append(phase)

    def _phase(self, name: str, requests: list[GenRequest]) -> list[Generation]:
        """One executor call of the job (the aggregators' generations), recorded as a
        ``Phase``."""
        t0 = time.perf_counter()
        ex = self.orch.executor
        plan = ex.plan(requests)
        unique = [i for g in plan.groups for i in g.indices]
        phase = Phase(name, requests=len(requests), unique=len(unique), cached=len(plan.hits))
        if requests:
            _log(self.opts, f"[{name}] " + plan.describe().replace("\n", f"\n[{name}] "))
        done = ex.run(requests, plan) if requests else None
        if done is not None:
            phase.generations = done.stats.generations
            phase.failed = done.stats.failed_generations
            phase.loads = done.stats.loads
            phase.replayed = sum(1 for i in unique if requests[i].expert in self.replay
                                 and done.generations[i].error is None
                                 and not done.generations[i].cached)
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

    @staticmethod
    def _cells(qs: QuestionSet, start: int, end: int) -> dict[tuple[int, int], ExpertResponse]:
        """The responses of questions start..end-1, by (question, expert) index: built once
        for every strategy that uses them."""
        rows, cols = np.nonzero(qs.responses.has[start:end])
        rows += start
        return dict(zip(zip(rows.tolist(), cols.tolist()),
                        qs.responses.responses(rows, cols)))

    @staticmethod
    def _responses(routes: RouteTable, start: int, end: int,
                   cells: dict[tuple[int, int], ExpertResponse]) -> list[list[ExpertResponse]]:
        """The responses of questions start..end-1's recruits, in route order."""
        return [[cells[(i, j)] for j in row if j != NONE]
                for i, row in zip(range(start, end), routes.experts[start:end].tolist())]

    def aggregate(self) -> None:
        """Each strategy's final answers on every question set, into its ``OutcomeTable``s.
        Aggregators that generate get every question of every set at once (validation then
        test) and one executor call for all of them, so the aggregator models load once; the
        others (and the oracle) take the questions a block at a time, set by set."""
        specs = [s for s in self.specs if s.name in self.test.routes_of]
        aggs = {s.name: self._aggregator(s) for s in specs if s.kind != "oracle"}
        generating = {n: a for n, a in aggs.items() if _generates(a)}
        for qs in self.sets:
            qs.outcomes = {s.name: OutcomeTable(qs.routes_of[s.name], qs.responses)
                           for s in specs}
        if generating:
            self._aggregate_generating(generating)
        for qs in self.sets:
            self._aggregate_blocks(qs, specs, aggs, generating)

    def _aggregate_generating(self, generating: dict[str, Aggregator]) -> None:
        """The generating aggregators over the questions of every set, one after the other,
        in one ``aggregate_together`` call (one executor call, phase ``aggregation``)."""
        questions: list[Question] = []
        jobs = {name: (agg, [], []) for name, agg in generating.items()}
        for qs in self.sets:
            n = len(qs.questions)
            questions += qs.questions
            cells = self._cells(qs, 0, n)
            for name, (_, routes, responses) in jobs.items():
                routes += qs.routes_of[name][:]
                responses += self._responses(qs.routes_of[name], 0, n, cells)
            del cells
        finals = aggregate_together(questions, jobs,
                                    lambda requests: self._phase("aggregation", requests))
        start = 0
        for qs in self.sets:
            end = start + len(qs.questions)
            for name, fs in finals.items():
                mine = fs[start:end]
                qs.outcomes[name].set_answers(0, [f.answer for f in mine],
                                              [f.note for f in mine],
                                              [f.response for f in mine])
            start = end

    def _aggregate_blocks(self, qs: QuestionSet, specs: list[StrategySpec],
                          aggs: dict[str, Aggregator], generating: dict[str, Aggregator]) -> None:
        """The other strategies' final answers on one set, a block of questions at a time,
        then every strategy's grading."""
        n = len(qs.questions)
        oracle_right = next((qs.outcomes[s.name].recruit_right() for s in specs
                             if s.kind == "oracle"), None)
        for start in range(0, n, BLOCK):
            end = min(start + BLOCK, n)
            cells = self._cells(qs, start, end)
            for s in specs:
                if s.name in generating:
                    continue
                routes, out = qs.routes_of[s.name], qs.outcomes[s.name]
                resp = self._responses(routes, start, end, cells)
                if s.kind == "oracle":  # the gold answer when a recruit has it, else the vote
                    right = oracle_right[start:end].tolist()
                    answers = [qs.gold[i] if ok else vote(rs, self.strength)[0]
                               for i, ok, rs in zip(range(start, end), right, resp)]
                    out.set_answers(start, answers, [""] * len(answers))
                    continue
                finals = aggs[s.name].aggregate(qs.questions[start:end], routes[start:end],
                                                resp, None)
                out.set_answers(start, [f.answer for f in finals], [f.note for f in finals],
                                [f.response for f in finals])
        for s in specs:
            qs.outcomes[s.name].finish(oracle=s.kind == "oracle")
        t = qs.responses
        replay_cols = [j for j, n in enumerate(self.names) if n in self.replay]
        if qs is self.test and replay_cols and not (
                (t.prompt_tokens[:, replay_cols] > 0)
                | (t.completion_tokens[:, replay_cols] > 0)).any():
            self.notes.append("the replay records carry no token counts: tokens and cost of "
                              "replay experts show as 0")

    # -- 5. scores, comparisons, recommendation ----------------------------------------------
    def score(self, qs: QuestionSet) -> None:
        qs.scores = []
        for s in self.specs:
            if s.name not in qs.routes_of:
                continue
            score = score_strategy(s.name, s.description, qs.outcomes[s.name], self.config,
                                   qs.route_seconds.get(s.name, 0.0))
            if s.kind in ("single", "best-single"):
                score.recruit_oracle = Accuracy()  # same as the accuracy: not informative
            qs.scores.append(score)

    def _reference(self) -> str | None:
        return next((s.name for s in self.specs
                     if s.kind == "best-single" and self.val is not None
                     and s.name in self.val.outcomes), None)

    def compare(self) -> None:
        """Every strategy against best-single, question by question, on each question set;
        Holm's correction across the strategies of a set (``coe.apps.eval.compare``)."""
        ref = self._reference()
        if ref is None:
            return
        for qs in self.sets:
            base = qs.outcomes[ref].correct
            self.comparisons[qs.name] = holm({
                name: compare(out.correct == 1, out.correct >= 0, base == 1, base >= 0,
                              seed=self.opts.seed)
                for name, out in qs.outcomes.items() if name != ref})

    def recommend(self) -> None:
        """The strategy to deploy, from the validation comparisons alone, and its pool yaml."""
        ref = self._reference()
        if ref is None:
            self.no_recommendation = ("no recommendation: it needs best-single and validation "
                                      "questions (--strategies without best-single, or no "
                                      "--validation / --val-fraction 0)")
            return
        specs = [s for s in self.specs if s.name in self.val.outcomes]
        # a strategy whose validation figures may be in-sample is not recommended on them
        rec = recommend([s for s in specs if s.name not in self.in_sample],
                        {s.name: s for s in self.val.scores}, self.comparisons["validation"], ref)
        rec.not_recommendable.update(
            {n: f"its validation figures may be in-sample: {why}" for n, why in self.in_sample.items()
             if n in self.val.outcomes})
        spec = next(s for s in specs if s.name == rec.strategy)
        one = [self.best] if spec.kind == "best-single" else [spec.expert] if spec.expert else None
        self.recommendation = rec
        self.recommended_pool = recommended_pool(
            self.config, spec, k=self.router_k.get(spec.name), experts=one,
            strength=self.strength, aggregator_expert=self.opts.aggregator_expert)


def evaluate(config: PoolConfig, questions: list[Question],
             opts: EvalOptions | None = None) -> EvalResult:
    """Run every selected strategy over ``questions`` (which need gold answers)."""
    return EvaluationJob(config, questions, opts).run()
