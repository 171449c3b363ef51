"""Evaluation that scales: what ``coe eval`` holds, and what it hands the executor at once.

Time and memory targets live in ``benchmarks/scale.py``; here are the properties behind them,
each one able to fail: the replay backend reads a record when it is asked for it (it holds an
index, not the texts); an evaluation's result holds arrays, not one object per generation,
route or outcome, and no text unless something reads it; the expert phase gives the executor
one model's requests at a time, in bounded runs, without a load more; and the arrays give
back exactly what the objects they replace said (routes, responses, scores, outcomes.jsonl,
cache keys).
"""

from __future__ import annotations

import hashlib
import json

from coe.cache import CacheKeys, cache_key
from coe.types import GenRequest, Sampling

# -- cache keys --------------------------------------------------------------------------------


def _reference_key(fingerprint: str, request: GenRequest, by_question: bool = False) -> str:
    """The cache key as every earlier version wrote it."""
    payload = {"question": request.question_id if by_question else None, "model": fingerprint,
               "prompt": request.prompt, "messages": request.messages,
               "sampling": request.sampling.model_dump()}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def test_cache_keys_are_unchanged():
    """The key is assembled from its parts, each Sampling serialised once per plan: the same
    bytes as the JSON of the whole payload, so caches written before still answer."""
    shared = Sampling(stop=["\n\nQuestion:", "é"], seed=None, temperature=0.7)
    requests = [
        GenRequest(expert="x", question_id='q"1', sampling=shared, prompt='Say "hi" ü\n'),
        GenRequest(expert="x", question_id="2", sampling=shared, prompt="Other\\prompt"),
        GenRequest(expert="x", question_id="3", sampling=Sampling(),
                   messages=(("system", "a"), ("user", "b ✓ \u2028"))),
        GenRequest(expert="x", question_id="4", sampling=Sampling(max_tokens=7)),
    ]
    keys = CacheKeys()
    for r in requests:
        for by_question in (False, True):
            want = _reference_key("fp:1", r, by_question)
            assert cache_key("fp:1", r, by_question) == want
            assert keys("fp:1", r, by_question) == want
    # one key written by the code before this change
    r = GenRequest(expert="x", question_id="q1", sampling=Sampling(stop=["\n\nQuestion:"]),
                   prompt="Question: Größe?\nAnswer:")
    assert cache_key("replay:abc", r, True) == \
        "1660fbe941a07193932a1f650981e431392eb56da12322a7fb3e9c36fcc954f1"
    assert cache_key("llamacpp:m", r) == \
        "cc3fd320ac24383078d8a3b7e3dd53f6c27e017d421e9c4a26b5ac939060923e"
