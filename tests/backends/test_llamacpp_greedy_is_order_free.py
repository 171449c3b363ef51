"""A llama.cpp expert's greedy answer to a prompt does not depend on the prompt before it,
with the prefix a prompt shares with the previous one kept (the default) or not.

llama-cpp-python alone keeps the tokens a prompt shares with the previous one and evaluates
only the rest, in other chunks, which rounds differently: Gemma-3-270M answered "What is 15%
of 240?" with " 15% of 240 = 240/1..." alone and " 15% of 240 = 240 - ..." after "What is
7 + 5?" (found by trying every ordered pair of a few questions). The backend keeps a shared
prefix only in whole evaluation steps (``prefix_block`` tokens), evaluated as from an empty
context, so the answers are those of an empty context while the shared system prompt of a
conversation is not evaluated again.
"""

from __future__ import annotations

import pytest

from coe.core.config import load_config
from coe.core.registry import BACKENDS
from coe.core.types import Question
from coe.text.prompts import build_request
from tests.conftest import REPO

FIRST = Question(id="q1", question="What is 7 + 5?", category="math")
SECOND = Question(id="x0", question="What is 15% of 240?")
#: a system prompt of well over one step of 32 tokens, shared by the prompts below
LONG = ("You are a careful assistant for a school. Read each question twice, think about what "
        "it asks, work through the steps one at a time, check every number, and then give a "
        "short, clear final answer that a pupil can follow. Never invent facts.")
QUESTIONS = ["What is 7 + 5?", "What is 15% of 240?", "Name the largest planet.",
             "How many legs does a spider have?"]


def backend(name: str = "gemma3-base", **update):
    cfg = load_config(REPO / "experts.yaml")
    e = next(x for x in cfg.experts if x.name == name).model_copy(update=update)
    return e, BACKENDS.get(e.backend)(e, cfg.base_dir)


def answers(b, e, questions) -> list[str]:
    out = {}
    b.generate([build_request(e, q) for q in questions], lambda i, g: out.__setitem__(i, g))
    assert all(g.error is None for g in out.values())
    return [out[i].text for i in range(len(questions))]


@pytest.mark.slow
@pytest.mark.parametrize("reuse", [True, False])
def test_a_greedy_answer_does_not_depend_on_the_prompt_before_it(reuse):
    e, b = backend(reuse_prefix=reuse)
    b.load()
    try:
        alone = answers(b, e, [SECOND])[0]
        after = answers(b, e, [FIRST, SECOND])[1]
        again = answers(b, e, [SECOND])[0]
    finally:
        b.unload()
    assert after == alone == again


@pytest.mark.slow
@pytest.mark.parametrize("expert", ["gemma3-base", "smollm2-math"])
def test_a_shared_prefix_is_kept_and_the_answers_are_those_of_an_empty_context(expert):
    e, b = backend(expert, system_prompt=LONG)
    qs = [Question(id=f"p{i}", question=t) for i, t in enumerate(QUESTIONS)]
    b.load()
    try:
        fresh = []
        for q in qs:  # each from an empty context
            b.llm.last_prompt = []
            fresh.append(answers(b, e, [q])[0])
            assert b.llm.kept == 0
        kept = []
        for q in [*qs, *reversed(qs)]:  # each after another prompt of the same system prompt
            kept.append(answers(b, e, [q])[0])
            assert b.llm.kept >= 32 or q is qs[0]
    finally:
        b.unload()
    assert kept == [*fresh, *reversed(fresh)]
    assert backend(expert, prefix_block=64)[1].fingerprint() != b.fingerprint()
