"""A served request body as the experts see it: the whole conversation (system turns after the
persona, earlier turns, the last user turn as the question), the body's sampling for the
experts and the aggregator but not for a router's own generations. No server needed."""

from __future__ import annotations


def test_a_chats_whole_conversation_and_sampling_reach_every_expert_but_not_the_router():
    from coe.apps.serve.schema import ChatRequest
    from coe.core.config import parse_config
    from coe.text.prompts import build_request

    cfg = parse_config({"experts": [
        {"name": "chat", "backend": "replay", "model": "m.jsonl", "system_prompt": "Persona.",
         "sampling": {"max_tokens": 96, "stop": ["x"]}},
        {"name": "base", "backend": "replay", "model": "m.jsonl", "prompt_format": "completion"}]})
    req = ChatRequest.model_validate({
        "model": "coe", "max_tokens": 7, "stop": "END", "temperature": 0.5,
        "messages": [{"role": "system", "content": "Answer in French."},
                     {"role": "user", "content": "Earlier turn"},
                     {"role": "assistant", "content": "..."},
                     {"role": "user", "content": [{"type": "text", "text": "Capital of Peru?"}]}]})
    q = req.to_question("chatcmpl-1")
    assert (q.question, q.instructions) == ("Capital of Peru?", "Answer in French.")
    chat = build_request(cfg.expert("chat"), q)
    assert (chat.messages[0].role, chat.messages[0].content) == ("system", "Persona.\n\nAnswer in French.")
    assert (chat.sampling.max_tokens, chat.sampling.stop, chat.sampling.temperature) == \
        (7, ["END"], 0.5)
    base = build_request(cfg.expert("base"), q)
    # the whole conversation, earlier turns included, in the completion template
    assert base.prompt.startswith("Answer in French.\n\nQuestion: Earlier turn\nAnswer: ...\n\n"
                                  "Question: Capital of Peru?")
    assert base.sampling.max_tokens == 7 and "END" in base.sampling.stop
    keywords = build_request(cfg.expert("chat"), q, stage="skills", messages=(("user", "k"),))
    assert keywords.sampling.max_tokens == 96  # a router's own generation keeps the yaml's
