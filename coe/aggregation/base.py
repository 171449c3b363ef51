"""The aggregator interface: the experts' responses to a batch of questions in, one final
answer per question out.

An aggregator that needs a model (the llm aggregator) does not call one. It says which
generations it needs (``requests``), whoever drives it (the orchestrator, an evaluation job,
profiling, a server) runs them through the executor with everything else, and ``aggregate``
turns the generations into answers. An aggregator without a model asks for nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import ClassVar

from coe.core.types import ExpertResponse, FinalAnswer, Generation, GenRequest, Question, Route


class Aggregator(ABC):
    """Each aggregator declares whether it asks for generations of its own (``generates``:
    then ``requests`` and ``experts`` say which) and whether it reads the experts' texts
    (``reads_text``: else only their extracted answers, and a caller may drop the texts). An
    aggregator whose trained part is missing says why in ``unavailable`` (it then falls back,
    and an evaluation skips it rather than reporting the fallback under its name)."""

    name: str = "aggregator"
    generates: ClassVar[bool] = False
    reads_text: ClassVar[bool] = False
    unavailable: str = ""

    @classmethod
    def from_config(cls, config, *, strength: dict[str, float] | None = None,
                    expert: str | None = None) -> "Aggregator":
        """The aggregator for this pool. ``strength`` (expert -> prior accuracy) breaks ties;
        ``expert`` is an explicit aggregator expert (``--aggregator-expert``), for those that
        use one."""
        return cls()

    def requests(self, questions: list[Question], routes: list[Route],
                 responses: list[list[ExpertResponse]]) -> list[GenRequest]:
        """The generations ``aggregate`` needs, in the order it expects them back."""
        return []

    def experts(self, routes: list[Route]) -> Counter:
        """How many generations ``requests`` will ask of each expert, known from the routes
        before any expert has answered: the plan keeps the most used one loaded."""
        return Counter()

    @abstractmethod
    def aggregate(self, questions: list[Question], routes: list[Route],
                  responses: list[list[ExpertResponse]],
                  generations: list[Generation] | None = None) -> list[FinalAnswer]:
        """One final answer per question. ``generations`` answer ``requests(...)``."""
