"""kNN recruiting: the experts that did best on the most similar profiled questions.

``router: {kind: knn, neighbours: 200, k: 3, profiles: profiles.json}``. For each question,
its ``neighbours`` nearest questions of the profiles' validation record (``coe profile``), by
cosine similarity of the pool's embeddings; each expert's accuracy on them, shrunk towards its
global accuracy (``coe.learned.neighbours.Neighbourhood``); the top ``k`` recruited, strongest first
(ties: the globally stronger), each weighted by that local accuracy (so a vote tie goes to
the locally strongest).

A question the record holds (same id and text) is not its own neighbour, so routing the
validation questions again gives out-of-sample routes (``cross_fitted``).

With ``budget`` the router's recruits are asked as a cascade (``coe.routing.cascade``): the k
strongest in order, one more per round, until the answer selector is confident enough. As a
cap (``budget_mode: cap``, the default) the cascade asks at most ``floor(budget)`` recruits
(fewer when ``k`` is smaller). As a mean (``budget_mode: mean``) it asks up to ``k``; without
``k`` in the yaml, the depth is chosen on the validation record too: the k (from the budget up
to the pool's size) whose calibrated cascade is most accurate there.
"""

from __future__ import annotations

import math

import numpy as np

from coe.core.errors import ConfigError
from coe.core.types import Question
from coe.learned.profiles import Profiles
from coe.routing.base import Recruit, Route, Router
from coe.routing.cascade import Cascade, cap_depth


class KnnRouter(Router):
    name = "knn"
    cross_fitted = True

    def __init__(self, config, profiles: Profiles, k: int | None = 3, neighbours: int = 200,
                 budget: float | None = None, budget_mode: str = "cap"):
        """``k``: recruits per question (3 when None), or with ``budget`` the cascade's most
        experts (None: the cap's, or for a mean the depth whose cascade is most accurate on
        the validation record)."""
        profiles.check_pool(config)
        self.config = config
        self.profiles = profiles
        self.k = k or 3
        self.experts = [e.name for e in config.experts]
        self.hood = profiles.neighbourhood(config, neighbours)
        rec = self.hood.record
        missing = [e for e in self.experts if e not in rec.experts]
        if missing:
            raise ConfigError(f"the profiles' validation record has no answers of "
                              f"{', '.join(missing)} (run coe profile with this pool)")
        self.columns = np.array([rec.experts.index(e) for e in self.experts])
        self.glob = self.hood.glob[self.columns]
        #: with ``budget``: the recruits are asked in rounds (``coe.routing.cascade``)
        self.cascade: Cascade | None = None
        if budget is not None:
            selector = profiles.selector_for(config)
            if selector.experts != rec.experts:
                raise ConfigError("the profiles' answer selector and validation record disagree "
                                  "(rebuild the profiles with coe profile)")
            order = self.order(self.hood.local_of_record()[:, self.columns])
            if budget_mode == "cap":
                depth = min(k or len(self.experts), cap_depth(budget), len(self.experts))
                self.cascade = Cascade.calibrate(selector, order[:, :depth], self.columns,
                                                 budget, "cap")
                self.k = self.cascade.max_experts
            elif k is not None:
                self.cascade = Cascade.calibrate(selector, order[:, :self.k], self.columns,
                                                 budget, "mean")
            else:  # the cascade's depth, chosen on the validation record too
                n = len(self.experts)
                tried = [Cascade.calibrate(selector, order[:, :m], self.columns, budget, "mean")
                         for m in range(min(max(2, math.ceil(budget)), n), n + 1)]
                self.cascade = max(tried, key=lambda c: (c.validation_accuracy, -c.max_experts))
                self.k = self.cascade.max_experts

    @classmethod
    def from_config(cls, config, *, executor=None, k=None) -> "KnnRouter":
        rc = config.router
        if not rc.profiles:
            raise ConfigError(f"{config.source}: router 'knn' needs router.profiles "
                              "(build them with coe profile)")
        path = config.resolve_path(rc.profiles)
        k = k or rc.k or (None if rc.budget is not None else 3)
        return cls(config, Profiles.load(path), k=k, neighbours=rc.neighbours, budget=rc.budget,
                   budget_mode=rc.budget_mode)

    def local(self, questions: list[Question]) -> np.ndarray:
        """Local accuracy of every pool expert (questions x pool experts)."""
        return self.hood.local(questions)[:, self.columns]

    def order(self, local: np.ndarray) -> np.ndarray:
        """Every expert per question, strongest first (ties: globally stronger, pool order)."""
        return np.lexsort((np.arange(len(self.experts))[None, :].repeat(len(local), 0),
                           -self.glob[None, :].repeat(len(local), 0), -local), axis=1)

    def route(self, questions: list[Question]) -> list[Route]:
        if not questions:
            return []
        local = self.local(questions)
        order = self.order(local)[:, :self.k]
        n = self.hood.neighbours
        routes = []
        for q, loc, picked in zip(questions, local.tolist(), order.tolist()):
            routes.append(Route(
                question_id=q.id, confidence=round(loc[picked[0]], 4),
                experts=[Recruit(name=self.experts[j], weight=round(loc[j], 4)) for j in picked],
                reason=f"knn ({n} neighbours): " + ", ".join(
                    f"{self.experts[j]} {loc[j]:.2f}" for j in picked)))
        return routes
