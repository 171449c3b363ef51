"""``coe eval`` on a pairwise-judged pool: every *selection* strategy, scored exactly offline.

A strategy picks one recorded answer per instruction; its **win rate** is the mean judged
``p_win`` of what it picked and its **length-controlled win rate** the LC of
``coe.learned.winrate`` (the strategy fitted like a model). Strategies (answers/instruction =
experts consulted):

- ``single:<expert>``; ``best-single``: the highest LC win rate on the training half;
- ``random1``; ``random3+vote``: 3 experts drawn at random (``strategies.random_table``),
  their consensus (``coe.aggregation.consensus``, the pool's ``aggregator.threshold``);
- ``all+vote``: the consensus of all experts, weighted by strength;
- ``knn@1``, ``knn<k>+vote``: the knn router's recruits (``coe.routing.knn`` over the pool's
  training record, routed with the pipeline's route stage; a training instruction is not its
  own neighbour), their consensus weighted by the router's local win rates;
- ``knn<k>+selector``, ``all+selector``: the learned free-text selector
  (``coe.learned.free_selector``) over those candidates; ``...+selector-lc``: the same
  trained on length-adjusted scores without the length feature (length-neutral);
- ``longest`` (a diagnostic: the judge's length bias alone) and ``oracle`` (the highest
  ``p_win``: the bound).

Everything is chosen on the training half ("validation"): best-single, the threshold, the
selector (fitted there; cross-fitted for its training figures) and the recommendation. The
test half is scored once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import bootstrap

from coe.apps.eval.compare import CONFIDENCE, Comparison, compare_scores, holm
from coe.apps.eval.judged_data import JudgedData, JudgedSet
from coe.apps.eval.recommend import Recommendation
from coe.apps.eval.strategies import random_table, select
from coe.core.config import PoolConfig
from coe.learned import free_selector
from coe.learned.winrate import LcFit, adjusted_answers
from coe.pipeline.route import route
from coe.routing import build_router

DEFAULT_THRESHOLD = 0.8
KS = (2, 3)
#: strategies never recommended, and why
NOT_RECOMMENDABLE = {"oracle": "not deployable: it reads the judge's verdicts",
                     "longest": "a diagnostic of the judge's length bias",
                     "random": "a baseline: no router draws experts at random"}


@dataclass
class JudgedScore:
    """A strategy on one question set."""

    name: str
    picks: np.ndarray
    fit: LcFit
    chars: np.ndarray  # the picked answers' lengths
    consulted: float  # answers (experts asked) per instruction
    ci: tuple[float, float] = (0.0, 0.0)  # win rate, percent
    lc_ci: tuple[float, float] = (0.0, 0.0)

    def to_json(self) -> dict:
        return {"win_rate": round(self.fit.win_rate, 3), "win_rate_ci95": [round(x, 3) for x in self.ci],
                "lc_win_rate": round(self.fit.lc_win_rate, 3),
                "lc_win_rate_ci95": [round(x, 3) for x in self.lc_ci],
                "mean_chars": round(float(self.chars.mean()), 1),
                "answers_per_instruction": self.consulted, "questions": len(self.picks)}


@dataclass
class JudgedStrategy:
    name: str
    kind: str  # single | best-single | random | vote | selector | longest | oracle
    description: str
    scores: dict[str, JudgedScore] = field(default_factory=dict)  # set name -> score


def _mean_ci(x: np.ndarray, seed: int) -> tuple[float, float]:
    if len(x) < 2 or np.ptp(x) == 0:
        m = float(100 * x.mean()) if len(x) else 0.0
        return m, m
    r = bootstrap((x,), np.mean, vectorized=True, n_resamples=2000, method="percentile",
                  confidence_level=CONFIDENCE, rng=np.random.default_rng(seed))
    return float(100 * r.confidence_interval.low), float(100 * r.confidence_interval.high)


class JudgedEvaluation:
    """Every judged strategy on both halves (see the module); ``run`` returns itself."""

    def __init__(self, config: PoolConfig, train, test, seed: int = 0, log=None,
                 strategies: str | list[str] | None = None):
        self.config, self.seed, self.log = config, seed, log
        self.patterns = strategies  # --strategies: the ones reported (best-single always)
        self.data = JudgedData.load(config, train, test)
        self.names = self.data.names
        self.threshold = (config.aggregator.threshold if config.aggregator.threshold is not None
                          else DEFAULT_THRESHOLD)
        self.strategies: list[JudgedStrategy] = []
        self.best: str | None = None
        self.comparisons: dict[str, dict[str, Comparison]] = {}
        self.raw_comparisons: dict[str, dict[str, Comparison]] = {}
        self.recommendation: Recommendation | None = None
        self.notes: list[str] = []
        self.router_local: dict[str, np.ndarray] = {}  # set -> experts' local win rates
        self.routes: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # set -> knn ranking
        self.judge: dict | None = None  # --judge: coe.apps.eval.judged_live's report entry

    @property
    def sets(self) -> dict[str, JudgedSet]:
        return {"validation": self.data.train, "test": self.data.test}

    def _add(self, name: str, kind: str, description: str, picks: dict[str, np.ndarray],
             consulted: float) -> None:
        st = JudgedStrategy(name, kind, description)
        for where, s in self.sets.items():
            pick = picks[where]
            fit = self.data.lc(s, pick)
            sc = JudgedScore(name, pick, fit, s.chars[s.rows(), pick], consulted)
            sc.ci = _mean_ci(self.data.picked(s, pick)[0], self.seed)
            sc.lc_ci = _mean_ci(fit.adjusted, self.seed)
            st.scores[where] = sc
        self.strategies.append(st)

    def strategy(self, name: str) -> JudgedStrategy:
        return next(s for s in self.strategies if s.name == name)

    def run(self) -> "JudgedEvaluation":
        e, sets = len(self.names), self.sets
        for j, n in enumerate(self.names):
            self._add(f"single:{n}", "single", f"{n} alone",
                      {w: np.full(len(s.questions), j) for w, s in sets.items()}, 1)
        train_lc = [self.strategy(f"single:{n}").scores["validation"].fit for n in self.names]
        b = max(range(e), key=lambda j: (round(train_lc[j].lc_win_rate, 9), train_lc[j].win_rate, -j))
        self.best = self.names[b]
        self._add("best-single", "best-single", f"{self.best} (LC win rate "
                  f"{train_lc[b].lc_win_rate:.1f} on the training half)",
                  {w: np.full(len(s.questions), b) for w, s in sets.items()}, 1)
        for k in (1, 3):
            tables = {w: random_table(s.ids, self.names, k, self.seed) for w, s in sets.items()}
            if k == 1:
                self._add("random1", "random", "one expert drawn at random (seeded)",
                          {w: t.experts[:, 0].astype(np.int64) for w, t in tables.items()}, 1)
            else:
                self._add("random3+vote", "random", "3 experts at random, their consensus",
                          {w: self.data.vote(sets[w], t.experts, t.weights, self.threshold)
                           for w, t in tables.items()}, 3)
        every = {w: np.tile(np.arange(e), (len(s.questions), 1)) for w, s in sets.items()}
        strength = {w: np.tile(self.data.strength, (len(s.questions), 1)) for w, s in sets.items()}
        self._add("all+vote", "vote", f"consensus of all {e} (threshold {self.threshold:g}), "
                  "weighted by strength",
                  {w: self.data.vote(s, every[w], strength[w], self.threshold)
                   for w, s in sets.items()}, e)
        routes, local = self._knn_routes()
        self.router_local, self.routes = local, routes
        self._add("knn@1", "vote", "the knn router's first expert",
                  {w: routes[w][0][:, 0] for w in sets}, 1)
        for k in KS:
            cand = {w: routes[w][0][:, :k] for w in sets}
            self._add(f"knn{k}+vote", "vote", f"knn router's {k} experts, their consensus",
                      {w: self.data.vote(s, cand[w], routes[w][1][:, :k], self.threshold)
                       for w, s in sets.items()}, k)
            self._selectors(f"knn{k}", cand, local, k)
        self._selectors("all", every, local, e)
        self._add("longest", "longest", "the longest answer (diagnostic)",
                  {w: np.argmax(s.chars, axis=1) for w, s in sets.items()}, e)
        self._add("oracle", "oracle", "the answer the judge preferred most (bound)",
                  {w: np.argmax(s.p, axis=1) for w, s in sets.items()}, e)
        if self.patterns:
            keep = {s.name for s in select(self.strategies, self.patterns)} | {"best-single"}
            self.strategies = [s for s in self.strategies if s.name in keep]
        self.compare()
        self.recommend()
        return self

    def _knn_routes(self):
        """Per set: (experts, weights) of the knn router's full ranking, and every expert's
        local win rate (questions x experts)."""
        router = build_router("knn", self.config, k=len(self.names))
        out, local = {}, {}
        for w, s in self.sets.items():
            table, _ = route(router, s.questions, self.names)
            out[w] = (table.experts.astype(np.int64), table.weights)
            local[w] = router.local(s.questions)
        return out, local

    def _selectors(self, prefix: str, cand: dict, local: dict, consulted: int) -> None:
        d, tr, te = self.data, self.data.train, self.data.test
        for suffix, use, target in (
                ("selector", free_selector.FEATURES, tr.p),
                ("selector-lc", tuple(f for f in free_selector.FEATURES if f != "length_z"),
                 adjusted_answers(d.difficulty, tr.p, tr.delta, tr.gamma))):
            args = (tr.vectors, tr.chars, local["validation"], cand["validation"], target)
            val = free_selector.cross_fitted(*args, use=use, seed=self.seed)
            sel = free_selector.fitted(*args, use=use, seed=self.seed)
            x = free_selector.features(te.vectors, te.chars, local["test"], cand["test"], use)
            what = "length-neutral: length-adjusted target, no length feature" \
                if suffix == "selector-lc" else "trained on p_win"
            self._add(f"{prefix}+{suffix}", "selector",
                      f"learned selector over {'all experts' if prefix == 'all' else prefix + ' recruits'} "
                      f"({what}; cross-fitted on the training half)",
                      {"validation": val, "test": sel.pick(x, cand["test"])}, consulted)

    def compare(self) -> None:
        """Each strategy against best-single on both halves, on LC-adjusted and raw scores;
        Holm over each family."""
        ref = self.strategy("best-single")
        for where, s in self.sets.items():
            lc, raw = {}, {}
            r_lc, r_p = ref.scores[where].fit.adjusted, self.data.picked(s, ref.scores[where].picks)[0]
            for st in self.strategies:
                if st.name == "best-single":
                    continue
                sc = st.scores[where]
                lc[st.name] = compare_scores(sc.fit.adjusted, r_lc, self.seed)
                raw[st.name] = compare_scores(self.data.picked(s, sc.picks)[0], r_p, self.seed)
            self.comparisons[where], self.raw_comparisons[where] = holm(lc), holm(raw)

    def recommend(self) -> None:
        """The cheapest strategy whose LC win rate beats best-single significantly on the
        training half (Holm), ties to the higher LC; else best-single."""
        excluded = {s.name: NOT_RECOMMENDABLE[s.kind] for s in self.strategies
                    if s.kind in NOT_RECOMMENDABLE}
        val = self.comparisons["validation"]
        better = [s for s in self.strategies if s.name in val and s.name not in excluded
                  and val[s.name].verdict == "better"]
        better.sort(key=lambda s: (s.scores["validation"].consulted,
                                   -s.scores["validation"].fit.lc_win_rate))
        if not better:
            self.recommendation = Recommendation(
                "best-single", "no strategy's LC win rate is significantly higher than "
                "best-single's on the training half (paired bootstrap / t-test, Holm): the best "
                "single model is the honest choice", 1.0, [], excluded)
            return
        pick, c = better[0], val[better[0].name]
        self.recommendation = Recommendation(
            pick.name, f"the cheapest strategy ({pick.scores['validation'].consulted:g} "
            f"answers/instruction) whose LC win rate beats best-single's significantly on the "
            f"training half ({100 * c.diff:+.1f} points, [{100 * c.ci[0]:+.1f}, "
            f"{100 * c.ci[1]:+.1f}], Holm p = {c.p_holm:.2g})",
            pick.scores["validation"].consulted, [s.name for s in better], excluded)
