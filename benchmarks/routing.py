"""The learned category router (CoE two-step) on MMLU-Pro: accuracy, confusion, throughput,
and what the predicted category is worth as a route over the replayed 8-model pool.

    python benchmarks/routing.py [--pool runs/mmlu-pro] [--data ../shared/data/mmlu-pro-outputs]

Builds the replay pool first when ``--pool`` has none. Trains logistic regression (and the
other estimators) over all-MiniLM-L6-v2 embeddings on the train half, prints held-out accuracy
on the test half with the confusion matrix; routing throughput in questions per second: cold
(embeddings computed) and warm (embeddings cached by text hash), over the whole routing step
of ``CategoryRouter.route``; and the accuracy on the test half of predicted category -> that
category's top 3 experts -> vote, through the yaml path a user takes (``router.model_file`` +
``use_given_category: false``) and ``Orchestrator.run`` over the replay experts, next to the
true category's top 3.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coe.config import load_config  # noqa: E402
from coe.embeddings import Embedder, shared_embedder  # noqa: E402
from coe.eval.mmlu_pro import ensure_pool  # noqa: E402
from coe.orchestrator import Orchestrator  # noqa: E402
from coe.questions import load_questions  # noqa: E402
from coe.routers.category import CategoryRouter  # noqa: E402
from coe.routers.learned import ESTIMATORS, LearnedCategoryClassifier, train_category_router  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", default=str(REPO / "runs" / "mmlu-pro"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mmlu-pro-outputs"))
    ap.add_argument("--throughput-questions", type=int, default=1000)
    args = ap.parse_args()
    pool = ensure_pool(args.data, args.pool)
    cfg = load_config(pool / "experts.yaml")
    train = load_questions(pool / "train.jsonl").questions
    test = load_questions(pool / "test.jsonl").questions
    t0 = time.perf_counter()
    shared_embedder(cfg.embeddings.model, cfg.embeddings.batch_size, str(cfg.base_dir)).encode(
        [q.question for q in train + test])
    print(f"embeddings of {len(train) + len(test)} questions: {time.perf_counter() - t0:.1f}s "
          f"(computed once, then read from the on-disk cache)\n")
    rows = []
    reports = {}
    for est in ESTIMATORS:
        t0 = time.perf_counter()
        clf, rep = train_category_router(train, test, estimator=est,
                                         embedding_model=cfg.embeddings.model,
                                         base_dir=str(cfg.base_dir))
        reports[est] = (clf, rep)
        rows.append((est, rep.accuracy, time.perf_counter() - t0))
    print(f"category prediction on the MMLU-Pro test half (n={len(test)}), trained on the train half")
    print("| estimator | accuracy | train+predict s (embeddings cached) |\n|---|---|---|")
    for est, acc, sec in rows:
        print(f"| {est} | {acc:.1%} | {sec:.1f} |")
    clf, rep = reports["logreg"]
    print("\nlogreg " + rep.table())

    # throughput of the whole routing step, on questions with no category field
    sample = [q.model_copy(update={"category": None}) for q in test[: args.throughput_questions]]
    cold_embedder = Embedder(clf.embedding_model, disk_cache=False)
    t0 = time.perf_counter()
    cold_embedder.model  # load the encoder first: start-up is not per-question cost
    load_s = time.perf_counter() - t0
    cold = LearnedCategoryClassifier(clf.estimator, clf.embedding_model, embedder=cold_embedder)
    router = CategoryRouter(cfg, 3, classifier=cold)
    t0 = time.perf_counter()
    router.route(sample)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    router.route(sample)
    warm_s = time.perf_counter() - t0
    print(f"\n| routing {len(sample)} questions | seconds | questions/s |\n|---|---|---|")
    print(f"| cold (MiniLM embeddings computed, batch 64, CPU) | {cold_s:.2f} | {len(sample) / cold_s:,.0f} |")
    print(f"| warm (embeddings cached by text hash) | {warm_s:.3f} | {len(sample) / warm_s:,.0f} |")
    print(f"(loading the encoder once per process: {load_s:.1f}s, not included)")

    # predicted category -> its top 3 -> vote, over the replay experts, on the test half
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clf.save(Path(tmp) / "router.joblib")
        predicted = cfg.model_copy(deep=True)
        predicted.router.model_file = str(Path(tmp) / "router.joblib")
        predicted.router.use_given_category = False  # the test questions carry their category
        for name, c in (("predicted category (learned router) -> top 3, vote", predicted),
                        ("true category -> top 3, vote", cfg)):
            with Orchestrator(c, router="category", aggregator="vote", k=3, cache=False) as orch:
                r = orch.run(test)
            rows.append((name, r.accuracy, r.stats.generations / len(test)))
    print(f"\nreplayed 8-model pool, test half (n={len(test)})")
    print("| route | accuracy | generations/question |\n|---|---|---|")
    for name, acc, gens in rows:
        print(f"| {name} | {acc:.1%} | {gens:.2f} |")


if __name__ == "__main__":
    main()
