"""Scoring of one strategy over a question set: accuracy with a 95% Wilson score interval,
overall and per category, plus what it cost: tokens, generation time, dollars from the yaml's
per-token prices, and average active parameters per question.

Accuracy is over the *graded* questions: those with a gradable gold answer on which no
generation the strategy needed failed. A failed generation is not a wrong answer: its
questions are counted in ``failed_questions`` instead.

Answer extraction and matching are not here: they live in ``coe.text.answers`` (``grade``
handles multiple-choice letters, numbers with tolerance and normalised short text).

A strategy's outcomes are an ``OutcomeTable``: arrays over the questions, read together with
the strategy's ``RouteTable`` and the job's ``ResponseTable``, so 100,000 questions x a dozen
strategies hold a few bytes per outcome, not an object; ``score_strategy`` totals them with
numpy. ``Outcome`` is one question's outcome, as the table hands it out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import binomtest

from coe.core.config import PoolConfig
from coe.core.types import ExpertResponse
from coe.pipeline.responses import NO_CATEGORY as NO_CATEGORY  # where reports look for it
from coe.pipeline.responses import Codes, ResponseTable
from coe.pipeline.routes import NONE, RouteTable
from coe.text.answers import grade


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (scipy's, without continuity
    correction). Unlike the normal approximation it stays inside [0, 1] and behaves for small
    n and for proportions near 0 or 1 (right on 3 of 3 questions gives [0.44, 1.0])."""
    if n <= 0:
        return 0.0, 1.0
    ci = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


@dataclass
class Accuracy:
    correct: int = 0
    n: int = 0

    @property
    def value(self) -> float | None:
        return self.correct / self.n if self.n else None

    @property
    def ci(self) -> tuple[float, float] | None:
        return wilson_interval(self.correct, self.n) if self.n else None

    def add(self, ok: bool) -> None:
        self.n += 1
        self.correct += int(ok)

    def to_json(self) -> dict:
        ci = self.ci
        return {"correct": self.correct, "n": self.n, "accuracy": self.value,
                "ci95": list(ci) if ci else None}


@dataclass
class Outcome:
    """One strategy on one question."""

    question_id: str
    category: str | None
    answer: str | None
    correct: bool | None  # None: the question has no gold answer
    recruited: list[str]
    used: list[ExpertResponse]  # the expert generations the strategy consumed
    any_right: bool | None = None  # some recruited expert answered right (oracle of the route)
    aggregator: ExpertResponse | None = None  # the llm aggregator's own generation
    note: str = ""
    # a generation the strategy needed (an expert's or its aggregator's) failed: the question
    # is left out of the strategy's accuracy (``correct`` is None) and counted apart
    failed: bool = False


@dataclass
class StrategyScore:
    name: str
    description: str
    overall: Accuracy = field(default_factory=Accuracy)
    per_category: dict[str, Accuracy] = field(default_factory=dict)
    recruit_oracle: Accuracy = field(default_factory=Accuracy)
    questions: int = 0
    generations: int = 0
    #: the most generations (experts' and aggregator's, failed ones included) one question took
    max_generations: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gen_seconds: float = 0.0
    route_seconds: float = 0.0
    cost: float = 0.0
    active_params: float = 0.0
    params_known: bool = True
    usage: Counter = field(default_factory=Counter)  # expert -> questions it was recruited for
    aggregator_usage: Counter = field(default_factory=Counter)
    failed: int = 0  # failed generations
    failed_questions: int = 0  # questions left out of the accuracy: a generation failed
    unanswered: int = 0
    notes: list[str] = field(default_factory=list)

    def per_question(self, total: float) -> float:
        return total / self.questions if self.questions else 0.0

    @property
    def avg_active_params(self) -> float | None:
        return self.per_question(self.active_params) if self.params_known else None

    @property
    def avg_cost(self) -> float:
        return self.per_question(self.cost)

    @property
    def avg_tokens(self) -> float:
        return self.per_question(self.prompt_tokens + self.completion_tokens)

    @property
    def avg_experts(self) -> float:
        return self.per_question(sum(self.usage.values()))

    def to_json(self) -> dict:
        return {
            "name": self.name, "description": self.description, "questions": self.questions,
            **self.overall.to_json(),
            "per_category": {c: a.to_json() for c, a in sorted(self.per_category.items())},
            "recruit_oracle": self.recruit_oracle.to_json(),
            "generations": self.generations,
            "generations_per_question": (self.per_question(self.generations + self.failed)),
            "max_generations_per_question": self.max_generations,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "avg_tokens": self.avg_tokens,
            "gen_seconds": round(self.gen_seconds, 4),
            "route_seconds": round(self.route_seconds, 4),
            "cost_usd": self.cost, "avg_cost_usd": self.avg_cost,
            "avg_active_params_b": self.avg_active_params, "avg_experts": self.avg_experts,
            "usage": dict(self.usage), "aggregator_usage": dict(self.aggregator_usage),
            "failed_generations": self.failed, "failed_questions": self.failed_questions,
            "unanswered": self.unanswered,
            "notes": self.notes,
        }


class OutcomeTable(Sequence):
    """One strategy on every question, as arrays: the final answer (a code into
    ``answers``), whether it is right, whether some recruit was right, whether a generation
    it needed failed, whether its answer rests on a truncated one, the aggregator's note and
    (llm aggregators only) its own generation. The recruits and the generations they used
    are the strategy's ``RouteTable`` and the job's ``ResponseTable``, not copies.

    A sequence of ``Outcome``: ``table[i]`` builds question i's outcome."""

    def __init__(self, routes: RouteTable, responses: ResponseTable):
        n = len(routes)
        self.routes, self.responses = routes, responses
        self.answer = np.full(n, -1, np.int32)
        self.answers = Codes()
        self.correct = np.full(n, -1, np.int8)  # 1, 0; -1: None (no gold, or failed)
        self.any_right = np.full(n, -1, np.int8)
        self.failed = np.zeros(n, bool)
        self.truncated = np.zeros(n, bool)
        self.note = np.full(n, -1, np.int32)
        self.notes = Codes()
        self.aggregator: list[ExpertResponse | None] | None = None  # llm aggregators only

    def used(self) -> tuple[np.ndarray, np.ndarray]:
        """(question, expert) of every expert generation used, question by question in route
        order (made when asked: kept, they would be 16 bytes a generation per strategy)."""
        rows, slots = np.nonzero(self.routes.experts != NONE)
        return rows, self.routes.experts[rows, slots].astype(np.intp)

    def set_answers(self, start: int, answers: list[str | None], notes: list[str],
                    aggregators: list[ExpertResponse | None] | None = None) -> None:
        """The final answers (and notes, aggregator generations) of questions
        ``start, start + 1, ...``."""
        end = start + len(answers)
        self.answer[start:end] = [self.answers.code(a) for a in answers]
        self.note[start:end] = [self.notes.code(n or None) for n in notes]
        if aggregators is not None and any(a is not None for a in aggregators):
            if self.aggregator is None:
                self.aggregator = [None] * len(self)
            self.aggregator[start:end] = aggregators

    def recruit_right(self) -> np.ndarray:
        """Per question, whether a recruit that did not fail gave the (gradable) gold answer."""
        r, (rows, cols) = self.responses, self.used()
        right = (r.right[rows, cols] == 1) & ~r.failed[rows, cols]
        return np.bincount(rows, weights=right, minlength=len(self)) > 0

    def finish(self, oracle: bool = False) -> None:
        """Grade the final answers (the oracle: right when a recruit is) once all are set. A
        question on which a generation the strategy needed failed is graded neither way."""
        r, (rows, cols) = self.responses, self.used()
        n = len(self)
        used_failed = np.bincount(rows, weights=r.failed[rows, cols], minlength=n) > 0
        used_cut = np.bincount(rows, weights=r.truncated[rows, cols], minlength=n) > 0
        graded = np.array([g is not None for g in r.gold], bool)
        self.any_right[:] = np.where(graded, self.recruit_right(), -1)
        agg = self.aggregator or ()
        agg_failed = np.array([a is not None and a.error is not None for a in agg], bool)
        agg_cut = np.array([a is not None and a.truncated for a in agg], bool)
        self.failed[:] = used_failed | (agg_failed if agg else False)
        self.truncated[:] = used_cut | (agg_cut if agg else False)
        if oracle:
            self.correct[:] = self.any_right
        else:
            qs, gold, value = r.questions, r.gold, self.answers.value
            ok = [grade(value(a), g, q.answer_kind)
                  for a, g, q in zip(self.answer.tolist(), gold, qs)]
            self.correct[:] = [-1 if x is None else int(x) for x in ok]
        self.correct[self.failed] = -1
        self.any_right[self.failed] = -1

    def __len__(self) -> int:
        return len(self.routes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        q = self.responses.questions[i]
        recruited = self.routes.recruited(i)
        return Outcome(question_id=q.id, category=q.category,
                       answer=self.answers.value(self.answer[i]),
                       correct=_bool(self.correct[i]),
                       recruited=[self.routes.names[j] for j in recruited],
                       used=[self.responses.response(i, j) for j in recruited],
                       any_right=_bool(self.any_right[i]),
                       aggregator=self.aggregator[i] if self.aggregator else None,
                       note=self.notes.value(self.note[i]) or "", failed=bool(self.failed[i]))


def _bool(code) -> bool | None:
    return None if code < 0 else bool(code)


def _total(values: np.ndarray) -> float:
    """The sum added up in order, left to right, as a loop of ``+=`` would (numpy's ``sum``
    adds pairwise: its last digits differ, and report.json prints every digit)."""
    return float(np.cumsum(values)[-1]) if len(values) else 0.0


def _first_seen(keys: np.ndarray) -> np.ndarray:
    """The distinct keys in the order they first appear."""
    _, first = np.unique(keys, return_index=True)
    return keys[np.sort(first)]


def score_strategy(name: str, description: str, outcomes: OutcomeTable,
                   config: PoolConfig, route_seconds: float = 0.0) -> StrategyScore:
    """Totals over the questions, from the arrays. Active parameters of a question: the
    ``params`` of each distinct expert whose generation the strategy used, plus the llm
    aggregator's (also when it is one of the recruits: its generation is another pass).
    Sums of floats (seconds, cost, parameters) are added in question order, each question's
    generations in route order and its aggregator's last, as the per-question definition
    reads."""
    o, r = outcomes, outcomes.responses
    names = r.names
    s = StrategyScore(name=name, description=description, route_seconds=route_seconds,
                      questions=len(o))
    rows, cols = o.used()
    recruits = _first_seen(cols)  # in the order they are first recruited
    per_expert = o.routes.counts()  # questions recruiting each (once, even if named twice)
    s.usage = Counter({names[j]: int(per_expert[j]) for j in recruits.tolist()})
    s.failed_questions = int(o.failed.sum())
    s.unanswered = int((o.answer < 0).sum())
    graded = ~o.failed & (o.correct >= 0)
    s.overall = Accuracy(int((o.correct[graded] == 1).sum()), int(graded.sum()))
    cat, cats = r.categories()
    right = np.bincount(cat[graded], weights=o.correct[graded] == 1, minlength=len(cats))
    seen = np.bincount(cat[graded], minlength=len(cats))
    for c in _first_seen(cat[graded]).tolist():
        s.per_category[cats[c]] = Accuracy(int(right[c]), int(seen[c]))
    oracle = graded & (o.any_right >= 0)
    s.recruit_oracle = Accuracy(int((o.any_right[oracle] == 1).sum()), int(oracle.sum()))

    # every generation used: the recruits' cells, then the aggregator's, question by question
    experts = cols
    failed = r.failed[rows, cols]
    pt, ct = r.prompt_tokens[rows, cols], r.completion_tokens[rows, cols]
    secs = r.seconds[rows, cols]
    order_key = rows * 2
    agg = [(i, a) for i, a in enumerate(o.aggregator or ()) if a is not None]
    if agg:
        col = {n: j for j, n in enumerate(names)}
        s.aggregator_usage = Counter(a.expert for _, a in agg)
        a_rows = np.array([i for i, _ in agg])
        experts = np.concatenate([cols, [col[a.expert] for _, a in agg]]).astype(np.intp)
        failed = np.concatenate([failed, [a.error is not None for _, a in agg]])
        pt = np.concatenate([pt, [a.prompt_tokens for _, a in agg]])
        ct = np.concatenate([ct, [a.completion_tokens for _, a in agg]])
        secs = np.concatenate([secs, [a.seconds for _, a in agg]])
        order_key = np.concatenate([order_key, a_rows * 2 + 1])
        rows = np.concatenate([rows, a_rows])
    is_agg = order_key % 2 == 1
    order = np.argsort(order_key, kind="stable")
    experts, failed, pt, ct, secs, rows, is_agg = (x[order] for x in (
        experts, failed, pt, ct, secs, rows, is_agg))
    ok = ~failed
    s.failed = int(failed.sum())
    s.generations = int(ok.sum())
    s.max_generations = int(np.bincount(rows, minlength=len(o)).max()) if len(o) else 0
    s.prompt_tokens = int(pt[ok].sum())
    s.completion_tokens = int(ct[ok].sum())
    s.gen_seconds = _total(secs[ok])
    price_in = np.array([config.expert(n).price.input_per_mtok for n in names])
    price_out = np.array([config.expert(n).price.output_per_mtok for n in names])
    s.cost = _total(((pt * price_in[experts] + ct * price_out[experts]) / 1e6)[ok])
    # parameters: each distinct expert of a question once, its aggregator's pass always
    counted = ok & is_agg
    recruit = np.flatnonzero(ok & ~is_agg)
    key = rows[recruit] * len(names) + experts[recruit]
    _, first = np.unique(key, return_index=True)
    counted[recruit[first]] = True
    params = [config.expert(n).params for n in names]
    if any(params[j] is None for j in set(experts[counted].tolist())):
        s.params_known = False
    else:
        p = np.array([0.0 if x is None else x for x in params])
        s.active_params = _total(p[experts[counted]])
    return s
