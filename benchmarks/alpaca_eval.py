"""Open-ended answers: every selection strategy on the shared AlpacaEval 2.0 pool, in one command.

    python benchmarks/alpaca_eval.py [--data ../shared/data/alpaca-eval] [--out runs/alpaca]
                                     [--seed 0] [--no-ablation]

It runs what a user runs (``coe pool DATA -o OUT/pool``, then ``coe eval OUT/pool/test.jsonl
-c OUT/pool/experts.yaml -o OUT/eval``) and prints:

1. the strategies on the **test** half: win rate (WR) and length-controlled win rate (LC WR),
   95% bootstrap intervals, answers per instruction, mean characters, the LC difference to
   best-single and its Holm-corrected p (``OUT/eval/report.md`` has the same, and the training
   half's);
2. this project's LC estimate for each of the 8 models on all 805 instructions (difficulty fitted
   on the training half, ``coe.learned.winrate``) next to the leaderboard's LC (the data README);
3. the selector's feature ablation, on the **training half only** (5-fold cross-fitted picks of
   the learned selector over all experts, trained on p_win, with each feature left out): what
   justifies the features. The test half plays no part in it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: the data README's leaderboard columns (AlpacaEval 2.0, weighted GPT-4 Turbo judge)
LEADERBOARD = {  # model: (WR, LC WR)
    "FuseChat-Gemma-2-9B-Instruct": (70.50, 70.18), "FuseChat-Qwen-2.5-7B-Instruct": (64.64, 63.58),
    "FuseChat-Llama-3.1-8B-Instruct": (63.33, 65.39), "FuseChat-Llama-3.2-3B-Instruct": (51.30, 54.00),
    "OpenHermes-2.5-Mistral-7B": (10.34, 16.25), "gemma-7b-it": (6.94, 10.43),
    "vicuna-7b-v1.5": (4.80, 7.62), "gemma-2b-it": (3.40, 5.44),
}


def shared_data() -> Path:
    """``shared/data/alpaca-eval`` beside the repo or beside a folder above it (a worktree)."""
    for up in ROOT.parents:
        if (up / "shared" / "data" / "alpaca-eval").is_dir():
            return up / "shared" / "data" / "alpaca-eval"
    return ROOT.parent / "shared" / "data" / "alpaca-eval"


def coe(*args: str) -> None:
    cmd = [sys.executable, "-m", "coe", *args]
    print("$ coe " + " ".join(args), file=sys.stderr)
    subprocess.run(cmd, check=True, cwd=ROOT)


def leaderboard_table(ev) -> str:
    """LC per model on all instructions (both halves), difficulty from the training half."""
    from coe.learned.winrate import length_controlled

    d = ev.data
    p = np.vstack([d.train.p, d.test.p])
    delta = np.vstack([d.train.delta, d.test.delta])
    gamma = np.concatenate([d.train.gamma, d.test.gamma])
    rows = ["| model | WR (ours) | WR (leaderboard) | LC WR (ours) | LC WR (leaderboard) |",
            "|---|---:|---:|---:|---:|"]
    for j, name in enumerate(ev.names):
        fit = length_controlled(p[:, j], delta[:, j], gamma)
        wr, lc = LEADERBOARD.get(name, (float("nan"), float("nan")))
        rows.append(f"| {name} | {fit.win_rate:.2f} | {wr:.2f} | {fit.lc_win_rate:.2f} | {lc:.2f} |")
    return "\n".join(rows)


def ablation_table(ev) -> str:
    """The all-experts selector's cross-fitted training-half WR and LC WR, each feature left
    out in turn (and the expert indicators alone)."""
    from coe.learned import free_selector

    d, tr = ev.data, ev.data.train
    router_local = ev.router_local["validation"]
    every = np.tile(np.arange(len(ev.names)), (len(tr.questions), 1))
    full = free_selector.FEATURES
    variants = [("all features", full)] + [(f"without {f}", tuple(x for x in full if x != f))
                                           for f in full] + [("expert indicators only", ())]
    rows = ["| selector features (all experts, trained on p_win) | train WR (5-fold) | "
            "train LC WR (5-fold) |", "|---|---:|---:|"]
    for label, use in variants:
        picks = free_selector.cross_fitted(tr.vectors, tr.chars, router_local, every, tr.p,
                                           use=use, seed=ev.seed)
        fit = d.lc(tr, picks)
        rows.append(f"| {label} | {fit.win_rate:.1f} | {fit.lc_win_rate:.1f} |")
    best = ev.strategy("best-single").scores["validation"].fit
    rows.append(f"| (best-single, for reference) | {best.win_rate:.1f} | {best.lc_win_rate:.1f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(shared_data()), help="the shared data's alpaca-eval "
                    "folder (default: the nearest ../shared/data/alpaca-eval above the repo)")
    ap.add_argument("--out", default="runs/alpaca")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-ablation", action="store_true")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    pool, report = out / "pool", out / "eval"
    coe("pool", args.data, "-o", str(pool), "--seed", str(args.seed), "-q")
    coe("eval", str(pool / "test.jsonl"), "-c", str(pool / "experts.yaml"), "-o", str(report),
        "--seed", str(args.seed), "-q")

    from coe.apps.eval.judged import JudgedEvaluation
    from coe.apps.eval.judged_report import table
    from coe.core.config import load_config
    from coe.io.questions import load_questions

    cfg = load_config(pool / "experts.yaml")
    ev = JudgedEvaluation(cfg, load_questions(cfg.base_dir / "train.jsonl").questions,
                          load_questions(cfg.base_dir / "test.jsonl").questions, seed=args.seed).run()
    rec = json.loads((report / "report.json").read_text())["recommendation"]
    print("## Strategies, test half\n")
    print(table(ev, "test"))
    print(f"\nrecommendation (chosen on the training half): {rec['strategy']}: {rec['reason']}\n")
    print("## LC estimate vs the leaderboard (all 805 instructions)\n")
    print(leaderboard_table(ev))
    if not args.no_ablation:
        print("\n## Selector features, 5-fold cross-fitted on the training half\n")
        print(ablation_table(ev))


if __name__ == "__main__":
    main()
