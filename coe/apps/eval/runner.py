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

The route, generate, cascade and aggregate stages are the pipeline's (``coe.pipeline``: the
same functions ``coe run`` and ``coe serve`` answer with), run here over every strategy at
once on a ``QuestionSet`` (the test or the validation questions, with what each stage leaves
for them), so the validation scores are made exactly as the test's.

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
- the expert generations are planned and run in the executor's ``stages``
  (``coe.pipeline.generate``): with the local executor, one model's requests at a time (the
  models run one after another anyway, so no load is added), so the job never holds more than
  one model's requests and generations; each generation is reduced to its cell of the table
  as its stage returns. (An executor
  that runs every model at once, Ray, has one stage: it holds every generation of the phase
  until the phase ends.) Replay experts are sent requests without a prompt (their backend
  answers by question id), so none is built;
- aggregators that need no generation (``vote``, ``single``, the oracle's vote) see the
  questions in blocks (``coe.pipeline.aggregate.BLOCK``): the ``ExpertResponse`` objects they
  take are built for a block, then dropped. Aggregators that generate (``llm``) get every question of both sets
  at once, as their generations must be one executor call: their prompts hold the experts'
  texts;
- the comparisons read the outcome tables' arrays (a few boolean arrays per strategy);
- nothing per question is held for the report: ``outcomes.jsonl`` is written row by row from
  the tables.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from coe.aggregation import Aggregator, build_aggregator, vote
from coe.apps.eval.compare import Comparison
from coe.apps.eval.recommend import Recommendation
from coe.apps.eval.result import EvalOptions, EvalResult, QuestionSet
from coe.apps.eval.scoring import Accuracy, OutcomeTable
from coe.apps.eval.strategies import (
    StrategySpec,
    all_specs,
    overlap,
    overlap_notes,
    select,
    split_validation,
)
from coe.apps.eval.strategy_routes import route_strategies
from coe.apps.eval.verdict import compare_all, recommend_one, score
from coe.core.config import PoolConfig
from coe.core.errors import CoeError, ConfigError
from coe.core.registry import BACKENDS
from coe.core.types import FinalAnswer, Generation, GenRequest, Question
from coe.execution import Executor, build_executor
from coe.io.cache import open_cache
from coe.pipeline import aggregate as aggregate_stage
from coe.pipeline.aggregate import Job, aggregate, build_cells, expected_experts
from coe.pipeline.cascade import CascadeJob, run_cascades
from coe.pipeline.generate import Cells, Generator, Phase
from coe.pipeline.responses import ResponseTable
from coe.pipeline.routes import RouteTable
from coe.routing.cascade import Cascade
from coe.text.answers import describe_ungraded, gold_answer, gold_problem

__all__ = ["EvalOptions", "EvalResult", "EvaluationJob", "Phase", "QuestionSet", "evaluate"]


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



class EvaluationJob:
    """Every selected strategy over ``questions`` (which need gold answers). ``run`` calls the
    stages in order; each reads what the previous ones left on the job."""

    def __init__(self, config: PoolConfig, questions: list[Question],
                 opts: EvalOptions | None = None):
        self.config = config
        self.opts = opts or EvalOptions()
        self.questions = list(questions)
        self.names = [e.name for e in config.experts]
        self.replay = {e.name for e in config.experts
                       if BACKENDS.get(e.backend).capabilities_for(e).replay_only}
        self.specs = select(all_specs(config, self.opts.random_k, self.opts.budgets),
                            self.opts.strategies)
        self.skipped: dict[str, str] = {}
        self.notes: list[str] = []
        self.validation: list[Question] = []
        self.val_source = ""
        self.executor: Executor | None = None
        self.gen: Generator | None = None
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
        cache = open_cache(self.config, self.opts.cache)
        self.executor = build_executor(self.config, cache=cache, progress=self.opts.progress)
        try:
            with _gc_skips_what_exists(), self.executor.session() as stats:
                self.gen = Generator(self.executor, self.config, self.opts.log)
                if self.opts.resume:
                    _log(self.opts, "resuming: generations already in the response cache are "
                                    "not redone")
                route_strategies(self)
                self.answer_experts()
                self.run_cascades()
                self.break_ties()
                self.aggregate()
        finally:
            self.executor.close()
            if cache is not None:
                cache.close()
        for qs in self.sets:
            score(self, qs)
        compare_all(self)
        recommend_one(self)
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
        for note in overlap_notes(self.overlap, self.val_source, len(self.questions)):
            self.notes.insert(0, note)
            _log(self.opts, note)

    def find_ungraded(self) -> None:
        """The test questions no strategy can be graded on, and why."""
        self.ungraded = {q.id: gold_problem(q) or "no gold answer"
                         for q, g in zip(self.test.questions, self.test.gold) if g is None}


    def _aggregator(self, spec: StrategySpec) -> Aggregator:
        return build_aggregator(spec.aggregator, self.config, strength=self.strength,
                                expert=self.opts.aggregator_expert)

    # -- 3. expert generations: the union, made once ------------------------------------------
    def _keep_texts(self) -> bool:
        """Whether generation texts are kept: asked for, or some strategy's aggregator reads
        them (``Aggregator.reads_text``: not vote, single or learned, which read the extracted
        answers)."""
        return self.opts.keep_texts or any(
            self._aggregator(s).reads_text for s in self.specs
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
        """Every cascade strategy's rounds on every set at once (the pipeline's cascade stage):
        their questions ask their first recruit, then the unsure ones their next, one generate
        call per round (only what no other strategy already made); their routes become the
        recruits asked."""
        jobs = [(name, qs) for name in self.cascades for qs in self.sets]
        if not jobs:
            return
        done, phases = run_cascades(self.gen, [CascadeJob(self.cascades[name], qs.routes_of[name],
                                                          qs.responses) for name, qs in jobs])
        self.phases += phases
        for (name, qs), routes in zip(jobs, done):
            qs.routes_of[name] = routes

    def _generate(self, name: str, parts: list[tuple[ResponseTable, np.ndarray]],
                  last: str | None = None) -> None:
        """One phase of expert generations (the pipeline's generate stage, in stages)."""
        self.phases.append(self.gen.generate([Cells(t, m) for t, m in parts], name=name,
                                             last=last))

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
        top = expected_experts([Job(self._aggregator(s), self.test.routes_of[s.name],
                                    self.test.responses)
                                for s in self.specs
                                if s.name in self.test.routes_of and s.kind != "oracle"]
                               ).most_common(1)
        return top[0][0] if top else None

    # -- 4. tie-breaks and aggregation --------------------------------------------------------
    def break_ties(self) -> None:
        """Vote ties go to the stronger expert: the yaml's strength, else validation accuracy."""
        for e in self.config.experts:
            if e.strength is not None:
                self.strength[e.name], self.strength_source[e.name] = e.strength, "yaml"
            elif e.name in self.val_acc and self.val_acc[e.name].n:
                self.strength[e.name] = self.val_acc[e.name].value
                self.strength_source[e.name] = "validation"

    def aggregate(self) -> None:
        """Each strategy's final answers on every question set, into its ``OutcomeTable``s:
        the pipeline's aggregate stage over every (strategy, set) at once, so the generating
        aggregators' models load once for both sets; the oracle apart, block by block."""
        specs = [s for s in self.specs if s.name in self.test.routes_of]
        jobs: list[Job] = []
        outs: list[OutcomeTable] = []
        for qs in self.sets:
            qs.outcomes = {s.name: OutcomeTable(qs.routes_of[s.name], qs.responses)
                           for s in specs}
        aggs = {s.name: self._aggregator(s) for s in specs if s.kind != "oracle"}
        for qs in self.sets:
            for s in specs:
                if s.kind != "oracle":
                    jobs.append(Job(aggs[s.name], qs.routes_of[s.name], qs.responses))
                    outs.append(qs.outcomes[s.name])

        def sink(k: int, start: int, finals: list[FinalAnswer]) -> None:
            outs[k].set_answers(start, [f.answer for f in finals], [f.note for f in finals],
                                [f.response for f in finals])

        aggregate(jobs, sink, self._aggregation_call)
        for qs in self.sets:
            oracle = next((s for s in specs if s.kind == "oracle"), None)
            if oracle is not None:
                self._oracle(qs, qs.outcomes[oracle.name])
            for s in specs:
                qs.outcomes[s.name].finish(oracle=s.kind == "oracle")
        t = self.test.responses
        replay_cols = [j for j, n in enumerate(self.names) if n in self.replay]
        if replay_cols and not ((t.prompt_tokens[:, replay_cols] > 0)
                                | (t.completion_tokens[:, replay_cols] > 0)).any():
            self.notes.append("the replay records carry no token counts: tokens and cost of "
                              "replay experts show as 0")

    def _oracle(self, qs: QuestionSet, out: OutcomeTable) -> None:
        """The gold answer where a recruit has it, else the vote: block by block."""
        right = out.recruit_right()
        job = Job(None, out.routes, qs.responses)
        block = aggregate_stage.BLOCK
        for start in range(0, len(qs.questions), block):
            end = min(start + block, len(qs.questions))
            resp = job.responses(start, end, build_cells(qs.responses, list(range(start, end))))
            answers = [qs.gold[i] if ok else vote(rs, self.strength)[0]
                       for i, ok, rs in zip(range(start, end), right[start:end].tolist(), resp)]
            out.set_answers(start, answers, [""] * len(answers))

    def _aggregation_call(self, requests: list[GenRequest], on_token=None) -> list[Generation]:
        """The aggregators' generations: one executor call, recorded as a ``Phase``."""
        t0 = time.perf_counter()
        ex, name = self.executor, "aggregation"
        plan = ex.plan(requests)
        unique = [i for g in plan.groups for i in g.indices]
        phase = Phase(name, requests=len(requests), unique=len(unique), cached=len(plan.hits))
        _log(self.opts, f"[{name}] " + plan.describe().replace("\n", f"\n[{name}] "))
        done = ex.run(requests, plan)
        phase.generations = done.stats.generations
        phase.failed = done.stats.failed_generations
        phase.loads = done.stats.loads
        phase.replayed = sum(1 for i in unique if requests[i].expert in self.replay
                             and done.generations[i].error is None
                             and not done.generations[i].cached)
        phase.seconds = time.perf_counter() - t0
        self.phases.append(phase)
        return done.generations


def evaluate(config: PoolConfig, questions: list[Question],
             opts: EvalOptions | None = None) -> EvalResult:
    """Run every selected strategy over ``questions`` (which need gold answers)."""
    return EvaluationJob(config, questions, opts).run()
