"""Resident models on Ray: one long-lived actor per model while the residency policy keeps it,
evicted least recently used first when the nodes' resources (CPUs, GPUs) have no room, its
process (and what it held) gone with it; a busy model's second replica, and two models'
actors working at the same time. On the real local Ray instance (``ray_cluster``: 2 CPUs, 2
logical GPUs)."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from coe.core.config import load_config, parse_config
from coe.execution.ray import RayExecutor
from coe.io.questions import load_questions
from coe.text.prompts import build_request
from tests.support.openai_server import arithmetic_questions, openai_expert, write_pool
from tests.support.proxy import Fault

ray = pytest.importorskip("ray")

DOUBLES = Path(__file__).resolve().parents[1] / "support" / "doubles"


def gone(pid: int, timeout: float = 60.0) -> bool:
    """Whether process ``pid`` has exited (waits for it, bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def ask(ex: RayExecutor, cfg, expert: str, questions) -> object:
    return ex.run([build_request(cfg.expert(expert), q) for q in questions])


def test_resident_actors_load_once_and_the_least_recently_used_makes_room(ray_cluster,
                                                                          replay_pool):
    """Three replay models of one CPU each on two CPUs: the third evicts the least recently
    used; a model still loaded is used again without a load, by the same process."""
    cfg_path, qpath = replay_pool
    cfg = load_config(cfg_path)
    qs = load_questions(qpath).questions[:2]
    ex = RayExecutor(cfg, keep_resident=True)
    try:
        loads = [ask(ex, cfg, name, qs).stats.loads for name in ("alpha", "beta", "alpha")]
        assert loads == [1, 1, 0]
        before = {r.label: r for r in ex.residents()}
        assert [r.label for r in ex.residents()] == ["replay:beta.jsonl", "replay:alpha.jsonl"]  # LRU first
        assert all(r.node == "127.0.0.1" and r.pid and r.bytes > 0 for r in before.values())
        run = ask(ex, cfg, "gamma", qs)  # no room for a third CPU: beta goes
        assert run.stats.loads == 1 and run.stats.failures == {}
        assert [r.label for r in ex.residents()] == ["replay:alpha.jsonl", "replay:gamma.jsonl"]
        assert gone(before["replay:beta.jsonl"].pid)
        assert ask(ex, cfg, "alpha", qs).stats.loads == 0
        assert next(r for r in ex.residents() if r.label == "replay:alpha.jsonl").pid == \
            before["replay:alpha.jsonl"].pid
        pids = [r.pid for r in ex.residents()]
    finally:
        ex.close()
    assert ex.residents() == [] and all(gone(p) for p in pids)


def test_an_evicted_vllm_expert_releases_its_gpus_with_its_process(ray_cluster, tmp_path):
    """Against the vLLM TEST DOUBLE (no GPU here: Ray's GPUs are logical). Two one-GPU experts
    are resident on the two GPUs; the tensor-parallel one needs both, so both are unloaded
    (their processes end, their GPUs go back to Ray) and it loads in a placement group."""
    log = tmp_path / "engines.jsonl"
    cfg = parse_config({
        "experts": [{"name": "one", "backend": "vllm", "model": "org/one-1b"},
                    {"name": "two", "backend": "vllm", "model": "org/two-1b"},
                    {"name": "wide", "backend": "vllm", "model": "org/wide-70b",
                     "tensor_parallel_size": 2}],
        "router": {"kind": "all"},
        "executor": {"kind": "ray", "options": {"runtime_env": {"env_vars": {
            "PYTHONPATH": str(DOUBLES), "VLLM_DOUBLE_LOG": str(log)}}}}})
    qs = arithmetic_questions(1)
    ex = RayExecutor.from_config(cfg, keep_resident=True)
    try:
        for name in ("one", "two"):
            assert ask(ex, cfg, name, qs).generations[0].text == "Answer: B"
        gpus = {json.loads(line)["kwargs"]["model"]: json.loads(line)["gpu_ids"]
                for line in log.read_text().splitlines()}
        assert sorted(gpus["org/one-1b"] + gpus["org/two-1b"]) == ["0", "1"]
        small = [r.pid for r in ex.residents()]
        assert ray.available_resources().get("GPU", 0) == 0
        run = ask(ex, cfg, "wide", qs)
        assert run.stats.failures == {} and run.generations[0].text == "Answer: B"
        assert [r.label for r in ex.residents()] == ["vllm:org/wide-70b"]
        assert all(gone(p) for p in small)
        assert [pg["state"] for pg in ray.util.placement_group_table().values()
                if pg["state"] != "REMOVED"] == ["CREATED"]
    finally:
        ex.close()
    deadline = time.monotonic() + 60
    while ray.available_resources().get("GPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("GPU", 0) == 2  # all released with the processes


def test_two_models_and_a_busy_models_replica_run_at_the_same_time(ray_cluster, proxy,
                                                                   tmp_path):
    """Each run's request is held at the proxy until the other run's request has arrived: the
    runs can only finish if the two actors work at the same time. Two models first, then two
    runs of one model: the second gets a replica (an endpoint holds nothing: there is room)."""
    other_host = proxy.base_url.replace("127.0.0.1", "localhost")  # another load key
    cfg = load_config(write_pool(tmp_path, [
        openai_expert("a", proxy.base_url, max_retries=0),
        openai_expert("b", other_host, max_retries=0)]))
    ex = RayExecutor(cfg, keep_resident=True)
    try:
        for first, second, held in (("a", "b", 1), ("a", "a", 3)):
            proxy.inject(Fault.hold(until_arrived=held + 1))
            arrived = proxy.on_request(held)
            qs = arithmetic_questions(held + 1)[held - 1:]
            out: dict = {}
            one = threading.Thread(target=lambda: out.update(x=ask(ex, cfg, first, qs[:1])))
            one.start()
            assert arrived.wait(120)  # the first run's request is at the proxy, held
            out["y"] = ask(ex, cfg, second, qs[1:])
            one.join(120)
            assert all(r.generations[0].error is None for r in out.values()), out
        a = next(r.label for r in ex.residents() if "127.0.0.1" in r.label)
        assert sorted(r.label for r in ex.residents()) == sorted(
            [a, f"{a} (replica 2)", a.replace("127.0.0.1", "localhost")])
        assert len({r.pid for r in ex.residents()}) == 3
    finally:
        ex.close()
