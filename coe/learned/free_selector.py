"""The learned selector over free-text answers: which of the consulted experts' answers to keep.

Per candidate answer (one consulted expert on one instruction), features that need no judge
and no reference, so the selector can run where the team serves:

- ``agreement``: mean cosine similarity of its embedding to the other candidates' (answers
  that say what the others say are rarely the bad ones; 0 alone);
- ``length_z``: its log length against the other candidates' (z-score within the instruction):
  the judge's length bias, kept visible so that it can be checked (the length-neutral variant
  leaves it out);
- ``empty``: it is empty;
- ``local``: the expert's win rate on the instruction's nearest training instructions (the knn
  router's neighbourhood, leave-one-out on the training half);
- one indicator per expert (its global strength).

The target is the judged ``p_win`` (or, for the length-neutral variant, the length-adjusted
score of ``coe.learned.winrate``); a gradient-boosted regressor (scikit-learn) ranks the
candidates, and the highest wins. ``cross_fitted`` gives out-of-fold picks on the training
half (k folds by instruction), so its training figures are honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.model_selection import KFold

FEATURES = ("agreement", "length_z", "empty", "local")
FOLDS = 5


def features(vectors: np.ndarray, chars: np.ndarray, local: np.ndarray,
             candidates: np.ndarray, use: tuple[str, ...] = FEATURES) -> np.ndarray:
    """Rows: every (instruction, slot) of ``candidates`` (instructions x slots, expert indices,
    -1 for none), in order; the ``use``d features then one indicator per expert."""
    n, e = chars.shape
    rows = []
    for i in range(n):
        js = [j for j in candidates[i].tolist() if j >= 0]
        v = vectors[i, js]
        sim = v @ v.T
        k = len(js)
        agree = (sim.sum(1) - np.diag(sim)) / (k - 1) if k > 1 else np.zeros(k)
        loglen = np.log1p(chars[i, js])
        z = (loglen - loglen.mean()) / (loglen.std() + 1e-6) if k > 1 else np.zeros(k)
        for s, j in enumerate(js):
            f = {"agreement": agree[s], "length_z": z[s], "empty": float(chars[i, j] == 0),
                 "local": local[i, j]}
            onehot = np.zeros(e)
            onehot[j] = 1.0
            rows.append(np.concatenate([[f[u] for u in use], onehot]))
    return np.array(rows)


def _groups(candidates: np.ndarray) -> np.ndarray:
    """The instruction of each feature row."""
    return np.repeat(np.arange(len(candidates)), (candidates >= 0).sum(1))


def _targets(target: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    rows, slots = np.nonzero(candidates >= 0)
    return target[rows, candidates[rows, slots]]


@dataclass
class FreeSelector:
    model: HistGradientBoostingRegressor
    use: tuple[str, ...]

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, use: tuple[str, ...] = FEATURES,
            seed: int = 0) -> "FreeSelector":
        model = HistGradientBoostingRegressor(max_iter=150, learning_rate=0.05, max_depth=3,
                                              min_samples_leaf=20, random_state=seed)
        return cls(model.fit(x, y), use)

    def pick(self, x: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """Per instruction, the candidate (an expert index) with the highest predicted score
        (ties: the earlier slot)."""
        score = self.model.predict(x) if len(x) else np.zeros(0)
        return _argmax_by_group(score, candidates)


def _argmax_by_group(score: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    out = np.empty(len(candidates), np.int64)
    pos = 0
    for i, cand in enumerate(candidates.tolist()):
        js = [j for j in cand if j >= 0]
        s = score[pos:pos + len(js)]
        out[i] = js[int(np.argmax(s))]
        pos += len(js)
    return out


def cross_fitted(vectors, chars, local, candidates, target, use=FEATURES, folds=FOLDS,
                 seed: int = 0) -> np.ndarray:
    """Out-of-fold picks on the training instructions: each fold picked by a selector fitted
    on the others."""
    x = features(vectors, chars, local, candidates, use)
    y = _targets(target, candidates)
    groups = _groups(candidates)
    out = np.empty(len(candidates), np.int64)
    for fit_i, held in KFold(folds, shuffle=True, random_state=seed).split(candidates):
        fit_rows, held_rows = np.isin(groups, fit_i), np.isin(groups, held)
        sel = FreeSelector.fit(x[fit_rows], y[fit_rows], use, seed)
        out[held] = sel.pick(x[held_rows], candidates[held])
    return out


def fitted(vectors, chars, local, candidates, target, use=FEATURES,
           seed: int = 0) -> FreeSelector:
    """The selector fitted on every training instruction."""
    return FreeSelector.fit(features(vectors, chars, local, candidates, use),
                            _targets(target, candidates), use, seed)
