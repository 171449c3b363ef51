"""Win rate and length-controlled (LC) win rate against a reference answer (AlpacaEval 2.0).

A pairwise judge rates each answer against the reference: ``p_win`` in [0, 1], the judge's
probability that the answer beats the reference. A policy that picks one recorded answer per
instruction has win rate ``100 * mean(p_win)`` of what it picked.

Judges favour longer answers, so the benchmark's trusted figure is the **length-controlled**
win rate (Dubois et al., 2024, arXiv:2404.04475): a logistic GLM of the judgement on

    logit P(win) = theta + phi * tanh(delta_len / sd(delta_len)) + psi * gamma_x

(``delta_len`` the answer's length minus the reference's, in characters; ``gamma_x`` the
instruction's difficulty), fitted per model on its own judgements, then read with the length
term at zero: ``LC = 100 * mean_x sigmoid(theta + psi * gamma_x)``. The paper's fit also
regularises towards "gamed" verbose/concise baselines that are not in the recorded data; this
one does not.

**Difficulty.** The leaderboard's ``gamma_x`` come from every leaderboard model and are not
shipped. ``Difficulty.fit`` estimates them from a pool's own judgements: a joint model
``logit = a_m + b_m * tanh(delta / s) + gamma_x`` over every model ``m`` of the pool on the
*training* instructions (ridge on ``gamma``; ``a``, ``b``, ``s`` then stay fixed), and for any
other instruction ``gamma_x`` alone, from the pool's judgements of that instruction with the
model terms fixed. It is part of the metric, like the leaderboard's: no strategy is chosen
with it.

**A strategy** is scored like a model: its selected answers' ``p_win`` and lengths. The fit
has an intercept, so its residuals sum to zero and ``LC`` is also the mean of the
per-instruction *length-adjusted* scores ``p - mu(delta) + mu(0)`` (``LcFit.adjusted``): those
are what the paired comparisons resample (the GLM held fixed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import statsmodels.api as sm
from scipy.optimize import minimize
from scipy.special import expit

#: ridge on the instruction difficulties (a N(0, 1/RIDGE) prior): with 8 judgements an
#: instruction every model wins outright would otherwise have an infinite difficulty
RIDGE = 0.5
_EPS = 1e-9


def win_rate(p_win: np.ndarray) -> float:
    """Percent: the mean judged probability of beating the reference."""
    p = np.asarray(p_win, float)
    return float(100 * p.mean()) if len(p) else float("nan")


def _scale(delta: np.ndarray) -> float:
    s = float(np.std(delta, ddof=1)) if len(delta) > 1 else 0.0
    return s if s > 0 else 1.0


def _bce(y: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Binomial deviance / 2 of fractional targets, stable in ``eta``."""
    return np.logaddexp(0, eta) - y * eta


@dataclass
class Difficulty:
    """The joint fit's model terms (fixed) and a way to read any instruction's difficulty."""

    models: list[str]
    a: np.ndarray  # per model offset
    b: np.ndarray  # per model length coefficient
    scale: float  # sd of the length difference on the training judgements
    gamma_train: dict[str, float]

    @classmethod
    def fit(cls, ids: list[str], p_win: np.ndarray, delta: np.ndarray, models: list[str],
            ridge: float = RIDGE) -> "Difficulty":
        """``p_win``, ``delta``: (instructions x models) on the training instructions ``ids``."""
        y, d = np.asarray(p_win, float), np.asarray(delta, float)
        n, m = y.shape
        scale = _scale(d.ravel())
        t = np.tanh(d / scale)

        def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
            a, b, g = w[:m], w[m:2 * m], w[2 * m:]
            eta = a[None, :] + b[None, :] * t + g[:, None]
            r = expit(eta) - y
            f = _bce(y, eta).sum() + 0.5 * ridge * (g ** 2).sum()
            grad = np.concatenate([r.sum(0), (r * t).sum(0), r.sum(1) + ridge * g])
            return float(f), grad

        w = minimize(loss, np.zeros(2 * m + n), jac=True, method="L-BFGS-B").x
        return cls(list(models), w[:m], w[m:2 * m], scale,
                   dict(zip(ids, w[2 * m:].tolist())))

    def gamma(self, ids: list[str], p_win: np.ndarray, delta: np.ndarray,
              ridge: float = RIDGE) -> np.ndarray:
        """Each instruction's difficulty: the training fit's where it has one, else fitted
        from the pool's judgements of it (``p_win``, ``delta``: instructions x models, the
        models in ``self.models``' order) with the model terms fixed."""
        y, d = np.asarray(p_win, float), np.asarray(delta, float)
        known = np.array([i in self.gamma_train for i in ids], bool)
        out = np.array([self.gamma_train.get(i, 0.0) for i in ids], float)
        if (~known).any():
            yy, base = y[~known], self.a[None, :] + self.b[None, :] * np.tanh(d[~known] / self.scale)

            def loss(g: np.ndarray) -> tuple[float, np.ndarray]:
                eta = base + g[:, None]
                return (float(_bce(yy, eta).sum() + 0.5 * ridge * (g ** 2).sum()),
                        (expit(eta) - yy).sum(1) + ridge * g)

            out[~known] = minimize(loss, np.zeros(int((~known).sum())), jac=True,
                                   method="L-BFGS-B").x
        return out


@dataclass
class LcFit:
    """One model's (or strategy's) length GLM on a set of instructions."""

    win_rate: float  # percent, raw
    lc_win_rate: float  # percent, length term at zero
    coef: tuple[float, float, float]  # theta, phi, psi
    adjusted: np.ndarray  # per instruction: p - mu(delta) + mu(0); mean = LC/100 (unclipped)


def length_controlled(p_win: np.ndarray, delta: np.ndarray, gamma: np.ndarray) -> LcFit:
    """The LC win rate of answers with judged ``p_win``, length difference to the reference
    ``delta`` (characters) and instruction difficulties ``gamma`` (see the module)."""
    y = np.clip(np.asarray(p_win, float), 0.0, 1.0)
    d, g = np.asarray(delta, float), np.asarray(gamma, float)
    t = np.tanh(d / _scale(d))
    x = np.column_stack([np.ones_like(t), t, g])
    coef = _glm(y, x)
    mu = expit(x @ coef)
    mu0 = expit(coef[0] + coef[2] * g)
    adjusted = y - mu + mu0
    return LcFit(win_rate(y), float(100 * mu0.mean()), tuple(float(c) for c in coef), adjusted)


def _glm(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A binomial GLM (logit link) of fractional targets; when the judgements separate
    perfectly (every answer won), a tiny ridge keeps the coefficients finite."""
    if np.ptp(x[:, 1]) > _EPS and 0 < y.mean() < 1:
        try:
            res = sm.GLM(y, x, family=sm.families.Binomial()).fit()
            if np.all(np.isfinite(res.params)) and np.abs(res.params).max() < 50:
                return np.asarray(res.params, float)
        except (ValueError, np.linalg.LinAlgError):  # pragma: no cover - statsmodels edge
            pass

    def loss(w: np.ndarray) -> tuple[float, np.ndarray]:
        eta = x @ w
        r = expit(eta) - y
        return float(_bce(y, eta).sum() + 0.5e-3 * (w[1:] ** 2).sum()), \
            x.T @ r + 1e-3 * np.concatenate([[0.0], w[1:]])

    return minimize(loss, np.zeros(x.shape[1]), jac=True, method="L-BFGS-B").x


def adjusted_answers(d: Difficulty, p_win: np.ndarray, delta: np.ndarray,
                     gamma: np.ndarray) -> np.ndarray:
    """Every answer's length-adjusted score under the joint fit (instructions x models):
    ``p - mu(delta) + mu(0)``: what a length-neutral selector learns from."""
    t = np.tanh(np.asarray(delta, float) / d.scale)
    base = d.a[None, :] + np.asarray(gamma, float)[:, None]
    return np.clip(np.asarray(p_win, float) - expit(base + d.b[None, :] * t) + expit(base),
                   0.0, 1.0)
