"""The router interface: a batch of questions in, one ``Route`` per question out.

A route names the recruited experts with weights, the category or skills behind the choice,
and a confidence. Learned routers also ``fit`` and ``save``/``load`` their state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pydantic import BaseModel, Field

from coe.questions import Question


class Recruit(BaseModel):
    name: str
    weight: float = 1.0


class Route(BaseModel):
    question_id: str
    experts: list[Recruit]
    category: str | None = None
    skills: list[str] = Field(default_factory=list)
    confidence: float | None = None
    reason: str = ""
    aggregator: str | None = None  # an aggregator expert chosen by the router, if any
    failed: dict[str, str] = Field(default_factory=dict)  # expert -> error, filled after running

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.experts]


class Router(ABC):
    name: str = "router"

    @abstractmethod
    def route(self, questions: list[Question]) -> list[Route]:
        """Routes for a batch; implementations embed or classify the batch at once."""


def top_k(names: list[str], k: int | None) -> list[str]:
    return names[:k] if k else names
