"""What an evaluation job takes (``EvalOptions``), works on (``QuestionSet``: the test or the
validation questions, with what each stage leaves for them) and returns (``EvalResult``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from coe.apps.eval.compare import Comparison
from coe.apps.eval.recommend import Recommendation
from coe.apps.eval.scoring import Accuracy, OutcomeTable, StrategyScore
from coe.apps.eval.strategies import StrategySpec
from coe.core.config import PoolConfig
from coe.core.types import ExpertResponse, Question
from coe.execution import RunStats
from coe.pipeline.generate import Phase
from coe.pipeline.responses import ResponseTable
from coe.pipeline.routes import RouteTable
from coe.text.answers import gold_answer

__all__ = ["EvalOptions", "EvalResult", "Phase", "QuestionSet"]


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

