"""Every expert in the pool answers every question (optionally the first k)."""

from __future__ import annotations

from coe.core.config import PoolConfig
from coe.core.types import Question
from coe.routing.base import Recruit, Route, Router, top_k


class AllRouter(Router):
    name = "all"

    def __init__(self, config: PoolConfig, k: int | None = None):
        self.names = top_k([e.name for e in config.experts], k)

    def route(self, questions: list[Question]) -> list[Route]:
        experts = [Recruit(name=n) for n in self.names]
        return [Route(question_id=q.id, experts=experts, confidence=1.0, reason="all experts")
                for q in questions]
