"""A request is a conversation: a question-file line is its one-user-message case, a chat is
all of its turns, and every field that changes the answer reaches the cache key."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from coe.core.types import GenerationOptions, GenRequest, Message, Question, Request, Sampling
from coe.io.cache import cache_key
from coe.text.prompts import build_request, proxy_request

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "And an even one?"}]


def test_a_question_line_is_one_user_message():
    q = Question(id="1", question="What is 2 + 2?", instructions="Answer in French.")
    assert [(m.role, m.content) for m in q.messages] == [
        ("system", "Answer in French."), ("user", "What is 2 + 2?")]
    assert q.single_turn and q is not None and Question is Request


def test_messages_alone_are_the_conversation():
    q = Request(id="c", messages=CHAT)
    assert q.question == "And an even one?"  # what routers read first
    assert q.instructions == "Be brief."
    assert not q.single_turn
    assert [m.role for m in q.before_last_user] == ["system", "user", "assistant"]
    assert Request.model_validate(q.model_dump()) == q  # a file line written back reads again


def test_a_conversation_must_agree_with_its_question():
    with pytest.raises(ValidationError, match="last user message"):
        Request(id="c", question="Something else?", messages=CHAT)
    with pytest.raises(ValidationError, match="instructions must not be given"):
        Request(id="c", instructions="Other.", messages=CHAT)
    with pytest.raises(ValidationError, match="question"):
        Request(id="c", messages=[{"role": "system", "content": "No user turn."}])


def test_generation_options_apply_over_the_experts_sampling():
    opts = GenerationOptions(temperature=0.7, n=3, logprobs=True, top_logprobs=2,
                             presence_penalty=0.5)
    s = opts.apply(Sampling(max_tokens=64))
    assert (s.temperature, s.max_tokens, s.presence_penalty) == (0.7, 64, 0.5)
    assert opts.wants_logprobs == 2
    with pytest.raises(ValidationError):
        GenerationOptions(n=0)


class _Expert:
    name, prompt_format, system_prompt = "x", "chat", "Persona."
    sampling = Sampling()


def test_earlier_turns_reach_the_expert_and_the_cache_key():
    first = Request(id="c", messages=CHAT)
    other = Request(id="c", messages=[*CHAT[:2], {"role": "assistant", "content": "Two."},
                                      CHAT[3]])
    a, b = build_request(_Expert, first), build_request(_Expert, other)
    assert [m.role for m in a.messages] == ["system", "user", "assistant", "user"]
    assert a.messages[2].content == "Seven."
    assert cache_key("fp", a) != cache_key("fp", b)


def test_tools_and_response_format_are_part_of_the_request_and_its_key():
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    q = Request(id="t", question="Add 2 and 3.", tools=[tool], tool_choice="auto",
                response_format={"type": "json_object"})
    r = proxy_request(_Expert, q)
    assert r.tools[0].function.name == "add" and r.tool_choice == "auto"
    assert r.response_format.type == "json_object" and not r.plain
    plain = proxy_request(_Expert, Request(id="t", question="Add 2 and 3."))
    assert cache_key("fp", r) != cache_key("fp", plain)


def test_a_sample_index_makes_an_independent_generation():
    r = GenRequest(expert="x", question_id="q", sampling=Sampling(temperature=1.0, seed=None),
                   prompt="Hi")
    again = GenRequest(expert="x", question_id="q", sampling=r.sampling, prompt="Hi", sample=1)
    assert cache_key("fp", r) != cache_key("fp", again)


def test_tool_turns_keep_their_calls():
    conv = Request(id="t", messages=[
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}])
    r = proxy_request(_Expert, conv)
    chat = r.chat()
    assert chat[2]["tool_calls"][0]["function"]["name"] == "add"
    assert chat[3] == {"role": "tool", "content": "5", "tool_call_id": "call_1"}
    assert isinstance(r.messages[0], Message)
