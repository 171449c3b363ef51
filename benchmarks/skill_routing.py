"""Skill recruiting (Symbolic-MoE) on the replayed 8-model MMLU-Pro pool, against the baselines.

    python benchmarks/skill_routing.py [--pool runs/mmlu-pro] [--data ../shared/data/mmlu-pro-outputs]

1. Every expert's recorded answer on both halves, through the real pipeline (replay backend,
   executor, answer extraction).
2. Skills of every question from the shipped vocabulary (embedding match; the LLM-keyword
   path is for live pools: a 135M keyword model over 12k questions is too slow on a CPU).
3. Hyper-parameters (temperature, global weight, skills per question) chosen by 2-fold
   cross-validation *inside the train half*; the test half is touched once, at the end.
4. Profiles from the whole train half; the test half routed by ``SkillRouter`` and answered
   by ``Orchestrator.run`` (replay + vote), next to best single (picked on train), all-8
   vote, the true category's top-3 vote, the *predicted* category's top-3 vote (the learned
   CoE router, trained on the train half), and top-p (dynamic k).
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coe.aggregation import vote  # noqa: E402
from coe.apps.api import Orchestrator  # noqa: E402
from coe.apps.eval.pools import ensure_pool  # noqa: E402
from coe.core.config import load_config  # noqa: E402
from coe.io.questions import load_questions  # noqa: E402
from coe.learned.profiles import Profiles, add_expert_results  # noqa: E402
from coe.routing.skill import SkillRouter  # noqa: E402
from coe.routing.skills import VocabularySkills  # noqa: E402
from coe.text.answers import is_correct  # noqa: E402


class Fixed:
    """A skill inferrer that returns skills computed once (the grid re-routes many times)."""

    source = "vocabulary"

    def __init__(self, by_id):
        self.by_id = by_id

    def infer(self, questions):
        return [self.by_id[q.id] for q in questions]


def answers(cfg, qs):
    with Orchestrator(cfg, router="all", aggregator="vote", cache=False) as orch:
        return {r.id: r.responses for r in orch.run(qs).results}


def vote_accuracy(router, qs, resp, strength):
    right = 0
    for q, route in zip(qs, router.route(qs)):
        chosen = [r for r in resp[q.id] if r.expert in set(route.names)]
        ans, _, _ = vote(chosen, strength, {r.name: r.weight for r in route.experts})
        right += bool(is_correct(ans, q))
    return right / len(qs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", default=str(REPO / "runs" / "mmlu-pro"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mmlu-pro-outputs"))
    args = ap.parse_args()
    pool = ensure_pool(args.data, args.pool)
    cfg = load_config(pool / "experts.yaml")
    train = load_questions(pool / "train.jsonl").questions
    test = load_questions(pool / "test.jsonl").questions
    t0 = time.perf_counter()
    resp = {**answers(cfg, train), **answers(cfg, test)}
    strength = {e.name: e.strength for e in cfg.experts}
    print(f"answers of 8 experts on {len(train) + len(test)} questions: {time.perf_counter() - t0:.1f}s")

    t0 = time.perf_counter()
    skills = {}
    for m in (1, 3, 5):
        inf = VocabularySkills(cfg, max_skills=m)
        skills[m] = dict(zip([q.id for q in train + test], inf.infer(train + test)))
    print(f"vocabulary skills for every question: {time.perf_counter() - t0:.1f}s")

    def profiles(qs, m):
        prof = Profiles(skill_source="vocabulary")
        return add_expert_results(prof, qs, [skills[m][q.id] for q in qs], [resp[q.id] for q in qs])

    # 2-fold cross-validation inside the train half
    ids = sorted(q.id for q in train)
    random.Random(0).shuffle(ids)
    fold_of = {qid: i % 2 for i, qid in enumerate(ids)}
    folds = [[q for q in train if fold_of[q.id] == f] for f in (0, 1)]
    grid = list(itertools.product((0.03, 0.1, 0.3), (0.0, 0.5, 1.0), (1, 3, 5)))
    t0 = time.perf_counter()
    cv = {}
    for temp, gw, m in grid:
        accs = []
        for f in (0, 1):
            prof = profiles(folds[1 - f], m)
            router = SkillRouter(cfg, prof, Fixed(skills[m]), k=3, temperature=temp, global_weight=gw)
            accs.append(vote_accuracy(router, folds[f], resp, strength))
        cv[(temp, gw, m)] = sum(accs) / 2
    best = max(cv, key=cv.get)
    print(f"grid of {len(grid)} settings x 2 folds on the train half: {time.perf_counter() - t0:.1f}s; "
          f"best (temperature, global_weight, skills) = {best}: CV accuracy {cv[best]:.1%}")

    temp, gw, m = best
    prof = profiles(train, m)
    rows = []

    def run(name, router, note=""):
        with Orchestrator(cfg, router=router, aggregator="vote", cache=False) as orch:
            r = orch.run(test)
        rows.append((name, r.accuracy, r.stats.generations / len(test), note))

    best_single = max(strength, key=strength.get)
    run("best single (picked on train)", _single(cfg, best_single), best_single)
    run("all 8, vote", "all")
    run("true category -> its top 3, vote", "category", "the category field is given")
    from coe.learned.classifier import train_category_router
    from coe.routing.category import CategoryRouter

    clf, rep = train_category_router(train, test, estimator="logreg")
    hidden = [q.model_copy(update={"category": None}) for q in test]
    with Orchestrator(cfg, router=CategoryRouter(cfg, 3, classifier=clf), aggregator="vote",
                      cache=False) as orch:
        r = orch.run(hidden)
    rows.append(("predicted category (learned router) -> top 3, vote", r.accuracy,
                 r.stats.generations / len(test), f"category accuracy {rep.accuracy:.1%}"))
    default = SkillRouter(cfg, profiles(train, 3), Fixed(skills[3]), k=3)
    run("skill recruiting k=3, vote (default settings)", default, "temperature 0.1, global 0.5, 3 skills")
    run("skill recruiting k=3, vote (CV-tuned)",
        SkillRouter(cfg, prof, Fixed(skills[m]), k=3, temperature=temp, global_weight=gw),
        f"temperature {temp}, global {gw}, {m} skills")
    for p in (0.5, 0.8):
        run(f"skill recruiting top-p={p}, vote",
            SkillRouter(cfg, prof, Fixed(skills[m]), k=8, top_p=p, temperature=temp, global_weight=gw))
    print(f"\ntest half: n={len(test)}")
    print("| strategy | accuracy | generations/question | note |\n|---|---|---|---|")
    for name, acc, gens, note in rows:
        print(f"| {name} | {acc:.1%} | {gens:.2f} | {note} |")


def _single(cfg, name):
    from coe.routing.base import Recruit, Route, Router

    class Single(Router):
        def route(self, questions):
            return [Route(question_id=q.id, experts=[Recruit(name=name)], reason="best single")
                    for q in questions]

    return Single()


if __name__ == "__main__":
    main()
