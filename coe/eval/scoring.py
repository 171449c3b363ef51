"""Scoring of one strategy over a question set: accuracy with a 95% Wilson score interval,
overall and per category, plus what it cost: tokens, generation time, dollars from the yaml's
per-token prices, and average active parameters per question.

Accuracy is over the *graded* questions: those with a gradable gold answer on which no
generation the strategy needed failed. A failed generation is not a wrong answer: its
questions are counted in ``failed_questions`` instead.

Answer extraction and matching are not here: they live in ``coe.answers`` (``is_correct``
handles multiple-choice letters, numbers with tolerance and normalised short text).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from scipy.stats import binomtest

from coe.config import PoolConfig
from coe.types import ExpertResponse

NO_CATEGORY = "(none)"


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
            "generations": self.generations, "prompt_tokens": self.prompt_tokens,
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


def generation_cost(config: PoolConfig, r: ExpertResponse) -> float:
    price = config.expert(r.expert).price
    return (r.prompt_tokens * price.input_per_mtok
            + r.completion_tokens * price.output_per_mtok) / 1e6


def score_strategy(name: str, description: str, outcomes: list[Outcome],
                   config: PoolConfig, route_seconds: float = 0.0) -> StrategyScore:
    """Totals over the questions. Active parameters of a question: the ``params`` of each
    distinct expert whose generation the strategy used, plus the llm aggregator's (also when
    it is one of the recruits: its generation is another pass)."""
    by_name = config.by_name
    s = StrategyScore(name=name, description=description, route_seconds=route_seconds)
    for o in outcomes:
        s.questions += 1
        s.usage.update(dict.fromkeys(o.recruited, 1))
        if o.aggregator is not None:
            s.aggregator_usage[o.aggregator.expert] += 1
        if o.failed:
            s.failed_questions += 1
        elif o.correct is not None:
            s.overall.add(o.correct)
            s.per_category.setdefault(o.category or NO_CATEGORY, Accuracy()).add(o.correct)
            if o.any_right is not None:
                s.recruit_oracle.add(o.any_right)
        if o.answer is None:
            s.unanswered += 1
        seen: set[str] = set()
        gens = [(r, False) for r in o.used]
        if o.aggregator is not None:
            gens.append((o.aggregator, True))
        for r, is_aggregator in gens:
            if r.error is not None:
                s.failed += 1
                continue
            s.generations += 1
            s.prompt_tokens += r.prompt_tokens
            s.completion_tokens += r.completion_tokens
            s.gen_seconds += r.seconds
            s.cost += generation_cost(config, r)
            if r.expert in seen and not is_aggregator:
                continue
            seen.add(r.expert)
            params = by_name[r.expert].params
            if params is None:
                s.params_known = False
            else:
                s.active_params += params
    return s
