"""The aggregator interface: the experts' responses to a question in, one final answer out."""

from __future__ import annotations

from abc import ABC, abstractmethod

from coe.questions import Question
from coe.results import ExpertResponse, FinalAnswer
from coe.routers.base import Route


class Aggregator(ABC):
    name: str = "aggregator"

    @abstractmethod
    def aggregate(self, questions: list[Question], routes: list[Route],
                  responses: list[list[ExpertResponse]]) -> list[FinalAnswer]:
        """One final answer per question, for the whole batch at once."""
