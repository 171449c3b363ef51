"""The length-controlled win rate (coe.learned.winrate) on judgements simulated from the paper's
GLM, where the truth is known."""

from __future__ import annotations

import numpy as np
from scipy.special import expit

from coe.learned.winrate import Difficulty, adjusted_answers, length_controlled, win_rate


def _simulate(n: int = 600, seed: int = 0):
    """Three models, one reference: judgements drawn from logit = a_m + b * tanh(delta / 800)
    + gamma_x; model 2 is the weakest but writes the longest answers."""
    rng = np.random.default_rng(seed)
    gamma = rng.normal(0, 1, n)
    a = np.array([0.5, 0.0, -1.0])
    delta = np.column_stack([rng.normal(0, 300, n), rng.normal(0, 300, n),
                             rng.normal(1000, 700, n)])
    eta = a[None, :] + 1.5 * np.tanh(delta / 800) + gamma[:, None]
    p = rng.binomial(1, expit(eta)).astype(float)
    truth = 100 * expit(a[None, :] + gamma[:, None]).mean(axis=0)
    return [f"q{i}" for i in range(n)], p, delta, gamma, truth


def test_win_rate_is_the_mean_judged_probability_in_percent():
    assert win_rate(np.array([1.0, 0.5, 0.0, 0.9])) == 60.0


def test_a_model_that_wins_by_length_alone_loses_its_advantage_under_lc():
    ids, p, delta, gamma, truth = _simulate()
    raw = [length_controlled(p[:, m], delta[:, m], gamma).win_rate for m in range(3)]
    lc = [length_controlled(p[:, m], delta[:, m], gamma).lc_win_rate for m in range(3)]
    assert raw[2] > raw[1]  # the long answers win raw...
    assert lc[2] < lc[1] - 5  # ...but not with the length held at the reference's
    assert np.allclose(lc, truth, atol=6.0), (lc, truth)


def test_lc_is_the_mean_of_the_length_adjusted_scores():
    ids, p, delta, gamma, _ = _simulate()
    fit = length_controlled(p[:, 0], delta[:, 0], gamma)
    assert abs(100 * fit.adjusted.mean() - fit.lc_win_rate) < 0.01
    assert not np.allclose(fit.adjusted, p[:, 0])  # the length term moved the scores


def test_difficulty_is_recovered_on_training_and_unseen_instructions():
    ids, p, delta, gamma, _ = _simulate(n=800, seed=1)
    tr, te = slice(0, 400), slice(400, 800)
    d = Difficulty.fit(ids[tr], p[tr], delta[tr], ["a", "b", "c"])
    g = d.gamma(ids, p, delta)
    assert np.corrcoef(g[tr], gamma[tr])[0, 1] > 0.5
    assert np.corrcoef(g[te], gamma[te])[0, 1] > 0.5
    assert d.b.min() > 0  # the judge's length preference is found for every model
    # a training instruction keeps its training estimate whatever judgements come with it
    assert np.allclose(d.gamma(ids[:3], np.zeros((3, 3)), delta[:3]), g[:3])


def test_length_adjusted_answers_remove_the_length_effect():
    ids, p, delta, gamma, _ = _simulate(n=800, seed=2)
    d = Difficulty.fit(ids, p, delta, ["a", "b", "c"])
    adj = adjusted_answers(d, p, delta, d.gamma(ids, p, delta))
    assert p[:, 2].mean() > p[:, 1].mean() and adj[:, 2].mean() < adj[:, 1].mean()


def test_a_strategy_that_always_wins_has_a_finite_lc_near_100():
    rng = np.random.default_rng(3)
    fit = length_controlled(np.ones(50), rng.normal(0, 200, 50), rng.normal(0, 1, 50))
    assert 95 <= fit.lc_win_rate <= 100 and np.all(np.isfinite(fit.coef))
