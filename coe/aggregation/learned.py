"""Learned answer selection: the candidate answer a trained selector finds most likely right.

``aggregator: {kind: learned}`` reads the selector ``coe profile`` fitted on the validation
run (``coe.learned.selector``), from ``aggregator.profiles`` or else ``router.profiles``. Each
distinct answer of the recruits is scored from which experts gave it, their local and global
accuracies and how many agree; the best-scored one wins, its probability is the confidence.

Without a trained selector (no profiles, or profiles without one) it votes, and says so in
each answer's note (``fallback``).
"""

from __future__ import annotations

from coe.aggregation.base import Aggregator
from coe.aggregation.vote import TextConsensus, VoteAggregator
from coe.core.types import ExpertResponse, FinalAnswer, Generation, Question, Route
from coe.learned.profiles import Profiles
from coe.learned.selector import Selector


class LearnedAggregator(Aggregator):
    name = "learned"
    cross_fitted = True

    def __init__(self, selector: Selector | None, strength: dict[str, float] | None = None,
                 fallback: str = "", text: TextConsensus | None = None):
        self.selector = selector
        self.vote = VoteAggregator(strength, text)  # (free text: the yaml's threshold)
        #: why there is no selector (the aggregator then votes); "" with one
        self.unavailable = fallback

    @property
    def fallback(self) -> str:
        """The 0.1 name of ``unavailable``."""
        return self.unavailable

    @classmethod
    def from_config(cls, config, *, strength=None, expert=None) -> "LearnedAggregator":
        ref = config.aggregator.profiles or config.router.profiles
        text = TextConsensus.from_config(config)
        if not ref:
            return cls(None, strength, "no profiles (aggregator.profiles or router.profiles)",
                       text)
        path = config.resolve_path(ref)
        profiles = Profiles.load(path)
        if profiles.selector is None:
            return cls(None, strength, f"{path} holds no answer selector (rebuild it with "
                                       "coe profile)", text)
        return cls(profiles.selector_for(config), strength, text=text)

    def aggregate(self, questions: list[Question], routes: list[Route],
                  responses: list[list[ExpertResponse]],
                  generations: list[Generation] | None = None) -> list[FinalAnswer]:
        if self.selector is None:
            return [f.model_copy(update={"aggregator": self.name,
                                         "note": f"vote: {self.unavailable}"})
                    for f in self.vote.aggregate(questions, routes, responses)]
        answers, conf = self.selector.choose(questions, responses)
        out = []
        for resp, a, c in zip(responses, answers, conf):
            votes: dict[str, int] = {}
            for r in resp:
                if r.error is None and r.answer is not None:
                    votes[r.answer] = votes.get(r.answer, 0) + 1
            out.append(FinalAnswer(answer=a, aggregator=self.name, confidence=round(c, 4),
                                   votes=votes))
        return out
