"""Shared fixtures and the suite's two sizes.

Every test gets its own response cache (never the user's ~/.cache/coe).

``pytest -q`` runs the default suite: it loads no model, starts no server and no Ray. Tests that
do are marked and run with ``pytest -q --all`` (what CI runs):

- ``slow``: loads a real local model (llama.cpp);
- ``server``: starts a server (``llama_cpp.server``, ``coe serve``, a loopback fault proxy or
  test server). A test using one of the server fixtures is marked so here, whatever its module
  says;
- ``ray``: starts a local Ray instance;
- ``client``: drives ``coe serve`` with a real client library (openai, langchain, lm-eval...).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.support.openai_server"]

#: the marks the default suite leaves out (``--all`` runs them)
HEAVY = ("slow", "server", "ray", "client")
#: fixtures that start a server: a test using one is a ``server`` test
SERVER_FIXTURES = {"openai_server", "fresh_openai_server", "proxy", "fresh_proxy",
                   "local_server", "drip", "bad_endpoint"}
#: fixtures that start Ray
RAY_FIXTURES = {"ray_cluster"}


def pytest_addoption(parser):
    parser.addoption("--all", action="store_true", default=False,
                     help="also run the slow, server, ray and client tests (what CI runs)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SERVER_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.server)
        if RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.ray)
    if config.getoption("--all") or config.getoption("-m"):
        return  # everything, or the user's own selection by mark
    kept, left = [], []
    for item in items:
        (left if any(item.get_closest_marker(m) for m in HEAVY) else kept).append(item)
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = kept


@pytest.fixture(scope="session")
def _shared_models(tmp_path_factory) -> Path:
    """One ``models`` folder for the whole session: the static embedding model is distilled
    (a minute or two on 2 shared cores) by the first test that embeds anything, and found there by every later one."""
    return tmp_path_factory.mktemp("coe-models")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch, _shared_models):
    cache = tmp_path_factory.mktemp("coe-cache")
    (cache / "models").symlink_to(_shared_models, target_is_directory=True)
    monkeypatch.setenv("COE_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def replay_pool(tmp_path):
    """A small pool of replay experts over 6 questions; returns (yaml path, questions path)."""
    import yaml

    qs = [{"id": f"r{i}", "question": f"Question number {i}?", "choices": ["w", "x", "y", "z"],
           "answer": "ABCD"[i % 4]} for i in range(6)]
    answers = {  # expert -> letters per question
        "alpha": "ABCDAB",  # all right
        "beta": "ABCDCC",  # 4 right
        "gamma": "BBCABD",  # 3 right
    }
    experts = []
    for name, letters in answers.items():
        write_jsonl(tmp_path / f"{name}.jsonl",
                    [{"id": q["id"], "text": f"Reasoning... The answer is ({letter})."}
                     for q, letter in zip(qs, letters)])
        experts.append({"name": name, "backend": "replay", "model": f"{name}.jsonl",
                        "categories": ["default"]})
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump({"experts": experts, "router": {"kind": "all"}}))
    return cfg, write_jsonl(tmp_path / "questions.jsonl", qs)


def cached_generations(path: Path) -> int:
    """Rows in a response cache, read from outside the process writing it (0 if none yet)."""
    import sqlite3

    if not Path(path).exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One real local Ray instance for the session, started as coe starts one (private: every
    listener on 127.0.0.1), with the machine's two CPUs and two *logical* GPUs (for the vLLM
    test double: Ray only counts them). Yields its address (``RAY_ADDRESS`` for a ``coe``
    subprocess to join it)."""
    ray = pytest.importorskip("ray")
    from coe.execution.ray_cluster import start_private

    cache = tmp_path_factory.mktemp("ray-workers-cache")
    if ray.is_initialized():
        ray.shutdown()
    start_private(ray, num_cpus=2, num_gpus=2, logging_level="ERROR", log_to_driver=False,
                  runtime_env={"env_vars": {"COE_CACHE_DIR": str(cache)}})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
