"""Consistency voting over the experts' extracted final answers (HM-RAG style).

The answer given by the most experts wins. Ties are common (about one question in five for
eight 7B models on MMLU-Pro) and how they are broken moves accuracy by two points, so a tie
goes to the answer backed by the expert the router weighted highest for this question (its
rank in the category, its skill score), then by the *strongest* expert (profile or yaml
``strength``), then by the answer itself, never by list or hash order. Confidence is the
fraction of answering experts that agree with the winner.
"""

from __future__ import annotations

from collections import Counter

from coe.aggregation.base import Aggregator
from coe.core.types import ExpertResponse, FinalAnswer, Generation, Question, Route


def vote(responses: list[ExpertResponse], strength: dict[str, float] | None = None,
         weights: dict[str, float] | None = None) -> tuple[str | None, float, dict[str, int]]:
    """(winner, agreement fraction, votes per answer) over the responses that answered."""
    strength = strength or {}
    weights = weights or {}
    answered = [r for r in responses if r.error is None and r.answer is not None]
    if not answered:
        return None, 0.0, {}
    counts = Counter(r.answer for r in answered)
    top = max(counts.values())
    tied = [a for a, c in counts.items() if c == top]

    def backing(answer: str) -> tuple:
        who = [r.expert for r in answered if r.answer == answer]
        return (max(weights.get(e, 0.0) for e in who),
                max(strength.get(e, float("-inf")) for e in who), answer)

    winner = max(tied, key=backing)
    return winner, top / len(answered), dict(counts)


class VoteAggregator(Aggregator):
    name = "vote"

    def __init__(self, strength: dict[str, float] | None = None):
        self.strength = strength or {}

    @classmethod
    def from_config(cls, config, *, strength=None, expert=None) -> "VoteAggregator":
        return cls(strength)

    def aggregate(self, questions: list[Question], routes: list[Route],
                  responses: list[list[ExpertResponse]],
                  generations: list[Generation] | None = None) -> list[FinalAnswer]:
        out = []
        for route, resp in zip(routes, responses):
            weights = {r.name: r.weight for r in route.experts}
            answer, conf, votes = vote(resp, self.strength, weights)
            out.append(FinalAnswer(answer=answer, aggregator=self.name, confidence=conf,
                                   votes=votes))
        return out
