"""The pipeline's stages on replay experts and a scripted generating backend, without a model:
route -> generate -> cascade -> aggregate, for one part or several sharing a batch."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from coe.aggregation import build_aggregator
from coe.core.config import load_config
from coe.core.types import Question, Recruit, Route
from coe.execution import build_executor
from coe.pipeline import flow
from coe.pipeline.generate import Cells, Generator
from coe.pipeline.responses import ResponseTable
from coe.pipeline.route import route
from coe.routing import Router, build_router
from coe.text.answers import gold_answer
from tests.apps.eval.test_eval import ANSWERS, GOLD, JUDGE, make_pool, scripted  # noqa: F401
from tests.conftest import write_jsonl


def questions(n: int = 8) -> list[Question]:
    cats = ["math", "bio"] * 4
    return [Question(id=f"q{i}", question=f"Test question {i}?", choices=["w", "x", "y", "z"],
                     answer=GOLD[i], category=cats[i]) for i in range(n)]


def composition(cfg, router="all", aggregator="vote", kind="compose", executor=None):
    return flow.Composition(f"{router}+{aggregator}", build_router(router, cfg, executor),
                            build_aggregator(aggregator, cfg), kind)


def test_one_part_routes_generates_and_votes(tmp_path):
    cfg = load_config(make_pool(tmp_path)[0])
    ex = build_executor(cfg)
    with ex.session() as stats:
        done = flow.answer(ex, cfg, [flow.Part(composition(cfg), questions())])
    results = done.results[0]
    # all four vote; ties go to the strongest: q0 A A B B -> A (a stronger)
    assert [r.final_answer for r in results][:2] == ["A", "B"]
    assert [x.expert for x in results[0].responses] == list(ANSWERS)
    assert results[0].responses[0].text == "Thinking... The answer is (A)."
    assert stats.generations == 8 * 4 and stats.loads == 4
    assert done.plan.loads == 4 and len(done.plan.requests) == 32


def test_parts_of_a_batch_share_one_plan_and_deduplicate(tmp_path):
    """Two compositions over overlapping requests: one plan, a generation asked twice made once,
    each part answered with its own aggregator."""
    cfg = load_config(make_pool(tmp_path)[0])
    ex = build_executor(cfg)
    qs = questions()
    parts = [flow.Part(composition(cfg, "all", "vote"), qs[:4]),
             flow.Part(composition(cfg, "category", "single"), qs[2:])]
    plans = []
    done = flow.answer(ex, cfg, parts, on_plan=plans.append)
    assert len(plans) == 1
    plan = plans[0]
    # all: 4 x 4 cells; category: 6 x 2; q2, q3 asked of their two category experts twice
    assert len(plan.requests) == 16 + 12 and len(plan.same_as) == 4
    assert [len(r) for r in done.results] == [4, 6]
    # category+single: the top-weighted recruit's answer (math: b, bio: c)
    assert [r.final_answer for r in done.results[1]] == \
        [ANSWERS["b" if i % 2 == 0 else "c"][i] for i in range(2, 8)]
    assert all(r.aggregator == "single" for r in done.results[1])


def test_given_routes_are_used_and_a_failed_recruit_is_named(tmp_path):
    cfg = load_config(make_pool(tmp_path)[0])
    ex = build_executor(cfg)
    qs = questions(2) + [Question(id="unknown", question="Not recorded?")]
    routes = [Route(question_id=q.id, experts=[Recruit(name="d"), Recruit(name="a")])
              for q in qs]
    done = flow.answer(ex, cfg, [flow.Part(composition(cfg), qs, routes)])
    r = done.results[0]
    assert [x.expert for x in r[0].responses] == ["d", "a"]
    assert "no recorded response" in r[2].route.failed["d"]
    assert r[2].final_answer is None


def test_the_llm_aggregator_generates_once_for_every_part(tmp_path, scripted):  # noqa: F811
    cfg = load_config(make_pool(tmp_path, extra_experts=[JUDGE],
                                aggregator={"kind": "llm", "expert": "judge"})[0])
    ex = build_executor(cfg)
    qs = questions()
    parts = [flow.Part(composition(cfg, "category", "llm"), qs[:4]),
             flow.Part(composition(cfg, "category", "llm"), qs[4:])]
    with ex.session() as stats:
        done = flow.answer(ex, cfg, parts)
    assert sum(1 for c in scripted if c[2] == "aggregate") == 8
    # judge: the last response it is shown (math: [b, a] -> a; bio: [c, d] -> d)
    assert [r.final_answer for p in done.results for r in p] == \
        [ANSWERS["a" if i % 2 == 0 else "d"][i] for i in range(8)]
    assert all(r.aggregator == "llm:judge" for p in done.results for r in p)
    assert stats.loads == 5  # four replays and the judge, each once


def test_a_proxy_part_streams_its_experts_tokens(tmp_path):
    """A pass-through asks its expert with the request as it came, and its tokens stream (a
    scripted streaming backend)."""
    from coe.backends.base import Backend, Capabilities, Generation

    class Echo(Backend):
        capabilities = Capabilities(holds_weights=False, stream=True)
        seen: list = []

        def load(self):
            pass

        def unload(self):
            pass

        def generate(self, requests, on_result, on_token=None):
            for i, r in enumerate(requests):
                Echo.seen.append(r)
                text = " | ".join(m.text for m in r.messages)
                if on_token is not None:
                    for piece in text.split(" "):
                        on_token(i, piece + " ")
                on_result(i, Generation(text=text))

    from coe.core.registry import BACKENDS

    BACKENDS.register("echo-stream", Echo, replace=True)
    cfg_path = tmp_path / "pool.yaml"
    cfg_path.write_text(yaml.safe_dump({"experts": [
        {"name": "echo", "backend": "echo-stream", "model": "x", "system_prompt": "Be echo."}]}))
    cfg = load_config(cfg_path)
    ex = build_executor(cfg, cache=None)
    conv = Question(id="c1", messages=[
        {"role": "system", "content": "Reply in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "How are you?"}])

    class One(Router):
        def route(self, qs):
            return [Route(question_id=q.id, experts=[Recruit(name="echo")]) for q in qs]

    pieces: list = []
    comp = flow.Composition("echo", One(), build_aggregator("single", cfg), "proxy")
    done = flow.answer(ex, cfg, [flow.Part(comp, [conv])],
                       on_token=lambda part, pos, piece: pieces.append((part, pos, piece)))
    sent = Echo.seen[-1]
    assert [(m.role, m.content) for m in sent.messages] == [
        ("system", "Be echo."), ("system", "Reply in French."), ("user", "Hello"),
        ("assistant", "Bonjour"), ("user", "How are you?")]
    text = done.results[0][0].responses[0].text
    assert "".join(p for _, _, p in pieces).strip() == text
    assert {(part, pos) for part, pos, _ in pieces} == {(0, 0)}
    BACKENDS.unregister("echo-stream")


def test_a_request_an_expert_cannot_honour_is_refused_per_cell(tmp_path):
    """Tools sent to a replay: the cell is not sent, its generation fails naming what."""
    cfg = load_config(make_pool(tmp_path)[0])
    ex = build_executor(cfg)
    q = Question(id="q0", question="Weather?", tools=[
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}])
    r = flow.answer(ex, cfg, [flow.Part(composition(cfg), [q])]).results[0][0]
    assert r.route.failed == {n: f"expert {n!r} (backend replay) cannot honour tools"
                              for n in ANSWERS}


def test_whole_and_staged_generation_fill_the_same_table(tmp_path):
    cfg = load_config(make_pool(tmp_path)[0])
    qs = questions()
    names = [e.name for e in cfg.experts]
    tables = []
    for whole in (True, False):
        ex = build_executor(cfg)
        table = ResponseTable(qs, names, [gold_answer(q) for q in qs])
        routes, _ = route(build_router("category", cfg, ex), qs, names)
        Generator(ex, cfg).generate([Cells(table, routes.mask())], whole=whole)
        tables.append(table)
    for a in ("has", "right", "failed"):
        assert np.array_equal(getattr(tables[0], a), getattr(tables[1], a))
    answers = [[[t.answers.value(c) for c in row] for row in t.answer.tolist()] for t in tables]
    assert answers[0] == answers[1]


def test_a_cascade_asks_more_only_where_unsure(tmp_path):
    """A router whose cascade stops once two recruits agree: rounds of one generate call."""
    cfg = load_config(make_pool(tmp_path)[0])
    ex = build_executor(cfg)

    class AgreeTwice:
        max_experts = 4

        def describe(self):
            return "until two agree"

        def open_questions(self, questions, asked, recruits, responses):
            return [i for i, rs in enumerate(responses)
                    if len({r.answer for r in rs}) == len(rs)]  # no two agree yet

    class Cascading(Router):
        cascade = AgreeTwice()

        def route(self, qs):
            return [Route(question_id=q.id, experts=[Recruit(name=n) for n in "abcd"])
                    for q in qs]

    comp = flow.Composition("c", Cascading(), build_aggregator("vote", cfg))
    with ex.session() as stats:
        done = flow.answer(ex, cfg, [flow.Part(comp, questions())])
    asked = [len(r.responses) for r in done.results[0]]
    # q0: a A, b A -> agree at 2; q1: a B, b C, c B -> 3; q7: A A -> 2 ...
    expected = []
    for i in range(8):
        seen = []
        for n in "abcd":
            seen.append(ANSWERS[n][i])
            if len(set(seen)) < len(seen):
                break
        expected.append(len(seen))
    assert asked == expected
    assert stats.generations == sum(expected)
    assert all(f"cascade: asked {k} of 4" in r.route.reason
               for k, r in zip(expected, done.results[0]))


def test_plan_shows_the_first_round_without_generating(tmp_path):
    cfg = load_config(make_pool(tmp_path)[0])
    ex = build_executor(cfg)
    with ex.session() as stats:
        routes, plan = flow.plan(ex, cfg, [flow.Part(composition(cfg, "category"), questions())])
    assert stats.generations == 0 and stats.loads == 0
    assert len(plan.requests) == 16 and plan.loads == 4
    assert routes[0][0].names == ["b", "a"]


@pytest.mark.parametrize("n", [0, 3])
def test_empty_and_small_batches(tmp_path, n):
    path, _, _ = make_pool(tmp_path)
    cfg = load_config(path)
    write_jsonl(tmp_path / "unused.jsonl", [])
    done = flow.answer(build_executor(cfg), cfg, [flow.Part(composition(cfg), questions(n))])
    assert len(done.results[0]) == n
