"""The Ray executor against the local one: the default pool's two llama.cpp models (one thread
each), every question to every expert, the same questions through both.

    python benchmarks/ray_executor.py [--questions 16] [--max-tokens N] [--repeat 1]

The pool is the repo's experts.yaml with ``n_threads: 1`` on every llama.cpp expert, router
``all`` and aggregator ``vote``: its two GGUFs (SmolLM2-135M, shared by two personas, and
Gemma-3-270M) make two plan groups, i.e. two Ray actors of ``num_cpus=1`` each, which can run
at the same time on two cores where the local executor runs them one after the other. The
questions are examples/questions.jsonl, cycled with varied numbers and wording up to
``--questions``. The response cache is off on both sides. Local runs first, then Ray on a new
local Ray instance of 2 CPUs started here (its start-up is timed apart from the run); with
``--repeat R`` each executor runs R times and the best wall time counts.

Printed: the Ray run's per-group timeline (actor pid; queued: from the driver's submission to
its model's load starting, i.e. waiting for room and starting the actor's process; start, load
seconds and end, relative to the first start) and whether the groups overlapped, then a table per executor (wall time,
model loads and their seconds, generations and their summed seconds as the backends report
them, answers identical to the local run) and the speed-up local / Ray.
Exits 1 if any final answer or expert response text differs between the two, or if a
generation failed.

``n_threads: 1`` bounds both llama.cpp's decoding and its prompt evaluation
(``n_threads_batch``), so each actor uses the one CPU it reserved and the local executor one
core per model too: the comparison is one core per model on both sides.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from coe.apps.api import Orchestrator, RunResult  # noqa: E402
from coe.core.config import load_config  # noqa: E402
from coe.io.questions import Question, load_questions  # noqa: E402

PHRASINGS = ["", "Quick question: ", "Please answer: ", "Tell me: "]


def vary(q: Question, r: int) -> Question:
    """Round ``r`` (1, 2, ...) of example ``q``: a new id and slightly different text.
    Arithmetic (a bare number answer, 'plus'/'+' or a product) gets new numbers and answer;
    anything else a different lead-in."""
    update: dict = {"id": f"{q.id}-v{r}"}
    nums = [int(n) for n in re.findall(r"\d+", q.question)]
    if not q.choices and len(nums) == 2 and q.answer is not None and str(q.answer).isdigit():
        new = [nums[0] + r, nums[1] + (r % 3) + 1]
        it = iter(new)
        update["question"] = re.sub(r"\d+", lambda _: str(next(it)), q.question)
        total = new[0] + new[1] if "+" in q.question else new[0] * new[1]
        update["answer"] = str(total)
    else:
        lead = PHRASINGS[r % len(PHRASINGS)] or f"({r}) "
        update["question"] = lead + q.question
    return q.model_copy(update=update)


def make_questions(n: int) -> list[Question]:
    base = load_questions(REPO / "examples" / "questions.jsonl").questions
    return [base[i] if i < len(base) else vary(base[i % len(base)], i // len(base))
            for i in range(n)]


def make_pool(tmp: Path, max_tokens: int | None) -> Path:
    pool = yaml.safe_load((REPO / "experts.yaml").read_text())
    for e in pool["experts"]:
        if e.get("backend") == "llamacpp":
            e["n_threads"] = 1
        if max_tokens:
            s = e.setdefault("sampling", {})
            s["max_tokens"] = min(s.get("max_tokens", max_tokens), max_tokens)
    pool["router"] = {"kind": "all"}
    pool["aggregator"] = {"kind": "vote"}
    pool.pop("executor", None)  # the executor is chosen per run below
    path = tmp / "experts.yaml"
    path.write_text(yaml.safe_dump(pool, sort_keys=False))
    return path


def answers(res: RunResult) -> list[tuple]:
    return [(r.id, r.final_answer, tuple(x.text for x in r.responses)) for r in res.results]


def run_once(cfg, questions: list[Question], executor: str):
    with Orchestrator(cfg, cache=False, executor=executor) as o:
        t0 = time.perf_counter()
        res = o.run(questions)
        wall = time.perf_counter() - t0
        timeline = list(getattr(o.executor, "timeline", []))
    return res, wall, timeline


def best_of(cfg, questions: list[Question], executor: str, repeat: int):
    """The fastest of ``repeat`` runs, and whether every run gave the same answers."""
    runs = []
    for k in range(repeat):
        res, wall, timeline = run_once(cfg, questions, executor)
        print(f"  {executor} run {k + 1}/{repeat}: {wall:.2f} s", flush=True)
        runs.append((res, wall, timeline))
    best = min(runs, key=lambda x: x[1])
    consistent = all(answers(r[0]) == answers(runs[0][0]) for r in runs)
    return best, consistent


def table(rows: list[tuple]) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for k, r in enumerate(rows):
        print("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |")
        if k == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def print_timeline(timeline) -> bool:
    """The Ray run's groups; returns whether any two of them ran at the same time."""
    starts = [s.started for s in timeline if s.started is not None]
    t0 = min(starts) if starts else 0.0

    def rel(t):
        return "-" if t is None else f"{t - t0:.2f}"

    rows = [("group", "experts", "pid", "jobs", "gens", "queued s", "start s", "load s", "end s",
             "error")]
    for s in timeline:
        load = "-" if s.loaded is None or s.started is None else f"{s.loaded - s.started:.2f}"
        pids = ",".join(str(n["pid"]) for n in s.nodes) or "-"
        queued = "-" if s.started is None else f"{s.started - s.submitted:.2f}"
        rows.append((s.label, ",".join(s.experts), pids, str(s.jobs), str(s.generations),
                     queued, rel(s.started), load, rel(s.finished), s.error or ""))
    table(rows)
    spans = [(s.started, s.finished) for s in timeline
             if s.started is not None and s.finished is not None]
    overlap = any(a[0] < b[1] and b[0] < a[1]
                  for i, a in enumerate(spans) for b in spans[i + 1:])
    both = ""
    if len(spans) >= 2:
        shared = min(e for _, e in spans) - max(s for s, _ in spans)
        both = f" ({max(shared, 0):.2f} s with all {len(spans)} groups running)"
    print(f"groups overlapped in time: {'yes' if overlap else 'no'}{both}")
    return overlap


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--questions", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="cap every expert's max_tokens (default: the pool's own sampling)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per executor; the best counts")
    args = ap.parse_args()
    if args.questions < 1 or args.repeat < 1:
        ap.error("--questions and --repeat must be at least 1")
    questions = make_questions(args.questions)
    load0 = os.getloadavg()[0]  # this benchmark wants the cores to itself

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(make_pool(Path(tmp), args.max_tokens))
        groups = {e.load_key() for e in cfg.experts}
        print(f"{len(questions)} questions x {len(cfg.experts)} experts "
              f"({len(groups)} distinct models), cache off; load average {load0:.2f} "
              f"on {os.cpu_count()} cores", flush=True)

        (local, local_wall, _), local_same = best_of(cfg, questions, "local", args.repeat)

        import ray

        t0 = time.perf_counter()
        # A new local instance of our own (address="local": never a cluster another process
        # started), shut down below. The actors import coe from this checkout.
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
        ray_start = time.perf_counter() - t0
        try:
            (remote, ray_wall, timeline), ray_same = best_of(cfg, questions, "ray",
                                                                args.repeat)
        finally:
            ray.shutdown()

    print("\nRay groups (fastest run; start and end: seconds from the first actor's start):")
    print_timeline(timeline)

    # the same generations' summed seconds per model on each side: what concurrency (two
    # models sharing the cores, memory bandwidth and whatever else runs) cost each of them
    print("\nsummed generation seconds per model (local: one after the other; ray: at once):")
    for span in timeline:
        per = [sum(x.seconds for r in res.results for x in r.responses if x.expert in span.experts)
               for res in (local, remote)]
        print(f"  {span.label}: local {per[0]:.2f} s, ray {per[1]:.2f} s")

    a, b = answers(local), answers(remote)
    identical = a == b and local_same and ray_same
    diffs = [x[0] for x, y in zip(a, b) if x != y]
    failed = local.stats.failed_generations + remote.stats.failed_generations
    rows = [("executor", "wall s", "ray start s", "model loads", "load s", "generations",
             "generation s", "failed", "answers identical")]
    for name, res, wall, start in (("local", local, local_wall, None),
                                   ("ray", remote, ray_wall, ray_start)):
        s = res.stats
        rows.append((name, f"{wall:.2f}", "-" if start is None else f"{start:.2f}",
                     str(s.loads), f"{s.load_seconds:.2f}", str(s.generations),
                     f"{s.generation_seconds:.2f}", str(s.failed_generations),
                     "reference" if name == "local" else ("yes" if identical else "NO")))
    print()
    table(rows)
    print(f"\nspeed-up local / ray: {local_wall / ray_wall:.2f}x "
          f"(with Ray's start-up: {local_wall / (ray_wall + ray_start):.2f}x)")
    print(f"load average at the start {load0:.2f}, at the end {os.getloadavg()[0]:.2f}"
          + (" (something else was using the cores: the timings are not reliable)"
             if load0 >= 1 else ""))
    correct = sum(bool(r.correct) for r in local.results)
    print(f"answers identical: {'yes' if identical else 'NO'}; "
          f"correct (local): {correct}/{len(local.results)}")
    if diffs:
        print(f"differing questions: {', '.join(diffs)}")
    if not (local_same and ray_same):
        print("an executor's repeated runs disagreed with each other")
    if failed:
        print(f"{failed} generations failed: {local.stats.failures or remote.stats.failures}")
    if not identical or failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
