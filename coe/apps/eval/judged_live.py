"""``coe eval --judge EXPERT`` on a pairwise-judged pool: what the recorded judgements cannot
score, judged by an expert of the pool (``coe.apps.eval.judge``: both orders, ties allowed).

1. **How far to trust it.** The judge judges ``sample`` recorded answers of the training half
   (instruction and expert drawn at random, seeded; empty answers left out) against the
   reference, and its verdicts are compared with the recorded ones (GPT-4 Turbo's):
   agreement on the winner with a 95% interval, rank correlation, agreement of its own two
   orders, and a plain sentence (``Trust.sentence``).
2. **New text** (with an aggregator expert: ``--aggregator-expert``, else the yaml's
   ``aggregator.expert``): ``knn<k>+fuse`` — the llm aggregator in ``fuse`` mode writes one
   answer from the knn router's ``k`` recruits' recorded answers — on the first ``limit``
   instructions of the test half. The judge judges those answers and best-single's recorded
   ones on the same instructions, so the two are compared under one judge (never the local
   judge's figure against GPT-4 Turbo's): win rates, mean lengths, and the paired difference
   with a bootstrap interval. No LC here: the length model is fitted to the recorded judge.

Every generation goes through the pool's executor and response cache, as ``coe eval``'s do.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coe.aggregation.llm import LLMAggregator
from coe.apps.eval import judge as pairwise
from coe.apps.eval.compare import compare_scores
from coe.apps.eval.judged_data import _read_replay
from coe.core.config import PoolConfig
from coe.core.errors import ConfigError
from coe.core.registry import BACKENDS
from coe.core.types import ExpertResponse, Recruit, Route
from coe.execution import build_executor
from coe.io.cache import open_cache


@dataclass(frozen=True)
class LiveJudging:
    judge: str
    sample: int = 40  # recorded answers of the training half judged to measure trust
    limit: int = 40  # test instructions of the knn<k>+fuse comparison
    aggregator: str | None = None  # the expert that fuses; None: no fuse strategy
    k: int = 3
    cache: bool = True  # the pool's response cache (--no-cache: off)


def check(config: PoolConfig, live: LiveJudging) -> None:
    """One line for a judge or an aggregator that cannot write (a replay expert)."""
    for role, name in (("judge", live.judge), ("aggregator", live.aggregator)):
        if name is None:
            continue
        e = config.expert(name)  # unknown: a one-line ConfigError naming it
        if BACKENDS.get(e.backend).capabilities_for(e).replay_only:
            raise ConfigError(f"--{role}{'-expert' if role == 'aggregator' else ''} {name}: a "
                              "replay expert only repeats recorded answers; name one that "
                              "generates")


def _texts(config: PoolConfig, ids: set[str]) -> dict[str, dict[str, str]]:
    """expert -> question id -> recorded answer text."""
    return {e.name: {i: r.text for i, r in _read_replay(config.resolve_path(e.model),
                                                          ids).items()}
            for e in config.experts}


def run_live(ev, config: PoolConfig, live: LiveJudging, log=None) -> dict:
    """Judge what ``ev`` (a run ``JudgedEvaluation``) cannot score offline; the report's
    ``judge`` entry."""
    check(config, live)
    names = ev.names  # the recorded experts (the judge and the aggregator are not among them)
    train, test = ev.data.train, ev.data.test
    rng = np.random.default_rng(ev.seed)
    cells = [(i, j) for i in range(len(train.questions)) for j in range(len(names))
             if train.chars[i, j] > 0]
    chosen = [cells[c] for c in rng.choice(len(cells), min(live.sample, len(cells)),
                                           replace=False)]
    limit = list(range(min(live.limit, len(test.questions)))) if live.aggregator else []
    texts = _texts(ev.config, {train.questions[i].id for i, _ in chosen}
                   | {test.questions[i].id for i in limit})
    executor = build_executor(config, cache=open_cache(config, live.cache))
    try:
        judge_cfg = config.expert(live.judge)
        items = [pairwise.Item(f"{train.questions[i].id}:{names[j]}", train.questions[i].question,
                               train.questions[i].answer or "", texts[names[j]][train.questions[i].id])
                 for i, j in chosen]
        got = pairwise.run(executor, judge_cfg, items)
        trust = pairwise.trust(got, {it.id: float(train.p[i, j])
                                     for it, (i, j) in zip(items, chosen)})
        out = {"expert": live.judge, "sample": len(items), "trust": {
            "agreement": trust.agreement, "agreement_ci95": trust.agreement_ci,
            "decided": trust.decided, "spearman": trust.spearman,
            "orders_agree": trust.consistent, "sentence": trust.sentence}}
        if log:
            log(f"judge {live.judge}: {trust.sentence}")
        if limit:
            out["fuse"] = _fuse(ev, config, live, executor, judge_cfg, texts, limit, log)
        return out
    finally:
        executor.close()


def _fuse(ev, config, live: LiveJudging, executor, judge_cfg, texts, limit, log) -> dict:
    names, test = ev.names, ev.data.test
    qs = [test.questions[i] for i in limit]
    experts, weights = ev.routes["test"]
    routes = [Route(question_id=q.id, experts=[Recruit(name=names[j], weight=float(w))
                                               for j, w in zip(experts[i, :live.k],
                                                               weights[i, :live.k])])
              for q, i in zip(qs, limit)]
    responses = [[ExpertResponse(expert=r.name, text=texts[r.name][q.id]) for r in route.experts]
                 for q, route in zip(qs, routes)]
    agg = LLMAggregator(config, expert=live.aggregator, mode="fuse")
    gens = executor.run(agg.requests(qs, routes, responses)).generations
    fused = [f.answer or "" for f in agg.aggregate(qs, routes, responses, gens)]
    best = ev.best
    mine = [pairwise.Item(q.id, q.question, q.answer or "", t) for q, t in zip(qs, fused)]
    ref = [pairwise.Item(q.id, q.question, q.answer or "", texts[best][q.id]) for q in qs]
    judged = pairwise.run(executor, judge_cfg, mine + ref)
    p = np.array([np.nan if j.p_win is None else j.p_win for j in judged])
    ok = ~np.isnan(p[:len(qs)]) & ~np.isnan(p[len(qs):])
    a, b = p[:len(qs)][ok], p[len(qs):][ok]
    name = f"knn{live.k}+fuse"
    out = {"strategy": name, "aggregator": live.aggregator, "instructions": len(qs),
           "judged": int(ok.sum()),
           name: {"win_rate": round(100 * float(a.mean()), 2) if ok.any() else None,
                  "mean_chars": round(float(np.mean([len(t) for t in fused])), 1)},
           "best-single": {"expert": best,
                           "win_rate": round(100 * float(b.mean()), 2) if ok.any() else None,
                           "mean_chars": round(float(np.mean([len(texts[best][q.id])
                                                              for q in qs])), 1)}}
    if ok.sum() > 1:
        out["comparison"] = compare_scores(a, b, ev.seed).to_json()
    if log:
        log(f"{name} (written by {live.aggregator}) vs best-single ({best}) on {len(qs)} test "
            f"instructions, both judged by {live.judge}: {out[name]['win_rate']} vs "
            f"{out['best-single']['win_rate']} (win rate %; mean chars "
            f"{out[name]['mean_chars']:.0f} vs {out['best-single']['mean_chars']:.0f})")
    return out
