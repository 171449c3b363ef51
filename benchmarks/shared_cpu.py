"""Local runs on a shared CPU: the default pool alone, two runs at once, and one run beside an
unrelated busy core, with the old thread policy and the new defaults.

    python benchmarks/shared_cpu.py [--repeat 2] [--timeout 600] [--settings before,after]

Each run is ``coe run examples/questions.jsonl -c POOL --no-cache -q`` in a child process of
its own (a fresh ``COE_CACHE_DIR`` too), the pool being the repo's experts.yaml. Cases:

- ``alone``: one run, nothing else started here;
- ``pair``: two runs started together (both wall times are printed);
- ``busy``: one run beside a Python busy loop (one process, one core), started first.

Settings (``--settings``, comma-separated):

- ``before``: the old policy, simulated: ``OMP_WAIT_POLICY=ACTIVE`` (OpenMP threads spin while
  they wait) and ``n_threads`` = every core this process may use, written into a copy of the
  pool;
- ``unset``: the old default exactly as a user had it: libgomp's policy when
  ``OMP_WAIT_POLICY`` is unset is to spin ``GOMP_SPINCOUNT=300000`` times (about 3 ms) then
  sleep: that spin count is set explicitly, with every core;
- ``passive-all``: ``OMP_WAIT_POLICY=PASSIVE`` with every core (the wait policy alone);
- ``after``: the new defaults: nothing set, the pool as it is (``coe`` sets
  ``OMP_WAIT_POLICY=PASSIVE`` and llama.cpp gets every usable core but one).

A run that does not end within ``--timeout`` seconds is killed and reported as a timeout; a run
that fails shows its exit code. The load average when the benchmark starts is printed first:
other work on the machine makes the figures noisy, so run each case more than once
(``--repeat``). Wall times include the process start, imports and model loads: what a user
waits for.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "examples" / "questions.jsonl"
BUSY = "while True: pass"
CASES = ("alone", "pair", "busy")
SETTINGS = ("before", "unset", "passive-all", "after")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pool_file(tmp: Path, setting: str) -> Path:
    """The repo's experts.yaml, with every llama.cpp expert on every core for the old policy."""
    if setting == "after":
        return REPO / "experts.yaml"
    cfg = yaml.safe_load((REPO / "experts.yaml").read_text())
    for e in cfg["experts"]:
        if e.get("backend") == "llamacpp":
            e["n_threads"] = cores()
    path = tmp / f"pool-{setting}.yaml"  # the pool refers to packages only: no relative paths
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env_for(setting: str, cache_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(COE_CACHE_DIR=str(cache_dir), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if setting == "before":
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    elif setting == "unset":
        env["GOMP_SPINCOUNT"] = "300000"  # OMP_WAIT_POLICY unset: spin this long, then sleep
    elif setting == "passive-all":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def start_run(pool: Path, setting: str, tmp: Path, tag: str) -> tuple[subprocess.Popen, float]:
    cache = tmp / f"cache-{tag}"
    cache.mkdir()
    cmd = [sys.executable, "-c", "from coe.apps.cli import main; main()", "run", str(QUESTIONS),
           "-c", str(pool), "--no-cache", "-q", "-o", str(tmp / f"answers-{tag}.jsonl")]
    proc = subprocess.Popen(cmd, env=env_for(setting, cache), cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=open(tmp / f"err-{tag}.txt", "w"))
    return proc, time.perf_counter()


def finish(proc: subprocess.Popen, t0: float, deadline: float, tmp: Path, tag: str) -> str:
    try:
        rc = proc.wait(timeout=max(0.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "timeout"
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = (tmp / f"err-{tag}.txt").read_text().strip().splitlines()[-1:]
        print(f"  [{tag}] exit {rc}: {tail[0] if tail else ''}", file=sys.stderr)
        return f"{wall:.1f}s (exit {rc})"
    return f"{wall:.1f}s"


def run_case(case: str, setting: str, pool: Path, tmp: Path, timeout: float, n: int) -> list[str]:
    busy = None
    if case == "busy":
        busy = subprocess.Popen([sys.executable, "-c", BUSY], stdin=subprocess.DEVNULL)
    runs: list[tuple[subprocess.Popen, float]] = []
    try:
        for i in range(2 if case == "pair" else 1):
            runs.append(start_run(pool, setting, tmp, f"{setting}-{case}-{n}-{i}"))
        deadline = min(t0 for _, t0 in runs) + timeout
        with ThreadPoolExecutor(len(runs)) as pool_:  # each run's own end, not the other's
            return list(pool_.map(lambda i: finish(*runs[i], deadline, tmp,
                                                   f"{setting}-{case}-{n}-{i}"), range(len(runs))))
    finally:  # interrupted too: nothing of ours left running
        for p in [p for p, _ in runs] + ([busy] if busy is not None else []):
            if p.poll() is None:
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs of each case (default 1)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per case (default 600)")
    ap.add_argument("--settings", default="before,after",
                    help=f"comma-separated, of {', '.join(SETTINGS)} (default before,after)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, of alone, pair, busy")
    args = ap.parse_args()
    settings = [s for s in args.settings.split(",") if s]
    cases = [c for c in args.cases.split(",") if c]
    bad = [s for s in settings if s not in SETTINGS] + [c for c in cases if c not in CASES]
    if bad:
        sys.exit(f"shared_cpu.py: unknown setting or case: {', '.join(bad)}")

    sys.path.insert(0, str(REPO))
    from coe.backends.llamacpp import default_threads

    os.environ.pop("OMP_NUM_THREADS", None)  # as in the children
    load = os.getloadavg()
    print(f"cores usable: {cores()}; new default n_threads: {default_threads()}; "
          f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"pool: experts.yaml; questions: {QUESTIONS.relative_to(REPO)}; cache off; "
          f"timeout {args.timeout:.0f}s per case\n")

    rows = []
    with tempfile.TemporaryDirectory(prefix="coe-shared-cpu-") as d:
        tmp = Path(d)
        pools = {s: pool_file(tmp, s) for s in settings}
        for n in range(args.repeat):
            for case in cases:
                for s in settings:
                    walls = run_case(case, s, pools[s], tmp, args.timeout, n)
                    rows.append((s, case, n + 1, walls))
                    print(f"  {s:<12} {case:<6} #{n + 1}: {', '.join(walls)}",
                          file=sys.stderr, flush=True)

    print(f"{'setting':<12} {'case':<6} {'#':>2}  wall time per run")
    for s in settings:
        for case in cases:
            for s2, c2, n, walls in rows:
                if (s2, c2) == (s, case):
                    print(f"{s:<12} {case:<6} {n:>2}  {', '.join(walls)}")
    load = os.getloadavg()
    print(f"\nload average at the end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
