"""Consensus over free text: the answers that say the same thing, found by meaning.

Free-text answers (an explanation, a plan, a poem) almost never agree word for word, so a vote
over extracted answers degenerates to the top-weighted expert. Here each answer is embedded
(the routing encoder), two answers are *linked* when the cosine similarity of their
embeddings is at least ``threshold``, and the clusters are the connected components of that
graph (single linkage: ``scipy.sparse.csgraph.connected_components``). The cluster with the
largest total weight wins (ties: the one holding the highest single weight, then the lowest
index); its answer is the member most *central* to it (the highest summed cosine to the other
members; ties: the higher weight, then the lower index), returned whole, never a fragment.

The threshold is a property of the encoder and the kind of text: ``coe pool`` chooses it on a
judged pool's training half and writes it as ``aggregator.threshold``; ``DEFAULT_THRESHOLD``
otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

DEFAULT_THRESHOLD = 0.8


@dataclass(frozen=True)
class Consensus:
    """``winner``: the index of the answer chosen; ``clusters``: every cluster as indices
    (the winning one first, then by total weight), ``similarity``: the cosine matrix."""

    winner: int | None
    clusters: list[list[int]] = field(default_factory=list)
    similarity: np.ndarray | None = None

    @property
    def agreement(self) -> float:
        """The share of the answers in the winning cluster."""
        n = sum(len(c) for c in self.clusters)
        return len(self.clusters[0]) / n if n else 0.0


def consensus(vectors: np.ndarray, weights: np.ndarray | None = None,
              threshold: float = DEFAULT_THRESHOLD) -> Consensus:
    """The consensus of the answers whose embeddings are the rows of ``vectors`` (see the
    module doc). Rows need not be normalised; a zero row (an empty answer) links to nothing."""
    v = np.asarray(vectors, dtype=np.float64)
    n = len(v)
    if n == 0:
        return Consensus(None)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    unit = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    sim = unit @ unit.T
    linked = sim >= threshold
    np.fill_diagonal(linked, True)
    _, labels = connected_components(csr_matrix(linked), directed=False)
    groups: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), []).append(i)

    def rank(members: list[int]) -> tuple:
        return (-w[members].sum(), -w[members].max(), members[0])

    clusters = sorted(groups.values(), key=rank)
    best = clusters[0]
    centrality = sim[np.ix_(best, best)].sum(axis=1)
    winner = min(range(len(best)), key=lambda j: (-round(float(centrality[j]), 9),
                                                  -w[best[j]], best[j]))
    return Consensus(best[winner], clusters, sim)
