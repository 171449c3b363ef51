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
from typing import Callable

from coe.core.types import ExpertResponse, FinalAnswer, Generation, GenRequest, Question, Route


class Aggregator(ABC):
    name: str = "aggregator"

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


def aggregate_together(questions: list[Question],
                       jobs: dict[str, tuple[Aggregator, list[Route], list[list[ExpertResponse]]]],
                       generate: Callable[[list[GenRequest]], list[Generation]]
                       ) -> dict[str, list[FinalAnswer]]:
    """The final answers of several aggregators over the same questions (name -> aggregator,
    its routes, its experts' responses). Every generation they ask for is made by one
    ``generate(requests)`` call (the executor's), so each model loads once for all of them."""
    asked = {name: agg.requests(questions, routes, resp)
             for name, (agg, routes, resp) in jobs.items()}
    flat = [r for reqs in asked.values() for r in reqs]
    gens = iter(generate(flat) if flat else [])
    return {name: agg.aggregate(questions, routes, resp, [next(gens) for _ in asked[name]] or None)
            for name, (agg, routes, resp) in jobs.items()}
