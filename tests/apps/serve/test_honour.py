"""What a served request may ask of a composition, without a server or a model: a composition
refuses logprobs, delegates tools to its strongest tool-capable recruit or refuses them, asks
JSON only where a recruit can give it; a body's unsupported fields are refused by name; a fresh
sample (temperature > 0, no seed) is never shared or cached; n samples differ by seed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from coe.apps.serve.honour import Refused, check_composition, check_pass_through, settle
from coe.apps.serve.schema import ChatRequest, CompletionRequest
from coe.core.config import parse_config
from coe.core.registry import BACKENDS
from coe.core.types import GenerationOptions, Question, Recruit, Route, Sampling
from coe.execution import build_executor
from coe.io.cache import ResponseCache
from coe.text.prompts import build_request

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
POOL = parse_config({"experts": [
    {"name": "memo", "backend": "replay", "model": "m.jsonl"},
    {"name": "api", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
     "strength": 0.2},
    {"name": "api2", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
     "strength": 0.9},
    {"name": "base", "backend": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1",
     "prompt_format": "completion"}]})


def caps(name: str):
    cfg = POOL.expert(name)
    return BACKENDS.get(cfg.backend).capabilities_for(cfg)


def route(*names: str) -> Route:
    return Route(question_id="q", experts=[Recruit(name=n) for n in names], reason="all")


def ask(**fields) -> Question:
    return ChatRequest.model_validate({"model": "coe", "messages": [
        {"role": "user", "content": "Hi?"}], **fields}).to_question("q")


def test_tools_go_to_the_strongest_tool_capable_recruit_or_are_refused():
    q = ask(tools=[TOOL])
    moved = settle(q, route("memo", "base", "api", "api2"), POOL, caps)
    assert moved.names == ["api2"] and "tools: delegated to api2" in moved.reason
    with pytest.raises(Refused) as e:
        settle(q, route("memo", "base"), POOL, caps)  # a replay, a completion model
    assert e.value.param == "tools"
    assert settle(ask(), route("memo"), POOL, caps) is None


def test_json_needs_one_recruit_that_can_give_it():
    q = ask(response_format={"type": "json_object"})
    assert settle(q, route("memo", "api"), POOL, caps) is None
    with pytest.raises(Refused) as e:
        settle(q, route("memo"), POOL, caps)
    assert e.value.param == "response_format"


def test_logprobs_and_echo_are_a_single_experts():
    with pytest.raises(Refused) as e:
        check_composition(ask(logprobs=True), "coe")
    assert e.value.param == "logprobs"
    check_pass_through(ask(logprobs=True, top_logprobs=3), "api", POOL, caps)
    with pytest.raises(Refused) as e:
        check_pass_through(ask(logprobs=True), "memo", POOL, caps)
    assert e.value.param == "logprobs"
    echo = CompletionRequest.model_validate({"model": "x", "prompt": "a", "echo": True})
    with pytest.raises(Refused) as e:
        check_composition(echo.to_question("q"), "coe")
    assert e.value.param == "echo"


@pytest.mark.parametrize("field,value", [("logit_bias", {"1": 2}), ("suffix", "x"),
                                         ("n", 99), ("functions", [{"name": "f"}])])
def test_a_field_that_would_be_ignored_is_refused_by_name(field, value):
    with pytest.raises(ValidationError) as e:
        ChatRequest.model_validate({"model": "x", "messages": [
            {"role": "user", "content": "Hi"}], field: value})
    assert e.value.errors()[0]["loc"][0] == field
    with pytest.raises(ValidationError, match="token-id prompts"):
        CompletionRequest.model_validate({"model": "x", "prompt": [[1, 2, 3]]})


def test_a_fresh_sample_drops_the_experts_seed_and_is_never_cached(tmp_path):
    yaml_sampling = Sampling(temperature=0.0, seed=0)
    assert GenerationOptions(temperature=0.7).apply(yaml_sampling).seed is None
    assert GenerationOptions(temperature=0.7, seed=3).apply(yaml_sampling).seed == 3
    cfg = POOL.expert("api")
    fresh = build_request(cfg, ask(temperature=0.7))
    seeded = build_request(cfg, ask(temperature=0.7, seed=3))
    samples = [build_request(cfg, ask(temperature=0.7, seed=3), sample=k) for k in range(3)]
    assert [s.sampling.seed for s in samples] == [3, 4, 5]
    greedy = [build_request(cfg, ask(), sample=k) for k in range(2)]
    assert greedy[0] == greedy[1]  # a greedy sample is the same generation
    ex = build_executor(POOL, cache=ResponseCache(tmp_path / "c.sqlite"))
    plan = ex.plan([fresh, fresh, seeded, seeded])
    assert sorted(len(g.indices) for g in plan.groups) == [3]  # the fresh twice, seeded once
    assert plan.same_as == {3: 2}
    ex.close()
