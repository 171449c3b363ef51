"""Composition-of-Experts two-step routing: question -> category -> the category's experts.

Step one takes the question's own ``category`` field when it names a known category (unless
``router.use_given_category`` is false, to evaluate the prediction on labelled questions);
otherwise it predicts one. Without a trained classifier the prediction is a zero-shot match of the
question embedding to each category's name and description from the yaml (a softmax over
cosine similarities gives the confidence). Step two is the yaml's category-to-expert map.
A confidence below ``threshold``, or a category with no experts, sends the question to the
``default`` experts; so does a pool that declares no category at all.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

from coe.core.config import DEFAULT_CATEGORY, PoolConfig
from coe.core.types import Question
from coe.learned.embeddings import shared_embedder
from coe.routing.base import Recruit, Route, Router, top_k

ZERO_SHOT_TEMPERATURE = 0.05  # cosine similarities are close together; sharpen the softmax


class ZeroShotCategoryClassifier:
    """Predicts a category by embedding similarity to the category names and descriptions."""

    cross_fitted = True  # it learns nothing from questions

    def __init__(self, config: PoolConfig):
        self.config = config
        self.categories = [c for c in config.category_names() if c != DEFAULT_CATEGORY]
        self.embedder = shared_embedder(config.embeddings.model, config.embeddings.batch_size,
                                        str(config.base_dir))
        self._proto = None

    def _prototypes(self) -> np.ndarray:
        if self._proto is None:
            texts = []
            for c in self.categories:
                desc = self.config.categories.get(c)
                texts.append(f"{c}: {desc.description}" if desc and desc.description else c)
            self._proto = self.embedder.encode(texts)
        return self._proto

    def predict_proba(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        sims = self.embedder.encode(texts) @ self._prototypes().T
        return self.categories, softmax(sims / ZERO_SHOT_TEMPERATURE, axis=-1)


class CategoryRouter(Router):
    name = "category"

    def __init__(self, config: PoolConfig, k: int | None = None, classifier=None,
                 threshold: float | None = None):
        self.config = config
        self.k = k
        self.threshold = config.router.threshold if threshold is None else threshold
        self._classifier = classifier
        self.known = set(config.category_names())
        self.use_given = config.router.use_given_category
        self._experts: dict[str, list[str]] = {}  # category -> its experts (the map, once)

    @classmethod
    def from_config(cls, config, *, executor=None, k=None) -> "CategoryRouter":
        classifier = None
        if config.router.model_file:  # a trained classifier (coe train-router)
            from coe.learned.classifier import load_for_pool

            classifier = load_for_pool(config)
        return cls(config, k, classifier=classifier)

    @property
    def cross_fitted(self) -> bool:
        """Whether a question the router was trained on is routed out-of-sample: the
        zero-shot match and given categories learn nothing from questions; a trained
        classifier must be cross-fitted (``coe.learned.classifier``)."""
        return self._classifier is None or self._classifier.cross_fitted

    @property
    def classifier(self):
        if self._classifier is None:
            self._classifier = ZeroShotCategoryClassifier(self.config)
        return self._classifier

    def _experts_of(self, category: str) -> list[str]:
        experts = self._experts.get(category)
        if experts is None:
            experts = self._experts[category] = (
                self.config.default_experts() if category == DEFAULT_CATEGORY
                else self.config.category_experts(category))
        return experts

    def _route(self, q: Question, category: str, confidence: float, how: str) -> Route:
        experts = self._experts_of(category)
        reason = f"category {category!r} ({how}, confidence {confidence:.2f})"
        if confidence < self.threshold or not experts:
            why = "low confidence" if experts else "no experts"
            experts = self._experts_of(DEFAULT_CATEGORY)
            reason += f" -> default experts ({why})"
        names = top_k(experts, self.k)
        n = len(names)
        return Route(question_id=q.id, category=category, confidence=confidence, reason=reason,
                     experts=[Recruit(name=e, weight=(n - i) / n) for i, e in enumerate(names)])

    def route(self, questions: list[Question]) -> list[Route]:
        routes: dict[int, Route] = {}
        unknown = []
        for i, q in enumerate(questions):
            if self.use_given and q.category and q.category in self.known:
                routes[i] = self._route(q, q.category, 1.0, "given")
            else:
                unknown.append(i)
        if unknown and self._classifier is None and self.known <= {DEFAULT_CATEGORY}:
            # nothing to predict (a pool that declares no categories): the default experts,
            # without loading an embedding model
            for i in unknown:
                routes[i] = self._route(questions[i], DEFAULT_CATEGORY, 1.0,
                                        "the pool has no other category")
            unknown = []
        if unknown:
            labels, proba = self.classifier.predict_proba([questions[i].question for i in unknown])
            best = np.argmax(proba, axis=1)
            confidence = proba[np.arange(len(unknown)), best].tolist()
            for i, b, c in zip(unknown, best.tolist(), confidence):
                routes[i] = self._route(questions[i], labels[b], c, "predicted")
        return [routes[i] for i in range(len(questions))]
