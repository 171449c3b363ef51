"""Load on ``coe serve``: concurrent clients against a real server subprocess, compared with
``coe run`` (the orchestrator in one batch) on the same questions.

    python benchmarks/serve_load.py [--pool local|replay|both] [--executor local|ray|both]
                                    [--clients 32] [--per-client 2] [--replay-per-client 20]
                                    [--no-sigterm]

- ``local``: the default pool (experts.yaml, three llama.cpp experts on two GGUFs), templated
  questions, the response cache off on both sides so every generation is made.
- ``replay``: the 8-model MMLU-Pro replay pool (``/work/runs/mmlu-pro``, built from
  ``../shared/data`` by ``scripts/mmlu_pro_pool.py`` if missing): pure service overhead.

Each client sends its questions one after another with the real ``openai`` client (model
``coe``). Printed per pool: requests, throughput, p50/p95/p99 latency, mean batch size, model
loads per batch against the distinct weights per batch (from ``/metrics``), requests lost or
failed (must be 0), and the ratio of the load's wall time to ``Orchestrator.run`` over the
same questions (target <= 1.2 on the local pool). Then, unless ``--no-sigterm``: every client
sends one request at once to a fresh local server, SIGTERM goes out once all are accepted,
and the table says how many were answered, how many got a 5xx, and the exit code.

``--executor``: the server's executor (``coe serve --executor ray`` starts a private local Ray
instance of its own, timed apart: the load starts once ``/health`` answers). With ``both`` each
pool is served by the local executor, then by Ray, on the same machine, one row each: the
table adds the model loads of the whole load (``loads``) and the models resident at its end
(``resident``; with room for every model, loads = resident = the distinct weights recruited),
and ``coe run``'s wall time (``run s``) is the local executor's for both rows.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
REPLAY_DIR = Path("/work/runs/mmlu-pro")
sys.path.insert(0, str(REPO))

import openai  # noqa: E402

from coe.apps.api import Orchestrator  # noqa: E402
from coe.io.questions import Question, load_questions  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, config: Path, log: Path, *args: str):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-c", "from coe.apps.cli import main; main()", "serve", "-c",
               str(config), "--port", str(self.port), "--no-cache", *args]
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"coe serve exited: {log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.root + "/health", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        raise SystemExit("coe serve did not start")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.root + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def health(self) -> dict:
        with urllib.request.urlopen(self.root + "/health", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(300)


def ask(base_url: str, q: Question, client: openai.OpenAI | None = None) -> tuple[float, str]:
    """(latency, outcome): outcome is 'ok', 'http NNN' or the error's type. Without
    ``client``, a client (and connection) of its own."""
    own = client is None
    client = client or openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                                     timeout=900)
    t0 = time.perf_counter()
    extra = {"id": q.id, "choices": q.choices, "kind": q.answer_kind, "category": q.category}
    try:
        client.chat.completions.create(model="coe", messages=[{"role": "user",
                                                               "content": q.question}],
                                       extra_body={"coe": extra})
        outcome = "ok"
    except openai.APIStatusError as e:
        outcome = f"http {e.status_code}"
    except openai.APIError as e:
        outcome = type(e).__name__
    finally:
        if own:
            client.close()
    return time.perf_counter() - t0, outcome


def load(base_url: str, questions: list[Question], clients: int) -> tuple[float, list]:
    """Each client sends its share one after another; all clients at once."""
    shares = [questions[i::clients] for i in range(clients)]

    def client_loop(share):  # one client (keep-alive connection) per simulated user
        with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0,
                           timeout=900) as client:
            return [ask(base_url, q, client) for q in share]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client_loop, shares) for r in rs]
    return time.perf_counter() - t0, results


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 \
        else values[0]


def local_questions(n: int) -> list[Question]:
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append(Question(id=f"m{i}", question=f"What is {i + 3} times {i + 4}?",
                                answer=str((i + 3) * (i + 4))))
        elif kind == 1:
            out.append(Question(id=f"s{i}", question=f"Which particle has a negative charge? "
                                f"(item {i})", choices=["proton", "neutron", "electron"],
                                answer="C"))
        else:
            out.append(Question(id=f"g{i}", question=f"Which city is the capital of France? "
                                f"(item {i})", choices=["Berlin", "Paris", "Rome"], answer="B"))
    return out


def replay_pool() -> Path:
    if not (REPLAY_DIR / "experts.yaml").is_file():
        if not SHARED.is_dir():
            raise SystemExit(f"{SHARED} not found: the replay pool needs ../shared/data")
        subprocess.run([sys.executable, str(REPO / "scripts" / "mmlu_pro_pool.py"),
                        str(SHARED / "mmlu-pro-outputs"), str(REPLAY_DIR)], check=True)
    return REPLAY_DIR / "experts.yaml"


def measure(name: str, config: Path, questions: list[Question], clients: int,
            workdir: Path, executor: str = "local", run_wall: float | None = None) -> dict:
    server = Server(config, workdir / f"serve-{name}-{executor}.log", "--executor", executor)
    try:
        wall, results = load(server.root + "/v1", questions, clients)
        m = server.metrics()
        resident = len(server.health()["residency"])
    finally:
        code = server.stop()
    lat = [t for t, o in results if o == "ok"] or [float("nan")]
    bad = [o for _, o in results if o != "ok"]
    batches = m.get("coe_batches_total", 0) or 1
    if run_wall is None:
        with Orchestrator.from_yaml(config, cache=False) as orch:
            run_wall = orch.run(questions).wall_seconds
    return {
        "pool": name, "executor": executor, "requests": len(results), "clients": clients,
        "loads": int(m.get("coe_model_loads_total", 0)), "resident": resident,
        "throughput": len(results) / wall, "p50": pct(lat, 50), "p95": pct(lat, 95),
        "p99": pct(lat, 99),
        "mean_batch": m.get("coe_batch_size_sum", 0) / batches,
        "batches": int(batches),
        "loads_per_batch": m.get("coe_model_loads_total", 0) / batches,
        "weights_per_batch": m.get("coe_batch_distinct_weights_total", 0) / batches,
        "lost_or_failed": len(bad), "wall": wall, "run_wall": run_wall,
        "ratio": wall / run_wall if run_wall else float("nan"),
        "exit": code, "errors": sorted(set(bad)),
    }


def sigterm_under_load(config: Path, clients: int, workdir: Path,
                       executor: str = "local") -> dict:
    """Every client sends one request; once the server has accepted them all, SIGTERM."""
    server = Server(config, workdir / f"serve-sigterm-{executor}.log", "--executor", executor)
    qs = local_questions(clients + 1000)[1000:]  # not the questions of the load above
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(ask, server.root + "/v1", q) for q in qs]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            accepted = server.metrics().get("coe_requests_in_flight", 0)
            done = sum(f.done() for f in futures)
            if accepted + done >= clients:
                break
            time.sleep(0.05)
        in_flight = int(server.metrics().get("coe_requests_in_flight", 0))
        server.proc.send_signal(signal.SIGTERM)
        outcomes = [f.result()[1] for f in futures]
    code = server.proc.wait(600)
    return {"accepted_at_sigterm": in_flight, "answered": outcomes.count("ok"),
            "5xx": sum(o.startswith("http 5") for o in outcomes),
            "other": sorted({o for o in outcomes if o != "ok"}), "exit": code}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", choices=["local", "replay", "both"], default="both")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--per-client", type=int, default=2, help="questions per client, local pool")
    ap.add_argument("--replay-per-client", type=int, default=20,
                    help="questions per client, replay pool")
    ap.add_argument("--executor", choices=["local", "ray", "both"], default="local",
                    help="the server's executor; both: local, then Ray, one row each")
    ap.add_argument("--no-sigterm", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="coe-serve-load-"))
    executors = ["local", "ray"] if args.executor == "both" else [args.executor]
    pools = []
    if args.pool in ("local", "both"):
        pools.append(("local", REPO / "experts.yaml",
                      local_questions(args.clients * args.per_client)))
    if args.pool in ("replay", "both"):
        config = replay_pool()
        qs = load_questions(config.parent / "test.jsonl").questions
        pools.append(("replay", config, qs[:args.clients * args.replay_per_client]))
    rows = []
    try:
        for name, config, qs in pools:
            run_wall = None
            for ex in executors:
                rows.append(measure(name, config, qs, args.clients, workdir, ex, run_wall))
                run_wall = rows[-1]["run_wall"]
        head = (f"{'pool':<7} {'executor':<8} {'reqs':>5} {'req/s':>7} {'p50 s':>7} "
                f"{'p95 s':>7} {'p99 s':>7} {'batch':>6} {'batches':>7} {'loads':>5} "
                f"{'resident':>8} {'loads/b':>7} {'weights/b':>9} {'lost':>5} {'wall s':>7} "
                f"{'run s':>7} {'ratio':>6}")
        print(head)
        for r in rows:
            print(f"{r['pool']:<7} {r['executor']:<8} {r['requests']:>5} "
                  f"{r['throughput']:>7.2f} {r['p50']:>7.2f} {r['p95']:>7.2f} {r['p99']:>7.2f} "
                  f"{r['mean_batch']:>6.1f} {r['batches']:>7} {r['loads']:>5} "
                  f"{r['resident']:>8} {r['loads_per_batch']:>7.2f} "
                  f"{r['weights_per_batch']:>9.2f} {r['lost_or_failed']:>5} {r['wall']:>7.1f} "
                  f"{r['run_wall']:>7.1f} {r['ratio']:>6.2f}")
            if r["errors"]:
                print(f"  {r['pool']} on {r['executor']}: failures {r['errors']}")
        if len(executors) == 2:
            for name, _, _ in pools:
                a, b = (next(r for r in rows if r["pool"] == name and r["executor"] == e)
                        for e in executors)
                print(f"{name} pool, ray / local: throughput x{b['throughput'] / a['throughput']:.2f}, "
                      f"p50 x{b['p50'] / a['p50']:.2f}, p99 x{b['p99'] / a['p99']:.2f}, "
                      f"loads {b['loads']} vs {a['loads']}")
        if not args.no_sigterm:
            for ex in executors:
                s = sigterm_under_load(REPO / "experts.yaml", args.clients, workdir, ex)
                print(f"SIGTERM with {s['accepted_at_sigterm']} requests accepted (local pool, "
                      f"{ex} executor): {s['answered']} answered, {s['5xx']} 5xx, other "
                      f"{s['other'] or 'none'}, exit code {s['exit']}")
        print(json.dumps(rows))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
