"""The learned category router (CoE step one) on MMLU-Pro: accuracy, confusion, throughput.

    python benchmarks/routing.py [--pool runs/mmlu-pro] [--data ../shared/data/mmlu-pro-outputs]

Trains logistic regression (and the other estimators) over all-MiniLM-L6-v2 embeddings on
the train half, prints held-out accuracy on the test half with the confusion matrix, and
routing throughput in questions per second: cold (embedding computed) and warm (embeddings
cached by text hash), over the whole routing step of ``CategoryRouter.route``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coe.config import load_config  # noqa: E402
from coe.eval.mmlu_pro import ensure_pool  # noqa: E402
from coe.embeddings import Embedder  # noqa: E402
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
    rows = []
    reports = {}
    for est in ESTIMATORS:
        t0 = time.perf_counter()
        clf, rep = train_category_router(train, test, estimator=est)
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
    cold_embedder.model  # load the encoder first: start-up is not per-question cost
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


if __name__ == "__main__":
    main()
