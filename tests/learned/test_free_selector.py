"""The learned selector over free-text answers (coe.learned.free_selector)."""

from __future__ import annotations

import numpy as np

from coe.learned import free_selector


def _data(n: int = 300, seed: int = 0):
    """Three experts; expert 0 wins where the knn 'local' feature says so, expert 1 elsewhere,
    expert 2 never: the selector must read the local feature, not a fixed expert."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, 3, 8))
    vectors /= np.linalg.norm(vectors, axis=2, keepdims=True)
    chars = rng.integers(200, 2000, size=(n, 3)).astype(float)
    side = rng.random(n) < 0.5
    local = np.column_stack([np.where(side, 0.8, 0.2), np.where(side, 0.2, 0.8), np.full(n, 0.1)])
    p = np.column_stack([np.where(side, 0.9, 0.1), np.where(side, 0.1, 0.9), np.full(n, 0.05)])
    cand = np.tile(np.arange(3), (n, 1))
    return vectors, chars, local, cand, p


def test_the_cross_fitted_selector_picks_the_locally_strong_expert():
    vectors, chars, local, cand, p = _data()
    picks = free_selector.cross_fitted(vectors, chars, local, cand, p)
    best_single = p.mean(axis=0).max()
    assert p[np.arange(len(p)), picks].mean() > best_single + 0.3


def test_candidates_outside_the_route_are_never_picked():
    vectors, chars, local, cand, p = _data()
    two = cand[:, 1:].copy()  # experts 1 and 2 only
    sel = free_selector.fitted(vectors, chars, local, two, p)
    x = free_selector.features(vectors, chars, local, two)
    assert set(sel.pick(x, two).tolist()) <= {1, 2}
    assert len(x) == 2 * len(cand)


def test_the_length_neutral_features_leave_length_out():
    vectors, chars, local, cand, p = _data(n=10)
    use = tuple(f for f in free_selector.FEATURES if f != "length_z")
    full = free_selector.features(vectors, chars, local, cand)
    neutral = free_selector.features(vectors, chars, local, cand, use)
    assert full.shape[1] == neutral.shape[1] + 1
    assert not np.allclose(full[:, 1], neutral[:, 1])  # the length column is gone
