"""Orchestration overhead: a run's wall time against the summed backend generation time.

    python benchmarks/overhead.py [--questions 20] [--max-tokens N] [--zero-shot]

Runs the default pool (experts.yaml: 3 experts, two of them personas of one GGUF) over N
questions with the response cache off, and prints a table: wall time of
``Orchestrator.run``, the summed per-generation time the backends reported, model load
time, and the ratio (target <= 1.05). Routing uses the questions' own categories here, so
the embedding model's start-up (seconds) is not part of the figure; ``--zero-shot`` includes it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coe.apps.api import Orchestrator  # noqa: E402
from coe.io.questions import Question  # noqa: E402

CATS = ["math", "science", "general"]


def questions(n: int, zero_shot: bool) -> list[Question]:
    out = []
    for i in range(n):
        cat = CATS[i % 3]
        if cat == "math":
            q = Question(id=f"m{i}", question=f"What is {i + 3} times {i + 4}?", answer=str((i + 3) * (i + 4)))
        elif cat == "science":
            q = Question(id=f"s{i}", question=f"Which particle carries a negative charge? ({i})",
                         choices=["proton", "neutron", "electron", "photon"], answer="C")
        else:
            q = Question(id=f"g{i}", question=f"Which city is the capital of Italy? ({i})",
                         choices=["Milan", "Rome", "Naples", "Turin"], answer="B")
        out.append(q if zero_shot else q.model_copy(update={"category": cat}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="cap every expert's max_tokens (default: the pool's own sampling)")
    ap.add_argument("--zero-shot", action="store_true", help="route by embedding, not by field")
    args = ap.parse_args()
    pool = yaml.safe_load((REPO / "experts.yaml").read_text())
    if args.max_tokens:
        for e in pool["experts"]:
            e["sampling"]["max_tokens"] = min(e["sampling"]["max_tokens"], args.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "experts.yaml"
        cfg.write_text(yaml.safe_dump(pool))
        with Orchestrator.from_yaml(cfg, cache=False) as orch:
            qs = questions(args.questions, args.zero_shot)
            t0 = time.perf_counter()
            run = orch.run(qs)
            wall = time.perf_counter() - t0
    s = run.stats
    rows = [
        ("questions", f"{len(qs)}"),
        ("generations", f"{s.generations}"),
        ("model loads (naive per-question order)", f"{s.loads} ({s.naive_loads})"),
        ("wall time of run (s)", f"{wall:.2f}"),
        ("summed backend generation time (s)", f"{s.generation_seconds:.2f}"),
        ("model load time (s)", f"{s.load_seconds:.2f}"),
        ("overhead ratio wall / generation", f"{wall / s.generation_seconds:.3f}"),
        ("ratio without load time", f"{(wall - s.load_seconds) / s.generation_seconds:.3f}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k:<{width}} | {v} |")


if __name__ == "__main__":
    main()
