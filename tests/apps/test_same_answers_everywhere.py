"""One pipeline: ``coe run``, ``coe serve`` and ``coe eval`` give the same final answer, with
the same recruits, to every question of a replay pool, for the same strategy (here the category
router's top two voting, and the knn router with the learned selector after ``coe profile``).

Each app runs as a user runs it: the ``coe`` command in a subprocess; ``coe serve`` on
127.0.0.1, called by the real ``openai`` client."""

from __future__ import annotations

import json

import openai
import pytest
import yaml

from tests.apps.eval.test_eval import make_pool
from tests.support.cli import coe
from tests.support.coe_server import CoeServer

pytestmark = pytest.mark.server  # `coe serve` as a subprocess


def _pool(tmp_path):
    """The hand-checked pool of eight test and four validation questions, recruiting two."""
    cfg, test, val = make_pool(tmp_path)
    pool = yaml.safe_load(cfg.read_text())
    pool["router"] = {"kind": "category", "k": 2}
    cfg.write_text(yaml.safe_dump(pool))
    return cfg, test, val


def _served(server: CoeServer, model: str, questions: list[dict]) -> dict[str, tuple]:
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                           timeout=120)
    out = {}
    for q in questions:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": q["question"]}],
            extra_body={"coe": {"id": q["id"], "choices": q["choices"],
                                "category": q.get("category")}})
        ext = r.model_extra["coe"]
        out[q["id"]] = (ext["final_answer"], [e["name"] for e in ext["route"]["experts"]])
    return out


def _run_and_eval(tmp_path, cfg, test, strategy: str) -> tuple[dict, dict]:
    """(final answer, recruits) per question id from ``coe run`` and from ``coe eval``."""
    run = coe("run", test, "-c", cfg, "-q", "--no-cache")
    assert run.returncode == 0, run.stderr
    by_run = {r["id"]: (r["final_answer"], [e["name"] for e in r["route"]["experts"]])
              for r in map(json.loads, run.stdout.splitlines())}
    out = tmp_path / f"eval-{strategy}"
    ev = coe("eval", test, "-c", cfg, "-s", strategy, "-o", out, "-q", "--no-cache",
             "--no-plots", "--val-fraction", "0")
    assert ev.returncode == 0, ev.stderr
    rows = map(json.loads, (out / "outcomes.jsonl").read_text().splitlines())
    by_eval = {r["id"]: (r["strategies"][strategy]["answer"], r["strategies"][strategy]["experts"])
               for r in rows}
    return by_run, by_eval


def test_run_serve_and_eval_answer_alike(tmp_path):
    cfg, test, val = _pool(tmp_path)
    questions = [json.loads(line) for line in test.read_text().splitlines()]
    by_run, by_eval = _run_and_eval(tmp_path, cfg, test, "category+vote")
    server = CoeServer(cfg, tmp_path, "--no-cache", "--batch-window-ms", "5").start()
    try:
        by_serve = _served(server, "coe/category+vote", questions)
    finally:
        assert server.stop() == 0, server.log()
    assert by_run == by_eval == by_serve
    assert len(by_run) == 8 and all(len(experts) == 2 for _, experts in by_run.values())


def test_a_learned_strategy_answers_alike_after_profiling(tmp_path):
    """knn routing and the learned selector read the profiles ``coe profile`` wrote (on the
    validation questions): run, serve and eval still agree on every question."""
    cfg, test, val = _pool(tmp_path)
    prof = coe("profile", val, "-c", cfg, "-o", tmp_path / "profiles.json", "-q",
               "--no-cache", "--aggregators", "")
    assert prof.returncode == 0, prof.stderr
    pool = yaml.safe_load(cfg.read_text())
    pool["router"] = {"kind": "knn", "k": 2, "neighbours": 3, "profiles": "profiles.json",
                      "use_given_category": False}
    pool["aggregator"] = {"kind": "learned"}
    cfg.write_text(yaml.safe_dump(pool))
    questions = [json.loads(line) for line in test.read_text().splitlines()]
    by_run, by_eval = _run_and_eval(tmp_path, cfg, test, "knn+learned")
    server = CoeServer(cfg, tmp_path, "--no-cache").start()
    try:
        by_serve = _served(server, "coe", questions)
    finally:
        assert server.stop() == 0, server.log()
    assert by_run == by_eval == by_serve
