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

import pytest

from coe.cache import CacheKeys, cache_key
from coe.config import parse_config
from coe.errors import ExpertError
from coe.executor import LocalExecutor
from coe.experts.replay import ReplayBackend
from coe.types import Generation, GenRequest, Sampling
from tests.conftest import write_jsonl

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


# -- the replay backend ----------------------------------------------------------------------

def _replay(tmp_path, records: list[dict] | None = None, raw: bytes | None = None):
    path = tmp_path / "rec.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        write_jsonl(path, records)
    cfg = parse_config({"experts": [{"name": "r", "backend": "replay", "model": str(path)}]})
    return ReplayBackend(cfg.experts[0]), path


def _ask(backend, *ids) -> list[Generation]:
    out: dict[int, Generation] = {}
    backend.generate([GenRequest(expert="r", question_id=i, sampling=Sampling()) for i in ids],
                     lambda i, g: out.__setitem__(i, g))
    return [out[i] for i in range(len(ids))]


def test_replay_reads_each_record_when_it_is_asked_for(tmp_path):
    backend, path = _replay(tmp_path, [
        {"id": "a", "text": "The answer is (A).", "answer": "A", "prompt_tokens": 3},
        {"id": 7, "text": "The answer is (B).", "finish_reason": "length",
         "truncated_by": "max_tokens"},
        {"id": "a", "text": "Later: (C).", "answer": "C"},  # a repeated id: the last one wins
    ])
    backend.load()
    # what a loaded replay holds: an offset per id, no record, no text
    assert set(backend.index) == {"a", "7"}
    assert all(type(v) is int for v in backend.index.values())
    # the record is read when it is asked for: rewrite a text in place (same length) after
    # loading, and the new text is what is replayed
    data = path.read_bytes()
    path.write_bytes(data.replace(b"Later: (C).", b"Later: (D)."))
    c, b, missing = _ask(backend, "a", "7", "nope")
    assert (c.text, c.recorded_answer, c.has_recorded_answer) == ("Later: (D).", "C", True)
    assert (b.text, b.has_recorded_answer, b.finish_reason, b.truncated_by) == \
        ("The answer is (B).", False, "length", "max_tokens")
    assert missing.error == "no recorded response for question 'nope'"
    # a file rewritten so that a record moved is an error naming the file, not a wrong answer
    path.write_bytes(b"\n" + data)
    with pytest.raises(ExpertError, match="changed while it was replayed"):
        _ask(backend, "7")
    backend.unload()
    assert backend.index is None


@pytest.mark.parametrize("line, why", [
    (b'{"id": "b", "text": "x"', "not a {id, text} record"),
    (b'{"text": "no id"}', "not a {id, text} record"),
    (b'["a", "list"]', "not a {id, text} record"),
    (b'{"id": "b", "text": "\xff\xfe"}', "not a {id, text} record"),  # not UTF-8
    (b'{"id": "b", "text": "x", "truncated_by": "tokens"}',
     "truncated_by must be max_tokens, context or null"),
])
def test_replay_bad_record_names_file_and_line(tmp_path, line, why):
    backend, path = _replay(tmp_path, raw=b'{"id": "a", "text": "ok"}\n\n' + line + b"\n")
    with pytest.raises(ExpertError) as e:
        backend.load()
    assert f"{path}:3: {why}" in str(e.value)


# -- the executor's stages --------------------------------------------------------------------

def test_local_stages_one_model_at_a_time_endpoints_together(tmp_path):
    (tmp_path / "shared.jsonl").write_text("")
    (tmp_path / "own.jsonl").write_text("")
    api = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}
    cfg = parse_config({"experts": [
        {"name": "api1", **api, "model": "m1"},
        {"name": "p1", "backend": "replay", "model": "shared.jsonl"},
        {"name": "own", "backend": "replay", "model": "own.jsonl"},
        {"name": "p2", "backend": "replay", "model": "shared.jsonl"},  # p1's weights
        {"name": "api2", **api, "model": "m2"},
    ]}, base_dir=tmp_path)
    ex = LocalExecutor(cfg)
    names = [e.name for e in cfg.experts]
    # the models holding weights one per stage (two personas of one file together), in
    # first-come order; the endpoints all together, last: as one plan would run them
    assert ex.stages(names) == [["p1", "p2"], ["own"], ["api1", "api2"]]
    # the next stage's model (an aggregator) last among those holding weights
    assert ex.stages(names, last="p2") == [["own"], ["p1", "p2"], ["api1", "api2"]]
    assert ex.keeps_loaded
