"""Merging similar skill keywords by embedding similarity, so "organic chem", "organic
chemistry" and "chemistry of organic compounds" count as one skill in the profiles.

``SkillCanon`` keeps canonical names in first-seen order; a new keyword whose embedding is at
least ``threshold`` cosine-similar to a canonical one takes that name, otherwise it becomes a
canonical name itself."""

from __future__ import annotations

import threading

import numpy as np

from coe.learned.embeddings import phrase_model, shared_embedder

MERGE_THRESHOLD = 0.8


class SkillCanon:
    def __init__(self, config, names: list[str] | None = None, threshold: float = MERGE_THRESHOLD):
        self.embedder = shared_embedder(phrase_model(config.embeddings.model),
                                        config.embeddings.batch_size,
                                        str(config.base_dir))
        self.threshold = threshold
        self._lock = threading.Lock()  # two concurrent runs may grow the canon at once
        self.names: list[str] = []
        self._vecs = np.zeros((0, 0), dtype=np.float32)
        if names:
            self.canonical_batch([names])

    def canonical_batch(self, batch: list[list[str]]) -> list[list[str]]:
        """Canonical names for each list of keywords (all keywords embedded in one call)."""
        flat = list(dict.fromkeys(k for ks in batch for k in ks))
        mapping: dict[str, str] = {}
        with self._lock:
            self._canonical(flat, mapping)
        return [[mapping[k] for k in ks] for ks in batch]

    def _canonical(self, flat: list[str], mapping: dict[str, str]) -> None:
        if flat:
            vecs = self.embedder.encode(flat)
            for kw, v in zip(flat, vecs):
                if self.names:
                    sims = self._vecs @ v
                    best = int(np.argmax(sims))
                    if sims[best] >= self.threshold:
                        mapping[kw] = self.names[best]
                        continue
                self.names.append(kw)
                self._vecs = v[None, :] if not len(self._vecs) else np.vstack([self._vecs, v])
                mapping[kw] = kw
