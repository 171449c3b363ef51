"""How a request becomes an expert's prompt: a recruit's chat (persona, earlier turns, the
question with its choices and the answer line), the completion template, a pass-through."""

from __future__ import annotations

import pytest

from coe.core.types import Request, Sampling
from coe.text.prompts import (
    COMPLETION_STOP,
    DEFAULT_SYSTEM,
    Unrenderable,
    build_request,
    proxy_request,
)


class Chat:
    name, prompt_format, system_prompt = "chat", "chat", "You are careful."
    sampling = Sampling(max_tokens=32)


class Base:
    name, prompt_format, system_prompt = "base", "completion", None
    sampling = Sampling(max_tokens=8, stop=["\n"])


TURNS = [{"role": "user", "content": "Capital of France?"},
         {"role": "assistant", "content": "Paris."},
         {"role": "user", "content": "And of Peru?"}]


def test_a_recruit_gets_persona_question_choices_and_answer_line():
    q = Request(id="1", question="Which is a prime?", choices=["4", "7"],
                instructions="Be brief.")
    r = build_request(Chat, q)
    assert [m.role for m in r.messages] == ["system", "user"]
    assert r.messages[0].content == "You are careful.\n\nBe brief."
    assert "A. 4\nB. 7" in r.messages[1].content
    assert r.messages[1].content.endswith("where X is the letter of the correct option.")


def test_a_recruit_of_a_conversation_sees_its_earlier_turns():
    r = build_request(Chat, Request(id="2", messages=TURNS))
    assert [(m.role, m.content.split("\n")[0]) for m in r.messages] == [
        ("system", "You are careful."), ("user", "Capital of France?"),
        ("assistant", "Paris."), ("user", "And of Peru?")]


def test_no_persona_gets_the_default_system_message():
    class NoPersona(Chat):
        system_prompt = None

    assert build_request(NoPersona, Request(id="3", question="Hi?")).messages[0].content == \
        DEFAULT_SYSTEM


def test_json_or_tools_drop_the_answer_line():
    q = Request(id="4", question="Give a JSON object.", response_format={"type": "json_object"})
    assert "Answer:" not in build_request(Chat, q).messages[-1].content


def test_the_completion_template_renders_earlier_turns():
    r = build_request(Base, Request(id="5", messages=TURNS))
    assert r.prompt == ("Question: Capital of France?\nAnswer: Paris.\n\n"
                        "Question: And of Peru?\nAnswer:")
    assert r.sampling.stop == ["\n", *COMPLETION_STOP]


def test_a_completion_model_cannot_read_tool_turns():
    conv = Request(id="6", messages=[
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "5"}])
    with pytest.raises(Unrenderable, match="tool"):
        build_request(Base, conv)


def test_a_pass_through_is_the_request_as_it_came():
    r = proxy_request(Chat, Request(id="7", messages=TURNS, sampling={"temperature": 0.4}))
    assert [(m.role, m.content) for m in r.messages] == [
        ("system", "You are careful."), *((t["role"], t["content"]) for t in TURNS)]
    assert r.sampling.temperature == 0.4 and r.sampling.max_tokens == 32
    raw = proxy_request(Base, Request(id="8", question="Once upon a time"))
    assert raw.prompt == "Once upon a time"  # a completion prompt is not wrapped
