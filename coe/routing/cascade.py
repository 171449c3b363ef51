"""Cascades: ask the strongest recruits first, more only where the answer is uncertain.

A router with ``budget`` (``router: {kind: knn, k: 5, budget: 2.0}``) ranks up to k recruits
per question, strongest first. The cascade asks them in rounds: the first recruit of every
question, then the next recruit of every question whose answer the selector
(``coe.learned.selector``) is not yet confident in, and so on, until each question is confident or
has asked all k. Each round is one executor call: one batch per model, each model loaded once
per round.

The confidence threshold is **calibrated on the profiles' validation record**: the record
holds every expert's answer on every profiled question, so the cascade is simulated there
(the router's out-of-sample order, the selector's out-of-fold confidences) for every
threshold, and the highest threshold whose *average* number of experts asked is at most the
budget is kept. Uncertain questions get more experts, easy ones fewer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coe.core.types import ExpertResponse, Question
from coe.learned.selector import Selector


@dataclass
class Cascade:
    budget: float
    threshold: float  # stop once the leading answer's probability reaches it
    max_experts: int
    #: the calibration on the validation record: average experts asked and accuracy there
    validation_experts: float
    validation_accuracy: float
    selector: Selector

    @classmethod
    def calibrate(cls, selector: Selector, order: np.ndarray, columns: np.ndarray,
                  budget: float) -> "Cascade":
        """``order`` (record questions x k): each validation question's recruits, strongest
        first, as pool indices; ``columns``: each pool expert's column in the record."""
        rec = selector.record
        n, k = order.shape
        local = selector.hood.local_of_record()
        rows = np.arange(n)
        conf = np.zeros((n, k))
        best = np.zeros((n, k), np.int64)
        asked = np.zeros(rec.answers.shape, bool)
        for m in range(k):
            asked[rows, columns[order[:, m]]] = True
            best[:, m], conf[:, m] = selector.select(rec.answers, asked, local, rows)
        # asked experts at threshold t: 1 + the rounds m < k-1 whose running maximum < t
        running = np.maximum.accumulate(conf, axis=1)[:, :k - 1]
        grid = np.unique(np.concatenate([running.ravel(), [np.inf]]))
        cols = [np.sort(running[:, m]) for m in range(k - 1)]
        spent = 1.0 + sum(np.searchsorted(c, grid, side="left") / n for c in cols)
        ok = np.flatnonzero(spent <= budget + 1e-9)
        threshold = float(grid[ok[-1]]) if len(ok) else float(grid[0])
        stop = np.where((conf >= threshold).any(axis=1), np.argmax(conf >= threshold, axis=1), k - 1)
        right = best[rows, stop] == rec.gold
        return cls(budget=budget, threshold=threshold, max_experts=k,
                   validation_experts=float((stop + 1).mean()),
                   validation_accuracy=float(right.mean()), selector=selector)

    def describe(self) -> str:
        t = "never stop early" if np.isinf(self.threshold) else f"stop at confidence {self.threshold:.3f}"
        return (f"cascade over up to {self.max_experts} experts, budget {self.budget:g}: {t} "
                f"(validation: {self.validation_experts:.2f} experts/question, "
                f"{self.validation_accuracy:.1%})")

    def open_questions(self, questions: list[Question], asked: list[int], recruits: list[int],
                       responses: list[list[ExpertResponse]]) -> list[int]:
        """The questions (indices) that ask one more recruit: not yet confident, and with a
        recruit left (``asked`` of their ``recruits`` so far)."""
        todo = [i for i, (a, n) in enumerate(zip(asked, recruits)) if a < n]
        if not todo:
            return []
        _, conf = self.selector.choose([questions[i] for i in todo], [responses[i] for i in todo])
        return [i for i, c in zip(todo, conf) if c < self.threshold]
