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

import gc
import hashlib
import json
from collections import Counter

import pytest
import yaml

import coe.apps.eval.strategy_routes as strategy_routes
import coe.pipeline.aggregate as pipeline_aggregate
import coe.pipeline.generate as pipeline_generate
import coe.pipeline.route as pipeline_route
from coe.apps.eval.job import run_eval_job
from coe.apps.eval.scoring import NO_CATEGORY, Accuracy, StrategyScore
from coe.backends.replay import ReplayBackend
from coe.core.config import load_config, parse_config
from coe.core.errors import ExpertError
from coe.core.types import (
    ExpertResponse,
    FinalAnswer,
    Generation,
    GenRequest,
    Question,
    Recruit,
    Route,
    Sampling,
)
from coe.execution.local import LocalExecutor
from coe.io.cache import CacheKeys, cache_key
from coe.pipeline.responses import ResponseTable
from coe.pipeline.routes import RouteTable
from coe.routing import Router
from coe.text.answers import response_from
from tests.apps.eval.test_eval import JUDGE, job, make_pool, scripted  # noqa: F401 (a fixture)
from tests.conftest import write_jsonl

# -- cache keys --------------------------------------------------------------------------------


#: keys computed by coe 0.1 (commit bf231c7), before a request could be a conversation with
#: tool turns or carry penalties: a plain request must keep them
KEYS_OF_0_1 = [
    ("1e8007f80ead6d5cdae61c7d8a55fbb3e079328b7401df708e0506d698f39a90", False,
     GenRequest(expert="x", question_id="3", sampling=Sampling(),
                messages=(("system", "a"), ("user", "b ✓ \u2028")))),
    ("224c47d2d74e1b5be6f529c66e33eaccd3ec94bd3ea11320da85e5d11e3d54f3", True,
     GenRequest(expert="x", question_id="q1", prompt="Say hi",
                sampling=Sampling(temperature=0.7, seed=None, stop=["é"]))),
]


def _reference_key(fingerprint: str, request: GenRequest, by_question: bool = False) -> str:
    """The cache key as every earlier version wrote it: the conversation as [role, text]
    pairs, the sampling fields of 0.1."""
    old = ("temperature", "max_tokens", "top_p", "stop", "seed")
    messages = None if request.messages is None else [[m.role, m.content]
                                                      for m in request.messages]
    payload = {"question": request.question_id if by_question else None, "model": fingerprint,
               "prompt": request.prompt, "messages": messages,
               "sampling": {k: v for k, v in request.sampling.model_dump().items() if k in old}}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def test_cache_keys_of_plain_requests_are_those_of_0_1():
    for key, by_question, request in KEYS_OF_0_1:
        assert cache_key("fp:1", request, by_question) == key


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


# -- the tables give back what the objects said ---------------------------------------------

def test_route_table_gives_back_the_routes():
    names = ["a", "b", "c", "d"]
    routes = [
        Route(question_id="q0", experts=[Recruit(name="b", weight=0.5), Recruit(name="a")],
              category="math", confidence=0.75, reason="category 'math'", skills=["algebra"]),
        Route(question_id="q1", experts=[Recruit(name="d", weight=1 / 3)], aggregator="c"),
        Route(question_id="q2", experts=[Recruit(name="c"), Recruit(name="c", weight=0.1),
                                         Recruit(name="a", weight=2.0)], reason="twice"),
        Route(question_id="q3", experts=[]),
    ]
    ids = [r.question_id for r in routes]
    table = RouteTable.of(ids, names, routes)
    assert list(table) == routes and table[1:3] == routes[1:3] and table[-1] == routes[-1]
    assert RouteTable.concat(ids, [RouteTable.of(ids[:1], names, routes[:1]),
                                   RouteTable.of(ids[1:], names, routes[1:])])[:] == routes
    assert table.mask().tolist() == [[True, True, False, False], [False, False, False, True],
                                     [True, False, True, False], [False] * 4]
    assert table.counts().tolist() == [2, 1, 1, 1]  # c once for q2, though named twice
    with pytest.raises(KeyError):
        RouteTable.of(ids, ["a"], routes)


def test_response_table_gives_back_the_responses():
    qs = [Question(id="n", question="How many?", answer="12"),
          Question(id="m", question="Which?", choices=["x", "y", "z"], answer="B")]
    gens = {(0, 0): Generation(text="so... Answer: 12.0", prompt_tokens=5, seconds=0.123456),
            (0, 1): Generation(error="boom"),
            (1, 0): Generation(text="cut", finish_reason="length", truncated_by="context",
                               completion_tokens=9, cached=True),
            (1, 1): Generation(text="(b)", recorded_answer="b", has_recorded_answer=True,
                               finish_reason="weird")}
    for keep in (False, True):
        t = ResponseTable(qs, ["e0", "e1"], ["12", "B"], keep_text=keep)
        cells = list(gens)
        t.fill([i for i, _ in cells], [j for _, j in cells], [gens[c] for c in cells])
        for (i, j), g in gens.items():
            want = response_from(["e0", "e1"][j], g, qs[i])
            assert t.response(i, j) == (want if keep or g.error else
                                        want.model_copy(update={"text": ""}))
        assert t.right.tolist() == [[1, -1], [0, 1]] and t.failed.tolist() == [[0, 1], [0, 0]]
        assert list(t) == [("n", "e0"), ("n", "e1"), ("m", "e0"), ("m", "e1")] and len(t) == 4
        assert t[("m", "e1")].answer == "B" and t.get(("m", "nobody")) is None
        assert ("x", "e0") not in t


# -- the evaluation job -------------------------------------------------------------------------

HELD = (ExpertResponse, Generation, GenRequest, Route, Recruit, FinalAnswer)


def _alive() -> Counter:
    gc.collect()
    return Counter(type(o).__name__ for o in gc.get_objects() if isinstance(o, HELD))


def test_result_holds_arrays_not_objects_and_no_text_voting_never_reads(tmp_path):
    cfg, test, val = make_pool(tmp_path)
    before = _alive()
    r = job(cfg, test, val)
    assert len(r.scores) == 10 and r.stats.generations == 48
    # no response, generation, request, route or final answer is kept per question...
    assert _alive() - before == Counter()
    # ...nor any text: vote and single read the extracted answers only
    assert r.responses.texts is None and r.val_responses.texts is None
    assert {x.text for x in r.responses.values()} == {""}
    assert r.responses[("q0", "a")].answer == "A"
    assert gc.get_freeze_count() == 0  # the job's gc.freeze is undone
    # --record keeps the texts, to write them
    kept, _, _ = run_eval_job(test, cfg, out_dir=None, validation=val, cache=False,
                              record_dir=tmp_path / "rec")
    assert kept.responses[("q0", "a")].text == "Thinking... The answer is (A)."


def test_expert_phase_gives_one_model_at_a_time_in_bounded_runs(tmp_path, monkeypatch):
    cfg, test, val = make_pool(tmp_path)
    logs: tuple[list, list] = ([], [])
    whole = job(cfg, test, val, log=logs[0].append)
    runs = []
    real = LocalExecutor.run

    def spy(self, requests, plan=None, on_token=None):
        runs.append((len(requests), {r.expert for r in requests},
                     {r.prompt for r in requests} | {r.messages for r in requests}))
        return real(self, requests, plan, on_token)

    monkeypatch.setattr(LocalExecutor, "run", spy)
    monkeypatch.setattr(pipeline_generate, "CHUNK", 5)
    monkeypatch.setattr(pipeline_route, "ROUTE_BLOCK", 3)
    chunked = job(cfg, test, val, log=logs[1].append)
    # 4 experts x (8 test + 4 validation) cells: 3 runs of at most 5 requests per expert,
    # each run one expert's; a replay is sent no prompt to build
    assert sorted(n for n, _, _ in runs) == [2] * 4 + [5] * 8
    assert all(len(experts) == 1 for _, experts, _ in runs)
    assert all(prompts == {None} for _, _, prompts in runs)
    # no load more, and the same figures
    assert chunked.stats.loads == whole.stats.loads == 4
    summary = "[experts] 48 generation requests (0 duplicates), 0 cached; 4 model loads " \
              "(naive per-question order: 48)"
    assert summary in logs[0] and summary in logs[1]
    assert [p.to_json() | {"seconds": 0} for p in chunked.phases] == \
           [p.to_json() | {"seconds": 0} for p in whole.phases]
    assert [s.to_json() | {"route_seconds": 0} for s in chunked.scores] == \
           [s.to_json() | {"route_seconds": 0} for s in whole.scores]


def _score_by_definition(name, outcomes, config) -> StrategyScore:
    """A strategy's totals added up outcome by outcome, as the definition reads (and as
    earlier versions computed them): the reference for the arrays' totals."""
    s = StrategyScore(name=name, description="")
    for o in outcomes:
        s.questions += 1
        s.usage.update(dict.fromkeys(o.recruited, 1))
        if o.aggregator is not None:
            s.aggregator_usage[o.aggregator.expert] += 1
        if o.failed:
            s.failed_questions += 1
        elif o.correct is not None:
            s.overall.add(o.correct)
            s.per_category.setdefault(o.category or NO_CATEGORY, Accuracy()).add(o.correct)
            if o.any_right is not None:
                s.recruit_oracle.add(o.any_right)
        if o.answer is None:
            s.unanswered += 1
        seen: set[str] = set()
        gens = [(r, False) for r in o.used] + ([(o.aggregator, True)] if o.aggregator else [])
        s.max_generations = max(s.max_generations, len(gens))  # failed ones included
        for r, is_aggregator in gens:
            if r.error is not None:
                s.failed += 1
                continue
            s.generations += 1
            s.prompt_tokens += r.prompt_tokens
            s.completion_tokens += r.completion_tokens
            s.gen_seconds += r.seconds
            price = config.expert(r.expert).price
            s.cost += (r.prompt_tokens * price.input_per_mtok
                       + r.completion_tokens * price.output_per_mtok) / 1e6
            if r.expert in seen and not is_aggregator:
                continue
            seen.add(r.expert)
            params = config.expert(r.expert).params
            if params is None:
                s.params_known = False
            else:
                s.active_params += params
    return s


def test_totals_from_the_arrays_are_the_outcome_by_outcome_sums(tmp_path, scripted,  # noqa: F811
                                                                monkeypatch):
    """Failures, truncation, a judge with its own prices, an expert named twice in a route,
    an expert with no ``params``, odd seconds: every total of every strategy, to the last
    digit of every float."""
    records = [{"id": f"{p}{i}", "text": f"The answer is ({'ABCD'[i % 4]}).",
                "prompt_tokens": 7 * i + 1, "completion_tokens": 3, "seconds": 0.1 * i + 0.07,
                **({"finish_reason": "length"} if i % 3 == 0 else {})}
               for p in "qv" for i in range(6)]  # answers q6, q7: fails there
    write_jsonl(tmp_path / "odd.jsonl", records)
    cfg, test, val = make_pool(tmp_path, extra_experts=[
        JUDGE, {"name": "odd", "backend": "replay", "model": "odd.jsonl",
                "price": {"input_per_mtok": 0.3, "output_per_mtok": 1.7}}],
        aggregator={"kind": "llm", "expert": "judge"})

    real = strategy_routes.build_router

    class Twice(Router):  # names c twice: counted once in usage and params, twice in tokens
        def route(self, questions):
            return [Route(question_id=q.id, experts=[Recruit(name="c"), Recruit(name="odd"),
                                                     Recruit(name="c", weight=0.5)])
                    for q in questions]

    monkeypatch.setattr(strategy_routes, "build_router", lambda kind, c, ex, k:
                        Twice() if kind == "skill" else real(kind, c, ex, k))
    r = job(cfg, test, val, strategies="*")
    config = load_config(cfg)
    assert {"skill+vote", "skill+llm", "all+llm", "oracle", "best-single"} <= \
        {s.name for s in r.scores}
    for s in r.scores:
        want = _score_by_definition(s.name, list(r.outcomes[s.name]), config)
        got = s.to_json()
        want_json = want.to_json() | {k: got[k] for k in
                                      ("description", "route_seconds", "recruit_oracle")}
        assert got == want_json, s.name
    assert r.score("single:odd").failed_questions == 2 and r.score("skill+llm").aggregator_usage


def test_outcomes_file_rows_are_the_outcomes(tmp_path, scripted):  # noqa: F811
    cfg, test, val = make_pool(tmp_path, extra_experts=[JUDGE],
                               aggregator={"kind": "llm", "expert": "judge"})
    r, _, _ = run_eval_job(test, cfg, out_dir=tmp_path / "rep", validation=val, plots=False,
                           cache=False)
    rows = [json.loads(line) for line in (tmp_path / "rep" / "outcomes.jsonl").open()]
    assert [row["id"] for row in rows] == [q.id for q in r.questions]
    for i, row in enumerate(rows):
        assert row["category"] == r.questions[i].category
        assert row["strategies"] == {name: {
            "answer": o.answer, "correct": o.correct, "failed": o.failed,
            "experts": o.recruited,
            "truncated": any(x.truncated for x in o.used) or bool(o.aggregator and
                                                                    o.aggregator.truncated)}
            for name, outs in r.outcomes.items() for o in [outs[i]]}
    assert r.outcomes["all+llm"][0].aggregator.expert == "judge"
    assert r.responses.texts  # an llm aggregator reads the texts: they are kept


def test_record_and_report_of_a_pool_written_again(tmp_path):
    """The replay files ``--record`` streams out re-score exactly, and a replay pool's
    outcomes.jsonl is the same whoever wrote the records."""
    cfg, test, val = make_pool(tmp_path)
    first, _, _ = run_eval_job(test, cfg, out_dir=tmp_path / "a", validation=val, cache=False,
                               record_dir=tmp_path / "rec", plots=False)
    again, _, _ = run_eval_job(test, tmp_path / "rec" / "experts.yaml", out_dir=tmp_path / "b",
                               validation=val, cache=False, plots=False)
    assert (tmp_path / "a" / "outcomes.jsonl").read_text() == \
        (tmp_path / "b" / "outcomes.jsonl").read_text()
    pool = yaml.safe_load((tmp_path / "rec" / "experts.yaml").read_text())
    assert [e["name"] for e in pool["experts"]] == ["a", "b", "c", "d"]
    assert [s.to_json()["accuracy"] for s in again.scores] == \
        [s.to_json()["accuracy"] for s in first.scores]


def test_aggregators_get_the_routes_and_responses_the_strategies_define(tmp_path,
                                                                        monkeypatch):
    """What an aggregator is handed, a block of questions at a time, is what the strategy
    defines: rebuilt from the tables, equal to the routes and responses made directly."""
    from coe.aggregation.single import SingleAggregator
    from coe.aggregation.vote import VoteAggregator
    from coe.apps.api import Orchestrator
    from coe.apps.eval.strategies import random_routes
    from coe.io.questions import load_questions
    from coe.routing import build_router
    from coe.text.prompts import build_request

    calls: dict[int, list] = {}  # aggregator (one per strategy) -> its calls

    def spy(cls):
        real = cls.aggregate

        def aggregate(self, questions, routes, responses, generations=None):
            calls.setdefault(id(self), []).append((questions, routes, responses))
            return real(self, questions, routes, responses, generations)
        monkeypatch.setattr(cls, "aggregate", aggregate)

    spy(VoteAggregator)
    spy(SingleAggregator)
    monkeypatch.setattr(pipeline_aggregate, "BLOCK", 3)
    cfg, test, val = make_pool(tmp_path)
    job(cfg, test, val, strategies="single:b,random3+vote,category+vote")
    qs = load_questions(test).questions
    config = load_config(cfg)
    with Orchestrator(config, cache=False) as orch:
        want = {"single": [Route(question_id=q.id, experts=[Recruit(name="b")],
                                 confidence=1.0, reason="single expert") for q in qs],
                "random": random_routes(qs, ["a", "b", "c", "d"], 3, 0),
                "category": build_router("category", config, orch.executor, None).route(qs)}
        pairs = [(q, e) for q in qs for e in config.experts]
        gens = orch.executor.run([build_request(e, q) for q, e in pairs]).generations
    direct = {(q.id, e.name): response_from(e.name, g, q) for (q, e), g in zip(pairs, gens)}
    assert len(calls) == 3
    got = []
    for blocks in calls.values():
        assert [len(questions) for questions, _, _ in blocks] == [3, 3, 2]
        got.append([r for _, routes, _ in blocks for r in routes])
        for questions, routes, responses in blocks:
            for q, r, resp in zip(questions, routes, responses):
                assert resp == [direct[(q.id, n)].model_copy(update={"text": ""})
                                for n in r.names]
    assert sorted(got, key=repr) == sorted(want.values(), key=repr)
