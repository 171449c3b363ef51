"""The router interface: a batch of questions in, one ``Route`` per question out.

A route names the recruited experts with weights, the category or skills behind the choice,
and a confidence. Routers are built from the pool by ``from_config``; one that needs a model
(an LLM writing skill keywords) is handed the executor and reaches the model only through it.
Learned routers also ``fit`` and ``save``/``load`` their state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from coe.core.types import Question, Recruit, Route

if TYPE_CHECKING:
    from coe.routing.cascade import Cascade

__all__ = ["Recruit", "Route", "Router", "top_k"]


class Router(ABC):
    """Each router declares whether it routes a question it was trained on out-of-fold
    (``cross_fitted``: its routes of its own training questions are honest) and, when its
    recruits are asked in rounds, its ``cascade`` (``coe.routing.cascade``; None: all at once)."""

    name: str = "router"
    cross_fitted: bool = False
    cascade: "Cascade | None" = None

    @classmethod
    def from_config(cls, config, *, executor=None, k: int | None = None) -> "Router":
        """The router the pool's yaml describes (``router:``), recruiting at most ``k``."""
        return cls(config, k)

    @abstractmethod
    def route(self, questions: list[Question]) -> list[Route]:
        """Routes for a batch; implementations embed or classify the batch at once."""


def top_k(names: list[str], k: int | None) -> list[str]:
    return names[:k] if k else names
