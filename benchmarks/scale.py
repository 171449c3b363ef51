"""``coe eval`` at scale: replay pools of 12k, 50k and 100k questions, wall time and peak RSS.

    python benchmarks/scale.py [--pool runs/mmlu-pro] [--data ../shared/data/mmlu-pro-outputs]
                               [--sizes 12000,50000,100000] [--all-strategies] [--keep DIR]

The replayed 8-model MMLU-Pro pool (``--pool``, built from ``--data`` by the same builder as
``scripts/mmlu_pro_pool.py`` if it is not there) holds 12,032 recorded questions. For each
size N the benchmark writes, in a temporary folder (``--keep``: in DIR, kept), a pool of N
questions: a fixed validation file of 2,000 questions (the first 2,000 of the train half,
original ids) and a test file of N - 2,000 questions, the other 10,032 questions and then
copies of them with new ids (``<id>~1``, ``<id>~2``, ...); every expert's replay file holds a
record for each of the N questions (a copy's record is its original's, under the copy's id).
Then it runs the real CLI in a fresh process,

    coe eval test.jsonl -c experts.yaml --validation val.jsonl -o report -q -s STRATEGIES

and measures its wall time and its peak resident memory (``ru_maxrss`` of that child, from
``os.wait4``). One markdown table: questions, generations, wall seconds, seconds per 1,000
questions (flat if time is linear), peak RSS in MiB. Targets: linear time, under 1 GiB at
100,000 questions.

By default only the strategies that need no embedding model run (every single expert,
best-single, all+vote, category+vote and category@1 with the questions' own categories,
random3+vote, oracle): the embedding side is measured by ``benchmarks/routing.py``.
``--all-strategies`` runs every strategy the pool can (a skill router needs profiles, and an
llm aggregator a non-replay expert: this pool has neither, so they are skipped with a note).

The machine is shared: wall times are noisy, memory is not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coe.apps.eval.pools import ensure_pool  # noqa: E402

NO_EMBEDDING = "single:*,best-single,all+vote,category+vote,category@1,random3+vote,oracle"
VALIDATION = 2000
MIB = 1024 * 1024


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _copy_id(qid: str, copy: int) -> str:
    return qid if copy == 0 else f"{qid}~{copy}"


def build_scaled(pool: Path, out: Path, n: int) -> tuple[Path, Path, Path]:
    """(experts.yaml, test file, validation file) of an ``n``-question pool in ``out``."""
    train = _read_jsonl(pool / "train.jsonl")
    test = _read_jsonl(pool / "test.jsonl")
    val, rest = train[:VALIDATION], train[VALIDATION:] + test
    if n <= VALIDATION:
        raise SystemExit(f"--sizes: each size must exceed the {VALIDATION} validation questions")
    # the test questions: the originals not in validation, then copies under new ids
    picks = [(q, i // len(rest)) for i, q in enumerate(rest * (1 + (n - VALIDATION) // len(rest)))]
    picks = picks[:n - VALIDATION]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "test.jsonl", "w", encoding="utf-8") as f:
        for q, c in picks:
            f.write(json.dumps({**q, "id": _copy_id(q["id"], c)}) + "\n")
    with open(out / "val.jsonl", "w", encoding="utf-8") as f:
        for q in val:
            f.write(json.dumps(q) + "\n")
    (out / "replay").mkdir(exist_ok=True)
    for src in sorted((pool / "replay").glob("*.jsonl")):
        records = {r["id"]: r for r in _read_jsonl(src)}
        with open(out / "replay" / src.name, "w", encoding="utf-8") as f:
            for q in val:
                f.write(json.dumps(records[q["id"]]) + "\n")
            for q, c in picks:
                f.write(json.dumps({**records[q["id"]], "id": _copy_id(q["id"], c)}) + "\n")
    (out / "experts.yaml").write_text((pool / "experts.yaml").read_text(encoding="utf-8"),
                                      encoding="utf-8")
    return out / "experts.yaml", out / "test.jsonl", out / "val.jsonl"


def run_eval(cfg: Path, test: Path, val: Path, report: Path,
             strategies: str | None) -> tuple[float, int, dict]:
    """Wall seconds and peak RSS (bytes) of one ``coe eval`` process, and its report.json."""
    cmd = [sys.executable, "-m", "coe.apps.cli", "eval", str(test), "-c", str(cfg),
           "--validation", str(val), "-o", str(report), "-q"]
    if strategies:
        cmd += ["-s", strategies]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "COE_CACHE_DIR": str(report.parent / "cache")}  # not the user's cache
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    p.stderr.close()
    if p.returncode != 0:
        raise SystemExit(f"coe eval exited {p.returncode}:\n{err.decode(errors='replace')}")
    return wall, usage.ru_maxrss * 1024, json.loads((report / "report.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "mmlu-pro-outputs"))
    ap.add_argument("--pool", default=str(REPO / "runs" / "mmlu-pro"))
    ap.add_argument("--sizes", default="12000,50000,100000")
    ap.add_argument("--all-strategies", action="store_true",
                    help="every strategy, not only those that need no embedding model")
    ap.add_argument("--keep", default=None, help="build the pools here and keep them")
    args = ap.parse_args()
    pool = ensure_pool(args.data, args.pool)
    sizes = [int(s) for s in args.sizes.split(",")]
    strategies = None if args.all_strategies else NO_EMBEDDING
    rows = []
    with tempfile.TemporaryDirectory(prefix="coe-scale-") as tmp:
        root = Path(args.keep or tmp)
        for n in sizes:
            where = root / f"pool-{n}"
            t0 = time.perf_counter()
            cfg, test, val = build_scaled(pool, where, n)
            built = time.perf_counter() - t0
            wall, rss, report = run_eval(cfg, test, val, where / "report", strategies)
            acc = {s["name"]: s["accuracy"] for s in report["strategies"]}
            rows.append((n, report["generations"], wall, rss, acc.get("all+vote")))
            print(f"{n} questions: pool written in {built:.1f}s, coe eval {wall:.1f}s, "
                  f"peak RSS {rss / MIB:.0f} MiB", file=sys.stderr, flush=True)
            if not args.keep:
                shutil.rmtree(where)
    print(f"strategies: {strategies or 'all'}; validation: {VALIDATION} questions\n")
    print("| questions | generations | wall s | s per 1k questions | peak RSS MiB | all+vote % |")
    print("|---|---|---|---|---|---|")
    for n, gens, wall, rss, acc in rows:
        print(f"| {n:,} | {gens:,} | {wall:.1f} | {1000 * wall / n:.2f} | {rss / MIB:.0f} | "
              f"{'-' if acc is None else f'{100 * acc:.1f}'} |")


if __name__ == "__main__":
    main()
