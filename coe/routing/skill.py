"""Symbolic-MoE recruiting: skills -> profile skills -> expert scores -> top-k (or top-p).

For each question of a batch:
1. infer its skills (``{skill: weight}``: vocabulary match or an LLM's keywords);
2. match each to the profile skills by embedding similarity (an exact name matches with 1;
   otherwise the most similar profile skills at or above ``MATCH_THRESHOLD``);
3. score each expert: *local suitability* = sum over matched skills of
   weight x similarity x the expert's normalised score on that skill, plus ``global_weight``
   x its *global competence*. A skill score is the expert's net right-minus-wrong on that
   skill over the skill's weight, shrunk towards its global competence (``PRIOR`` pseudo
   questions) so a skill seen twice does not outweigh one seen two hundred times; global
   competence is 2 x accuracy - 1 on the same scale;
4. softmax the scores with ``temperature``; recruit the top ``k`` (default 3), or with
   ``top_p`` as many as it takes for the cumulative probability to reach p (harder, more
   uncertain questions get more experts), dropping recruits below ``min_prob`` (at least one
   stays).
The route suggests as aggregator the expert with the best aggregation accuracy in the
profiles (an aggregator expert set in the yaml or on the command line wins over it).

Skills are inferred the way the profiles were built (``skill_source``); ``router.skills`` in
the yaml, when set, must agree, since profile skills and inferred skills must be comparable.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.special import softmax

from coe.core.errors import ConfigError
from coe.core.types import Question
from coe.learned.embeddings import phrase_model, shared_embedder
from coe.learned.profiles import Profiles, skill_matrix
from coe.routing.base import Recruit, Route, Router
from coe.routing.skills import build_skill_inferrer

MATCH_THRESHOLD = 0.6
PRIOR = 5.0  # pseudo-questions at global competence added to every skill score


class SkillRouter(Router):
    name = "skill"

    @classmethod
    def from_config(cls, config, *, executor=None, k=None) -> "SkillRouter":
        return build_skill_router(config, executor, k)

    def __init__(self, config, profiles: Profiles, inferrer, k: int | None = 3,
                 top_p: float | None = None, temperature: float = 0.1, min_prob: float = 0.02,
                 global_weight: float = 0.5):
        profiles.check_pool(config)
        self.config = config
        self.profiles = profiles
        self.inferrer = inferrer
        self.k = k or 3
        self.top_p = top_p
        self.temperature = temperature
        self.min_prob = min_prob
        self.global_weight = global_weight
        self.experts = [e.name for e in config.experts]
        self.aggregator = profiles.best_aggregator()
        self.embedder = shared_embedder(phrase_model(config.embeddings.model),
                                        config.embeddings.batch_size,
                                        str(config.base_dir))
        self._skill_table()

    def _skill_table(self) -> None:
        """Per expert and profile skill, the shrunk normalised score (experts x skills)."""
        self.skills = self.profiles.skill_names()
        self.skill_index = {s: i for i, s in enumerate(self.skills)}
        g = np.array([2 * self.profiles.experts[e].accuracy - 1 for e in self.experts])
        table = np.zeros((len(self.experts), len(self.skills)))
        for i, e in enumerate(self.experts):
            p = self.profiles.experts[e]
            for s, score in p.skills.items():
                table[i, self.skill_index[s]] = (score + PRIOR * g[i]) / (p.seen[s] + PRIOR)
            for s, j in self.skill_index.items():
                if s not in p.skills:
                    table[i, j] = g[i]
        self.global_competence = g
        self.table = table
        self._skill_vecs = None

    def _match(self, names: list[str]) -> dict[str, list[tuple[int, float]]]:
        """Profile skills (index, similarity) for each inferred skill name."""
        out = {n: [(self.skill_index[n], 1.0)] for n in names if n in self.skill_index}
        other = [n for n in names if n not in out]
        if other and self.skills:
            if self._skill_vecs is None:
                self._skill_vecs = self.embedder.encode(self.skills)
            sims = self.embedder.encode(other) @ self._skill_vecs.T
            for n, row in zip(other, sims):
                hits = np.flatnonzero(row >= MATCH_THRESHOLD)
                if not len(hits):
                    hits = [int(np.argmax(row))] if row.max() >= MATCH_THRESHOLD / 2 else []
                out[n] = [(int(j), float(row[j])) for j in hits]
        return out

    def scores(self, questions: list[Question]) -> tuple[np.ndarray, list[dict[str, float]]]:
        """Expert scores (questions x experts) and each question's inferred skills.

        Two sparse products: the questions' skill weights (questions x inferred names) times
        the names' matches (inferred names x profile skills) gives each question's weight on
        every profile skill; that times the skill table gives the local suitabilities."""
        inferred = self.inferrer.infer(questions)
        weights, names = skill_matrix(inferred)
        col = {n: i for i, n in enumerate(names)}
        matches = self._match(names)
        m_rows = [col[n] for n in names for _ in matches.get(n, [])]
        m_cols = [j for n in names for j, _ in matches.get(n, [])]
        m_vals = [sim for n in names for _, sim in matches.get(n, [])]
        match = sparse.csr_matrix((m_vals, (m_rows, m_cols)), shape=(len(names), len(self.skills)))
        per_skill = weights @ match  # questions x profile skills: sum of weight x similarity
        total = np.asarray(per_skill.sum(axis=1)).ravel()
        local = np.asarray(per_skill @ self.table.T).reshape(len(questions), len(self.experts))
        matched = total != 0
        local[matched] /= total[matched, None]
        local[~matched] = self.global_competence  # no skill matched: global competence decides
        return local + self.global_weight * self.global_competence, inferred

    def _pick(self, probs: np.ndarray) -> np.ndarray:
        """Recruits per question (questions x experts, True where recruited): the top k, or
        with top_p the fewest whose probability reaches p; those under ``min_prob`` dropped
        (the first always stays)."""
        order = np.argsort(-probs, axis=1, kind="stable")
        ranked = np.take_along_axis(probs, order, axis=1)
        if self.top_p is not None:
            reached = np.cumsum(ranked, axis=1) >= self.top_p
            reached[:, -1] = True
            count = reached.argmax(axis=1) + 1
        else:
            count = np.full(len(probs), min(self.k, probs.shape[1]))
        keep = (np.arange(probs.shape[1])[None, :] < count[:, None]) & (ranked >= self.min_prob)
        keep[:, 0] = True
        picked = np.zeros_like(keep)
        np.put_along_axis(picked, order, keep, axis=1)
        return picked

    def route(self, questions: list[Question]) -> list[Route]:
        if not questions:
            return []
        scores, inferred = self.scores(questions)
        probs = softmax(scores / self.temperature, axis=-1)
        picked = self._pick(probs)
        mass = (probs * picked).sum(axis=1)
        order = np.argsort(-probs, axis=1, kind="stable")
        routes = []
        for qi, (q, sk) in enumerate(zip(questions, inferred)):
            p, chosen = probs[qi], [int(i) for i in order[qi] if picked[qi, i]]
            top = ", ".join(f"{s} {w:.2f}" for s, w in sk.items())
            routes.append(Route(
                question_id=q.id, skills=list(sk), confidence=round(float(mass[qi]), 4),
                experts=[Recruit(name=self.experts[i], weight=round(float(p[i] / mass[qi]), 4))
                         for i in chosen],
                aggregator=self.aggregator,
                reason=f"skills [{top}] -> p=" + ", ".join(f"{self.experts[i]} {p[i]:.2f}"
                                                           for i in chosen)))
        return routes


def profile_skill_kind(profiles: Profiles) -> tuple[str, str | None]:
    """(``vocabulary`` or ``keywords``, the keyword expert) the profiles were built with."""
    kind, _, expert = profiles.skill_source.partition(":")
    return ("keywords", expert) if kind == "keywords" else ("vocabulary", None)


def build_skill_router(config, executor=None, k: int | None = None) -> SkillRouter:
    rc = config.router
    if not rc.profiles:
        raise ConfigError(f"{config.source}: router 'skill' needs router.profiles "
                          f"(build them with coe profile)")
    path = config.resolve_path(rc.profiles)
    profiles = Profiles.load(path)
    profiles.check_pool(config, str(path))
    kind, expert = profile_skill_kind(profiles)
    if rc.skills is not None and rc.skills != kind:
        raise ConfigError(f"{config.source}: router.skills is {rc.skills!r} but {path} was built "
                          f"with skills from {profiles.skill_source} (rebuild the profiles with "
                          f"coe profile --skills {rc.skills}, or set router.skills: {kind})")
    if expert and rc.keyword_expert and rc.keyword_expert != expert:
        raise ConfigError(f"{config.source}: router.keyword_expert is {rc.keyword_expert!r} but "
                          f"{path} was built with keywords from {expert!r}")
    inferrer = build_skill_inferrer(config, executor, kind, expert=expert)
    return SkillRouter(config, profiles, inferrer, k=k or rc.k or 3, top_p=rc.top_p,
                       temperature=rc.temperature, min_prob=rc.min_prob,
                       global_weight=rc.global_weight)
