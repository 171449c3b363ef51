"""Paired comparisons of a strategy with a reference (best-single) on the same questions.

Both strategies answer the same questions, so their accuracies are compared question by
question rather than as two independent proportions (whose intervals overlap long after a
difference is real):

- the accuracy difference (strategy - reference) with a 95% interval from a **paired
  bootstrap** (``scipy.stats.bootstrap``, ``paired=True``: the questions are resampled, each
  with both strategies' results; seeded, so a report is reproducible);
- **McNemar's exact test** (``statsmodels``): under "no difference", the questions only one of
  the two gets right split evenly between them (a binomial test on the discordant questions);
- **Holm's correction** across the strategies compared on one question set
  (``statsmodels.stats.multitest.multipletests``), so that among a dozen strategies one
  "significant" difference is not a matter of luck; the verdict (better, worse) uses it.

A question either strategy cannot be graded on (no gradable gold answer, or a generation it
needed failed) is left out of the pair, and counted.

Pure functions over boolean arrays: no I/O, nothing about strategies or reports.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy.stats import bootstrap, ttest_rel
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.multitest import multipletests

ALPHA = 0.05  # family-wise error rate of the "significant" verdicts (after Holm)
CONFIDENCE = 0.95  # of the bootstrap interval (per comparison, not corrected)
#: bootstrap resamples. The percentile interval's ends then vary by about 0.05 points from
#: one seed to another at 6,000 questions (half the report's precision); a resample costs
#: a draw per question, so 9,999 (scipy's default) would take five times as long.
RESAMPLES = 2000
#: resampled question indices held at once (``bootstrap``'s ``batch``): 8 MB, however many
#: questions (all 2,000 resamples of 100,000 questions at once would be 1.6 GB). Smaller
#: batches were also faster: 0.96 s against 1.21 s with 4,000,000 at 98,000 questions.
BATCH_CELLS = 1_000_000
METHOD = (f"paired bootstrap ({RESAMPLES} resamples, percentile {CONFIDENCE:.0%} interval); "
          f"McNemar's exact test; Holm's correction across the strategies of a question set, "
          f"significant below {ALPHA}")


@dataclass(frozen=True)
class Comparison:
    """A strategy against the reference on the questions both are graded on."""

    n: int  # questions in the pair
    left_out: int  # questions either one cannot be graded on
    accuracy: float | None  # the strategy's, on the pair's questions
    reference: float | None  # the reference's, on the same questions
    diff: float | None  # accuracy - reference
    ci: tuple[float, float] | None  # bootstrap interval of diff
    p: float | None  # McNemar's exact p-value
    only_strategy: int  # questions only the strategy gets right
    only_reference: int  # questions only the reference gets right
    p_holm: float | None = None  # p after Holm's correction across the family
    test: str = "mcnemar"  # the test behind ``p``: mcnemar, or ttest (``compare_scores``)

    @property
    def significant(self) -> bool:
        return self.p_holm is not None and self.p_holm < ALPHA

    @property
    def verdict(self) -> str:
        """``better`` or ``worse`` when significant after Holm, else empty."""
        if not self.significant or not self.diff:
            return ""
        return "better" if self.diff > 0 else "worse"

    def to_json(self) -> dict:
        return {"n": self.n, "left_out": self.left_out, "accuracy": self.accuracy,
                "reference": self.reference, "diff": self.diff,
                "ci95": list(self.ci) if self.ci else None, f"p_{self.test}": self.p,
                "p_holm": self.p_holm, "only_strategy": self.only_strategy,
                "only_reference": self.only_reference, "verdict": self.verdict}


def _diff_of_means(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return a.mean(axis=axis) - b.mean(axis=axis)


def compare(right: np.ndarray, graded: np.ndarray, ref_right: np.ndarray,
            ref_graded: np.ndarray, seed: int = 0) -> Comparison:
    """The strategy (``right`` where ``graded``) against the reference, per question."""
    right, graded = np.asarray(right, bool), np.asarray(graded, bool)
    ref_right, ref_graded = np.asarray(ref_right, bool), np.asarray(ref_graded, bool)
    both = graded & ref_graded
    a, b = right[both], ref_right[both]
    n = int(both.sum())
    left_out = int((graded | ref_graded).sum()) - n
    if n == 0:
        return Comparison(0, left_out, None, None, None, None, None, 0, 0)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    diff = (only_a - only_b) / n
    table = [[int((a & b).sum()), only_a], [only_b, int((~a & ~b).sum())]]
    p = float(mcnemar(table, exact=True).pvalue)
    d = a.astype(np.int8) - b.astype(np.int8)
    if n < 2 or (d == d[0]).all():  # every resample is the same: the interval is the point
        ci = (diff, diff)
    else:
        res = bootstrap((a, b), _diff_of_means, paired=True, vectorized=True,
                        n_resamples=RESAMPLES, batch=max(1, BATCH_CELLS // n),
                        confidence_level=CONFIDENCE,
                        method="percentile", rng=np.random.default_rng(seed))
        ci = (float(res.confidence_interval.low), float(res.confidence_interval.high))
    return Comparison(n, left_out, float(a.mean()), float(b.mean()), diff, ci, p, only_a, only_b)


def compare_scores(score: np.ndarray, ref_score: np.ndarray, seed: int = 0) -> Comparison:
    """A strategy's per-question *scores* in [0, 1] (a judged win probability) against the
    reference's, on the same questions: the mean difference with its paired bootstrap
    interval (as ``compare``), and a paired t-test's p-value (``test = "ttest"``);
    ``only_strategy``/``only_reference``: questions where one scores higher."""
    a, b = np.asarray(score, float), np.asarray(ref_score, float)
    n = len(a)
    if n == 0:
        return Comparison(0, 0, None, None, None, None, None, 0, 0, test="ttest")
    diff = float(a.mean() - b.mean())
    d = a - b
    if n < 2 or np.ptp(d) == 0:
        ci, p = (diff, diff), (1.0 if diff == 0 else 0.0)
    else:
        res = bootstrap((a, b), _diff_of_means, paired=True, vectorized=True,
                        n_resamples=RESAMPLES, batch=max(1, BATCH_CELLS // n),
                        confidence_level=CONFIDENCE, method="percentile",
                        rng=np.random.default_rng(seed))
        ci = (float(res.confidence_interval.low), float(res.confidence_interval.high))
        p = float(ttest_rel(a, b).pvalue)
    return Comparison(n, 0, float(a.mean()), float(b.mean()), diff, ci, p,
                      int((d > 0).sum()), int((d < 0).sum()), test="ttest")


def holm(comparisons: dict[str, Comparison]) -> dict[str, Comparison]:
    """The comparisons with ``p_holm`` set: Holm's step-down correction over every one that
    has a p-value (one family)."""
    tested = [name for name, c in comparisons.items() if c.p is not None]
    if not tested:
        return dict(comparisons)
    _, corrected, _, _ = multipletests([comparisons[n].p for n in tested], alpha=ALPHA,
                                       method="holm")
    out = dict(comparisons)
    for name, p in zip(tested, corrected.tolist()):
        out[name] = replace(comparisons[name], p_holm=float(p))
    return out
