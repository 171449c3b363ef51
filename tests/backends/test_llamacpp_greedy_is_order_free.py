"""A llama.cpp expert's greedy answer to a prompt does not depend on the prompt before it.

llama-cpp-python keeps the tokens a prompt shares with the previous one and evaluates only
the rest, in other chunks, which rounds differently: Gemma-3-270M answered "What is 15% of
240?" with " 15% of 240 = 240/1..." alone and " 15% of 240 = 240 - ..." after "What is
7 + 5?" (found by trying every ordered pair of a few questions; this test failed that way
before the backend started every prompt from an empty context). ``reuse_prefix: true`` keeps
the old, faster behaviour, under a cache fingerprint of its own.
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


def backend(reuse_prefix: bool = False):
    cfg = load_config(REPO / "experts.yaml")
    e = next(x for x in cfg.experts if x.name == "gemma3-base")
    e = e.model_copy(update={"reuse_prefix": reuse_prefix})
    b = BACKENDS.get(e.backend)(e, cfg.base_dir)
    return e, b


def answers(b, e, questions) -> list[str]:
    out = {}
    b.generate([build_request(e, q) for q in questions], lambda i, g: out.__setitem__(i, g))
    assert all(g.error is None for g in out.values())
    return [out[i].text for i in range(len(questions))]


@pytest.mark.slow
def test_a_greedy_answer_does_not_depend_on_the_prompt_before_it():
    e, b = backend()
    b.load()
    try:
        alone = answers(b, e, [SECOND])[0]
        after = answers(b, e, [FIRST, SECOND])[1]
        again = answers(b, e, [SECOND])[0]
    finally:
        b.unload()
    assert after == alone == again
    assert backend(True)[1].fingerprint() != b.fingerprint()
