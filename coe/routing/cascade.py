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
threshold. The budget is read one of two ways (``router.budget_mode``):

- ``cap`` (the default): no question asks more than ``budget`` experts (the cascade's depth is
  at most ``floor(budget)``), and the threshold kept is the one most accurate on the record
  (of equally accurate ones, the one asking fewest): what a budget usually means, a bound on
  each question's cost;
- ``mean``: the highest threshold whose *average* number of experts asked is at most the
  budget; a question may ask up to the cascade's depth (``k``), which can be well above it.

Either way uncertain questions get more experts, easy ones fewer, and the cascade reports the
mean and the most experts a question asked on the record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from coe.core.types import ExpertResponse, Question
from coe.learned.selector import Selector

MODES = ("cap", "mean")


def cap_depth(budget: float) -> int:
    """The most experts a question may ask under a cap of ``budget``."""
    return max(1, math.floor(budget + 1e-9))


@dataclass
class Cascade:
    budget: float
    threshold: float  # stop once the leading answer's probability reaches it
    max_experts: int
    #: the calibration on the validation record: average experts asked and accuracy there
    validation_experts: float
    validation_accuracy: float
    selector: Selector
    mode: str = "cap"  # how the budget is read (module doc)
    validation_max: int = 0  # the most experts a validation question asked

    @classmethod
    def calibrate(cls, selector: Selector, order: np.ndarray, columns: np.ndarray,
                  budget: float, mode: str = "cap") -> "Cascade":
        """``order`` (record questions x k): each validation question's recruits, strongest
        first, as pool indices; ``columns``: each pool expert's column in the record. With
        ``mode`` cap, only the first ``floor(budget)`` recruits are ever asked."""
        if mode not in MODES:
            raise ValueError(f"budget mode {mode!r}: expected cap or mean")
        if mode == "cap":
            order = order[:, :cap_depth(budget)]
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
        spent = 1.0 + sum((np.searchsorted(c, grid, side="left") / n for c in cols),
                          np.zeros(len(grid)))
        if mode == "mean":
            ok = np.flatnonzero(spent <= budget + 1e-9)
            threshold = float(grid[ok[-1]]) if len(ok) else float(grid[0])
        else:  # the most accurate threshold (ties: the fewest experts, i.e. the lowest)
            threshold = float(grid[np.argmax(_accuracy(running, best == rec.gold[:, None], grid))])
        stop = np.where((conf >= threshold).any(axis=1), np.argmax(conf >= threshold, axis=1), k - 1)
        right = best[rows, stop] == rec.gold
        return cls(budget=budget, threshold=threshold, max_experts=k,
                   validation_experts=float((stop + 1).mean()),
                   validation_accuracy=float(right.mean()), selector=selector, mode=mode,
                   validation_max=int(stop.max()) + 1 if n else 0)

    def describe(self) -> str:
        t = "never stop early" if np.isinf(self.threshold) else f"stop at confidence {self.threshold:.3f}"
        bound = (f"at most {self.max_experts} per question" if self.mode == "cap"
                 else f"{self.budget:g} on average")
        return (f"cascade over up to {self.max_experts} experts, budget {bound}: {t} "
                f"(validation: {self.validation_experts:.2f} experts/question on average, "
                f"{self.validation_max} at most, {self.validation_accuracy:.1%})")

    def open_questions(self, questions: list[Question], asked: list[int], recruits: list[int],
                       responses: list[list[ExpertResponse]]) -> list[int]:
        """The questions (indices) that ask one more recruit: not yet confident, and with a
        recruit left (``asked`` of their ``recruits`` so far)."""
        todo = [i for i, (a, n) in enumerate(zip(asked, recruits)) if a < n]
        if not todo:
            return []
        _, conf = self.selector.choose([questions[i] for i in todo], [responses[i] for i in todo])
        return [i for i, c in zip(todo, conf) if c < self.threshold]


def _accuracy(running: np.ndarray, right: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Validation accuracy of the cascade at each threshold of ``grid``. A question stops at
    the first round whose running confidence reaches the threshold: at threshold t it has
    asked one recruit more for every round m < k-1 with ``running[:, m] < t``. So raising t
    past ``running[i, m]`` moves question i from stopping at round m to m+1, changing its
    rightness by ``right[i, m+1] - right[i, m]``: the accuracy at t is the first round's plus
    those changes for every crossing below t (one sort, one cumulative sum)."""
    n = len(right)
    base = right[:, 0].sum()
    if running.shape[1] == 0:
        return np.full(len(grid), base / max(n, 1))
    at = running.ravel()
    change = (right[:, 1:].astype(np.int64) - right[:, :-1]).ravel()
    order = np.argsort(at, kind="stable")
    total = np.concatenate([[0], np.cumsum(change[order])])
    below = np.searchsorted(at[order], grid, side="left")
    return (base + total[below]) / max(n, 1)
