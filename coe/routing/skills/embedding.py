"""Skills without an LLM call: the question's embedding against the vocabulary's
("name: description") embeddings; the closest ``max_skills`` skills, weighted by a softmax of
their similarities. One batched embedding call per batch of questions."""

from __future__ import annotations

import numpy as np

from coe.learned.embeddings import shared_embedder
from coe.routing.skills.vocabulary import load_vocabulary

SKILL_TEMPERATURE = 0.05


class VocabularySkills:
    source = "vocabulary"

    def __init__(self, config, max_skills: int | None = None, vocabulary: dict[str, str] | None = None):
        self.vocabulary = vocabulary or load_vocabulary(config)
        self.names = list(self.vocabulary)
        self.max_skills = max_skills or config.router.max_skills
        self.embedder = shared_embedder(config.embeddings.model, config.embeddings.batch_size,
                                        str(config.base_dir))
        self._vecs = None

    def _vocab_vecs(self) -> np.ndarray:
        if self._vecs is None:
            self._vecs = self.embedder.encode([f"{n}: {d}" for n, d in self.vocabulary.items()])
        return self._vecs

    def infer(self, questions) -> list[dict[str, float]]:
        if not questions:
            return []
        sims = self.embedder.encode([q.question for q in questions]) @ self._vocab_vecs().T
        top = np.argsort(-sims, axis=1, kind="stable")[:, : self.max_skills]
        best = np.take_along_axis(sims, top, axis=1)
        z = np.exp((best - best[:, :1]) / SKILL_TEMPERATURE)
        weights = np.round(z / z.sum(axis=1, keepdims=True), 4).tolist()
        names = self.names
        return [{names[i]: w for i, w in zip(idx, ws)} for idx, ws in zip(top.tolist(), weights)]
