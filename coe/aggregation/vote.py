"""Consistency voting over the experts' extracted final answers (HM-RAG style).

The answer given by the most experts wins. Ties are common (about one question in five for
eight 7B models on MMLU-Pro) and how they are broken moves accuracy by two points, so a tie
goes to the answer backed by the expert the router weighted highest for this question (its
rank in the category, its skill score), then by the *strongest* expert (profile or yaml
``strength``), then by the answer itself, never by list or hash order. Confidence is the
fraction of answering experts that agree with the winner.

Free text (``coe.text.answers.free_text``: declared, or an open request answered without a
final-answer line) is voted on by meaning: the answers are embedded with the routing encoder
and clustered (``coe.aggregation.consensus``, at the yaml's ``aggregator.threshold``); the
cluster with the largest total route weight wins, and the final answer is the *whole text* of
its most central member. ``clusters`` names who agreed with whom.
"""

from __future__ import annotations

from collections import Counter

from coe.aggregation.base import Aggregator
from coe.aggregation.consensus import DEFAULT_THRESHOLD, consensus
from coe.core.types import ExpertResponse, FinalAnswer, Generation, Question, Route
from coe.learned.embeddings import DEFAULT_MODEL, shared_embedder
from coe.text.answers import free_text


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


class TextConsensus:
    """The consensus of free-text answers, embedded by the pool's routing encoder (loaded on
    first use: a pool that never sees free text never loads it)."""

    def __init__(self, model: str = DEFAULT_MODEL, threshold: float | None = None,
                 batch_size: int = 64, base_dir: str = "."):
        self.model, self.batch_size, self.base_dir = model, batch_size, base_dir
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold

    @classmethod
    def from_config(cls, config) -> "TextConsensus":
        return cls(config.embeddings.model, config.aggregator.threshold,
                   config.embeddings.batch_size, str(config.base_dir))

    def final(self, name: str, responses: list[ExpertResponse],
              weights: dict[str, float]) -> FinalAnswer:
        # (an evaluation may have dropped the texts: a free-text answer is the whole text)
        said = [(r.expert, r.text or r.answer or "") for r in responses if r.error is None]
        said = [(e, t) for e, t in said if t.strip()]
        if not said:
            return FinalAnswer(answer=None, aggregator=name, note="free text: no expert answered")
        vectors = shared_embedder(self.model, self.batch_size, self.base_dir).encode(
            [t for _, t in said])
        c = consensus(vectors, [weights.get(e, 1.0) for e, _ in said], self.threshold)
        clusters = [[said[i][0] for i in members] for members in c.clusters]
        winner, text = said[c.winner]
        return FinalAnswer(answer=text.strip(), aggregator=name,
                           confidence=round(c.agreement, 4), clusters=clusters,
                           note=f"free text: {winner}'s answer, the most central "
                                f"of {len(clusters[0])} of {len(said)} that agree")


class VoteAggregator(Aggregator):
    name = "vote"

    def __init__(self, strength: dict[str, float] | None = None,
                 text: TextConsensus | None = None):
        self.strength = strength or {}
        self.text = text or TextConsensus()

    @classmethod
    def from_config(cls, config, *, strength=None, expert=None) -> "VoteAggregator":
        return cls(strength, TextConsensus.from_config(config))

    def one(self, q: Question, route: Route, resp: list[ExpertResponse]) -> FinalAnswer:
        """The vote on one question: by meaning for free text, else on extracted answers."""
        weights = {r.name: r.weight for r in route.experts}
        if free_text(q, [r.text for r in resp if r.error is None]):
            return self.text.final(self.name, resp, weights)
        answer, conf, votes = vote(resp, self.strength, weights)
        return FinalAnswer(answer=answer, aggregator=self.name, confidence=conf, votes=votes)

    def aggregate(self, questions: list[Question], routes: list[Route],
                  responses: list[list[ExpertResponse]],
                  generations: list[Generation] | None = None) -> list[FinalAnswer]:
        return [self.one(q, route, resp) for q, route, resp in zip(questions, routes, responses)]
