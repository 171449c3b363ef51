"""The replayed 8-model MMLU-Pro pool through ``coe eval``: the strategy table, checked
against the figures the data README computed directly from the recorded files.

    python benchmarks/eval_mmlu_pro.py [--data ../shared/data/mmlu-pro-outputs]
                                       [--pool runs/mmlu-pro] [--out runs/eval-mmlu-pro]

Builds the pool (train/test halves, replay files, experts.yaml) if it is not there, evaluates
every strategy on the test half with best-single picked on the train half, writes the report
and plots to --out, and prints the table, the README comparison and how the random baseline
moves with its seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coe.apps.eval.job import run_eval_job  # noqa: E402
from coe.apps.eval.pools import ensure_pool  # noqa: E402
from coe.apps.eval.report import strategy_table, summary_lines  # noqa: E402

# Figures in ../shared/data/mmlu-pro-outputs/README.md (computed there from the recorded
# `pred` fields, not by coe): what this benchmark compares coe's figures against.
README = {
    "best-single": (43.4, "best single model"),
    "all+vote": (46.8, "all-8 vote, ties to the strongest on the train half"),
    "category@1": (45.5, "true category -> that category's best model"),
    "category+vote": (47.4, "vote of each category's top 3 models"),
    "random3+vote": (39.8, "random 3 models voting"),
    "oracle": (75.9, "oracle: any of the 8 right"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mmlu-pro-outputs"))
    ap.add_argument("--pool", default=str(REPO / "runs" / "mmlu-pro"))
    ap.add_argument("--out", default=str(REPO / "runs" / "eval-mmlu-pro"))
    ap.add_argument("--random-seeds", type=int, default=5,
                    help="also run the random baseline with this many seeds")
    args = ap.parse_args()
    pool = ensure_pool(args.data, args.pool)
    t0 = time.perf_counter()
    result, files, _ = run_eval_job(pool / "test.jsonl", pool / "experts.yaml",
                                    validation=pool / "train.jsonl", out_dir=args.out)
    print(strategy_table(result))
    print()
    for line in summary_lines(result):
        print(line)
    print(f"eval + report: {time.perf_counter() - t0:.1f}s; report and plots in {args.out}")
    print("\n| strategy | coe % | 95% CI | data README % | README in CI | README's definition |")
    print("|---|---|---|---|---|---|")
    for name, (ref, what) in README.items():
        s = result.score(name)
        lo, hi = (100 * x for x in s.overall.ci)
        inside = "yes" if lo <= ref <= hi else "NO"
        print(f"| {name} | {100 * s.overall.value:.1f} | [{lo:.1f}, {hi:.1f}] | {ref} | {inside} "
              f"| {what} |")
    if args.random_seeds:
        accs = []
        for seed in range(args.random_seeds):
            r, _, _ = run_eval_job(pool / "test.jsonl", pool / "experts.yaml", out_dir=None,
                                   strategies="random*", seed=seed)
            accs.append(100 * r.scores[0].overall.value)
        print(f"\nrandom3+vote over seeds 0..{args.random_seeds - 1}: "
              + ", ".join(f"{a:.1f}" for a in accs)
              + f" (mean {sum(accs) / len(accs):.1f})")


if __name__ == "__main__":
    main()
