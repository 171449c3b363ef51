"""One expert's answer is the final answer: the highest-weighted recruit that answered."""

from __future__ import annotations

from coe.aggregation.base import Aggregator
from coe.core.types import ExpertResponse, FinalAnswer, Generation, Question, Route


class SingleAggregator(Aggregator):
    name = "single"

    def aggregate(self, questions: list[Question], routes: list[Route],
                  responses: list[list[ExpertResponse]],
                  generations: list[Generation] | None = None) -> list[FinalAnswer]:
        out = []
        for route, resp in zip(routes, responses):
            by_name = {r.expert: r for r in resp}
            order = sorted(route.experts, key=lambda r: -r.weight)
            pick = next((by_name[r.name] for r in order
                         if r.name in by_name and by_name[r.name].error is None), None)
            if pick is None:
                out.append(FinalAnswer(answer=None, aggregator=self.name, note="no expert answered"))
            else:
                out.append(FinalAnswer(answer=pick.answer, aggregator=self.name,
                                       confidence=1.0 if pick.answer is not None else 0.0,
                                       note=f"answer of {pick.expert}"))
        return out
