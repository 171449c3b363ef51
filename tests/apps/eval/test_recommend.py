"""``coe eval``'s paired comparisons with best-single, its recommendation and recommended.yaml.

The pools are tiny replay pools in tmp dirs whose answers are designed so the verdicts are
known: on the validation questions the *category* experts (b for math, c for bio) are right
everywhere in their category, while the generalist a, best alone, is right on 7 of 12 in
each: category@1 (one generation a question) beats best-single (a) on 10 questions and loses
on none, McNemar p = 2 x 0.5^10 = 0.002, Holm-corrected below 0.05.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.stats import binomtest

from coe.apps.api import Orchestrator
from coe.apps.eval.compare import compare, holm
from coe.apps.eval.job import run_eval_job
from coe.apps.eval.recommend import recommended_pool
from coe.apps.eval.runner import EvalOptions, EvaluationJob
from coe.apps.eval.strategies import StrategySpec
from coe.core.config import load_config
from coe.io.questions import load_questions
from tests.apps.eval.test_eval import JUDGE, coe, make_pool, scripted  # noqa: F401 (a fixture)
from tests.conftest import write_jsonl

N = 12  # questions per category in each set

# expert -> (validation letters, test letters); gold is A everywhere; questions 0..11 math,
# 12..23 bio. Wrong letters differ by expert, so wrong answers never outvote a right one.
A_RIGHT = "A" * 7 + "B" * 5  # a: 7 of 12 right in each category
HONEST = {
    "a": (A_RIGHT * 2, A_RIGHT * 2),
    "b": ("A" * N + "D" * N, "A" * N + "D" * N),  # math expert
    "c": ("C" * N + "A" * N, "C" * N + "A" * N),  # bio expert
}
# the category experts are no better than a on validation, perfect on the test
LUCKY = {
    "a": (A_RIGHT * 2, A_RIGHT * 2),
    "b": (A_RIGHT.replace("B", "D") + "D" * N, "A" * N + "D" * N),
    "c": ("C" * N + A_RIGHT.replace("B", "C"), "C" * N + "A" * N),
}


def designed_pool(folder: Path, answers: dict[str, tuple[str, str]],
                  test_ids: range = range(2 * N)) -> tuple[Path, Path, Path]:
    """(experts.yaml, test questions, validation questions) of a pool of replay experts with
    no yaml strengths (vote ties go to validation accuracy, as the eval measured it)."""
    (folder / "replay").mkdir(parents=True, exist_ok=True)

    def questions(prefix: str, ids) -> list[dict]:
        return [{"id": f"{prefix}{i}", "question": f"{prefix} question {i}?",
                 "choices": ["w", "x", "y", "z"], "answer": "A",
                 "category": "math" if i < N else "bio"} for i in ids]

    val, test = questions("v", range(2 * N)), questions("t", test_ids)
    experts = []
    for name, (v_letters, t_letters) in answers.items():
        recs = [{"id": q["id"], "text": f"So the answer is ({letters[int(q['id'][1:])]})."}
                for qs, letters in ((val, v_letters), (test, t_letters)) for q in qs]
        write_jsonl(folder / "replay" / f"{name}.jsonl", recs)
        experts.append({"name": name, "backend": "replay", "model": f"replay/{name}.jsonl",
                        "params": 7.0})
    pool = {"experts": experts,
            "categories": {"math": {"experts": ["b", "a"]}, "bio": {"experts": ["c", "a"]}},
            "router": {"kind": "category", "k": 2, "threshold": 0.0}}
    cfg = folder / "experts.yaml"
    cfg.write_text(yaml.safe_dump(pool))
    return (cfg, write_jsonl(folder / "test.jsonl", test),
            write_jsonl(folder / "val.jsonl", val))


STRATEGIES = "single:*,best-single,all+vote,category+vote,category@1,random2+vote,oracle"


def evaluate_job(cfg, test, val, **kw) -> EvaluationJob:
    opts = EvalOptions(validation=load_questions(val).questions, cache=False,
                       strategies=STRATEGIES, random_k=2, **kw)
    job = EvaluationJob(load_config(cfg), load_questions(test).questions, opts)
    job.result = job.run()
    return job


# -- the statistics ------------------------------------------------------------------------

def test_paired_comparison_by_hand():
    # 20 questions: both right on 8, only the strategy on 7, only the reference on 1,
    # neither on 2; two more the reference cannot be graded on
    right = np.array([1] * 8 + [1] * 7 + [0] * 1 + [0] * 2 + [1, 0], bool)
    ref = np.array([1] * 8 + [0] * 7 + [1] * 1 + [0] * 2 + [0, 0], bool)
    graded = np.ones(20, bool)
    ref_graded = np.array([True] * 18 + [False] * 2)
    c = compare(right, graded, ref, ref_graded, seed=3)
    assert (c.n, c.left_out, c.only_strategy, c.only_reference) == (18, 2, 7, 1)
    assert c.diff == pytest.approx(6 / 18) and c.accuracy == pytest.approx(15 / 18)
    # McNemar's exact test is the binomial test on the 8 discordant questions
    assert c.p == pytest.approx(binomtest(1, 8, 0.5).pvalue)
    assert c.ci[0] < c.diff < c.ci[1] and c.ci[0] > 0  # every resample keeps 7 vs 1 > 0 ...
    assert c == compare(right, graded, ref, ref_graded, seed=3)  # seeded
    # identical answers: no difference, nothing to resample
    same = compare(ref, ref_graded, ref, ref_graded)
    assert (same.diff, same.ci, same.p) == (0.0, (0.0, 0.0), 1.0)
    # nothing graded in common
    none = compare(right, ~graded, ref, ref_graded)
    assert none.n == 0 and none.diff is None and none.left_out == 18


def test_holm_correction_sets_the_verdicts():
    base = compare(np.ones(10, bool), np.ones(10, bool), np.zeros(10, bool), np.ones(10, bool))
    worse = compare(np.zeros(10, bool), np.ones(10, bool), np.ones(10, bool), np.ones(10, bool))
    weak = compare(np.array([1] * 6 + [0] * 4, bool), np.ones(10, bool),
                   np.array([1] * 1 + [0] * 9, bool), np.ones(10, bool))
    assert base.p == worse.p == pytest.approx(2 * 0.5 ** 10) and weak.p == pytest.approx(0.0625)
    got = holm({"base": base, "worse": worse, "weak": weak})
    # Holm: the smallest p times 3, the next times 2, the last times 1
    assert got["base"].p_holm == pytest.approx(3 * base.p)
    assert got["worse"].p_holm == pytest.approx(3 * base.p)  # monotone: max with the one before
    assert got["weak"].p_holm == pytest.approx(0.0625)
    assert [got[n].verdict for n in ("base", "worse", "weak")] == ["better", "worse", ""]


# -- validation scores, comparisons, recommendation --------------------------------------------

def test_every_strategy_is_scored_on_validation_with_no_more_expert_generations(tmp_path):
    cfg, test, val = designed_pool(tmp_path, HONEST)
    job = evaluate_job(cfg, test, val)
    r = job.result
    # every expert on every validation question (for best-single) and the test union: no more
    assert [(p.name, p.unique) for p in r.phases] == [("experts", 3 * 24 + 3 * 24)]
    v = {s.name: (s.overall.correct, s.overall.n) for s in r.val_scores}
    assert r.best_single == "a" and v["best-single"] == v["single:a"] == (14, 24)
    assert v["category@1"] == v["category+vote"] == (24, 24) and v["oracle"] == (24, 24)
    assert v["single:b"] == v["single:c"] == (12, 24)
    cv = r.comparisons["validation"]["category@1"]
    assert (cv.only_strategy, cv.only_reference) == (10, 0)
    assert cv.p == pytest.approx(2 * 0.5 ** 10) and cv.verdict == "better"
    assert "best-single" not in r.comparisons["validation"]
    # the single expert identical to best-single: no difference
    assert r.comparisons["test"]["single:a"].diff == 0.0
    # the cheapest significantly better strategy (1 generation a question) is recommended
    rec = r.recommendation
    assert rec.strategy == "category@1" and rec.generations == 1.0
    assert rec.candidates[0] == "category@1" and "category+vote" in rec.candidates
    assert set(rec.not_recommendable) == {"oracle", "random2+vote"}
    pool = r.recommended_pool
    assert pool["router"] == {"kind": "category", "k": 1, "threshold": 0.0}
    assert pool["aggregator"]["kind"] == "vote"


def test_a_strategy_better_only_on_test_is_not_recommended(tmp_path):
    cfg, test, val = designed_pool(tmp_path, LUCKY)
    r = evaluate_job(cfg, test, val).result
    assert r.comparisons["test"]["category@1"].verdict == "better"  # +10 of 24 on the test
    assert r.comparisons["validation"]["category@1"].verdict == ""
    assert r.recommendation.strategy == "best-single" and r.recommendation.candidates == []
    # best-single's pool: only a, recruited by the all router
    pool = r.recommended_pool
    assert [e["name"] for e in pool["experts"]] == ["a"] and pool["router"] == {"kind": "all"}
    assert "categories" not in pool


def test_the_test_half_cannot_leak_into_the_recommendation(tmp_path):
    cfg, test, val = designed_pool(tmp_path / "pool", HONEST)
    first, _, _ = run_eval_job(test, cfg, out_dir=tmp_path / "one", validation=val,
                               cache=False, strategies=STRATEGIES, random_k=2, plots=False)
    # the same pool files, the same validation answers; the test half's answers changed (c
    # now wrong on every bio test question) and half of its questions dropped
    changed = {**HONEST, "c": (HONEST["c"][0], "C" * 24)}
    designed_pool(tmp_path / "pool", changed, test_ids=range(6, 18))
    second, _, _ = run_eval_job(test, cfg, out_dir=tmp_path / "two", validation=val,
                                cache=False, strategies=STRATEGIES, random_k=2, plots=False)
    assert first.score("category@1").overall.value == 1.0
    assert second.score("category@1").overall.value == 0.5  # the test figures did change
    assert len(second.questions) == 12
    assert second.recommendation == first.recommendation
    assert ((tmp_path / "two" / "recommended.yaml").read_text()
            == (tmp_path / "one" / "recommended.yaml").read_text())
    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert one["recommendation"] == two["recommendation"]
    assert one["comparison"]["validation"] == two["comparison"]["validation"]
    assert one["comparison"]["test"] != two["comparison"]["test"]


# -- recommended.yaml ----------------------------------------------------------------------------

def _answers_of(config_path: Path, questions) -> list[str | None]:
    with Orchestrator.from_yaml(config_path, cache=False) as orch:
        return [r.final_answer for r in orch.run(questions).results]


def test_each_strategy_as_yaml_answers_as_it_did_in_the_eval(tmp_path):
    """Every deployable strategy's pool yaml, run with ``Orchestrator``, gives the answers the
    evaluation gave it, vote ties included (broken by strengths measured on validation, which
    the yaml now carries)."""
    cfg, test, val = designed_pool(tmp_path / "pool", HONEST)
    job = evaluate_job(cfg, test, val)
    r = job.result
    questions = load_questions(test).questions
    assert "validation" in set(r.strength_source.values())
    checked = 0
    for spec in r.specs:
        if spec.kind in ("oracle", "random"):
            continue
        one = ([r.best_single] if spec.kind == "best-single"
               else [spec.expert] if spec.expert else None)
        raw = recommended_pool(job.config, spec, k=job.router_k.get(spec.name), experts=one,
                               strength=job.strength)
        path = tmp_path / "yamls" / f"{spec.name.replace(':', '_')}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        want = [o.answer for o in r.outcomes[spec.name]]
        assert _answers_of(path, questions) == want, spec.name
        checked += 1
    assert checked == 7  # 3 singles, best-single, all+vote, category+vote, category@1
    # all+vote has 3-way ties (a B, b A, c C on math questions 7-11) that strength decides
    raw = recommended_pool(job.config, next(s for s in r.specs if s.name == "all+vote"),
                           k=None, strength=job.strength)
    assert raw["router"] == {"kind": "all", "threshold": 0.0}
    assert {e["name"]: e["strength"] for e in raw["experts"]} == {
        "a": pytest.approx(14 / 24), "b": 0.5, "c": 0.5}


def test_recommended_yaml_runs_with_coe_run_from_elsewhere(tmp_path):
    cfg, test, val = designed_pool(tmp_path / "pool", HONEST)
    out = tmp_path / "report"
    p = coe("eval", test, "-c", cfg, "--validation", val, "-o", out, "-q", "--no-plots",
            "-s", STRATEGIES, "--random-k", "2")
    assert p.returncode == 0, p.stderr
    assert "recommended (chosen on validation): category@1" in p.stderr
    assert "| category@1 (recommended) | 1.00 (1) | 100.0 | +41.7 [" in p.stdout
    md = (out / "report.md").read_text()
    assert "## Recommendation" in md and "## Paired comparison with best-single" in md
    rec = out / "recommended.yaml"
    config = load_config(rec)  # loads; paths absolute
    assert config.router.kind == "category" and config.router.k == 1
    assert all(Path(e.model).is_absolute() for e in config.experts)
    answers = tmp_path / "answers.jsonl"
    run = coe("run", test, "-c", rec, "-o", answers, "-q", "--no-cache")
    assert run.returncode == 0, run.stderr
    got = [json.loads(x)["final_answer"] for x in answers.read_text().splitlines()]
    want = [json.loads(x)["strategies"]["category@1"]["answer"]
            for x in (out / "outcomes.jsonl").read_text().splitlines()]
    assert got == want and len(got) == 24


@dataclass
class BudgetSpec(StrategySpec):
    """A strategy carrying a router field of its own (as a cascade's budget would)."""

    threshold: float | None = None


def test_extra_strategy_fields_map_to_router_fields_and_paths_become_absolute(tmp_path):
    cfg, _, _ = designed_pool(tmp_path, HONEST)
    raw = yaml.safe_load(cfg.read_text())
    raw["router"].update(model_file="router.joblib", profiles="sub/profiles.json")
    raw["embeddings"] = {"model": "static:models/minilm"}
    raw["cache"] = "responses.sqlite"
    cfg.write_text(yaml.safe_dump(raw))
    config = load_config(cfg)
    spec = BudgetSpec("category+vote", "router", "", router="category", aggregator="vote",
                      threshold=0.25)
    pool = recommended_pool(config, spec, k=2)
    assert pool["router"]["threshold"] == 0.25 and pool["router"]["k"] == 2
    assert pool["router"]["model_file"] == str((tmp_path / "router.joblib").resolve())
    assert pool["router"]["profiles"] == str((tmp_path / "sub/profiles.json").resolve())
    assert pool["embeddings"]["model"] == "static:" + str((tmp_path / "models/minilm").resolve())
    assert pool["cache"] == str((tmp_path / "responses.sqlite").resolve())
    assert pool["experts"][0]["model"] == str((tmp_path / "replay/a.jsonl").resolve())
    assert load_config(cfg).router.kind == "category"  # the pool itself is untouched


# -- a router trained on the validation questions ------------------------------------------------

def _fake_skill_router(monkeypatch, cross_fitted: bool, reads_profiles: bool = True):
    """A "skill" router that recruits b when the yaml names profiles (its trained file),
    else c."""
    import coe.apps.eval.strategy_routes as runner
    from coe.routing import Recruit, Route, Router

    class Trained(Router):
        name = "skill"

        def __init__(self, config):
            self.pick = "b" if config.router.profiles and reads_profiles else "c"

        def route(self, questions):
            return [Route(question_id=q.id, experts=[Recruit(name=self.pick)]) for q in questions]

    Trained.cross_fitted = cross_fitted
    real = runner.build_router
    monkeypatch.setattr(runner, "build_router", lambda kind, cfg, ex, k:
                        Trained(cfg) if kind == "skill" else real(kind, cfg, ex, k))


@pytest.mark.parametrize("cross_fitted,reads,noted", [(False, True, True), (True, True, False),
                                                      (False, False, False)])
def test_a_router_trained_in_sample_is_noted(tmp_path, monkeypatch, cross_fitted, reads, noted):
    _fake_skill_router(monkeypatch, cross_fitted, reads)
    cfg, test, val = designed_pool(tmp_path, HONEST)
    raw = yaml.safe_load(cfg.read_text())
    raw["router"]["profiles"] = "profiles.json"
    cfg.write_text(yaml.safe_dump(raw))
    r = run_eval_job(test, cfg, out_dir=tmp_path / "rep", validation=val, cache=False,
                     strategies="single:a,best-single,skill@1", plots=False)[0]
    assert ("skill@1" in r.in_sample) == noted
    md = (tmp_path / "rep" / "report.md").read_text()
    assert ("| skill@1 †" in md) == noted
    if noted:
        assert "router.profiles (profiles.json)" in r.in_sample["skill@1"]
        # figures that may be in-sample do not choose: skill@1 is not recommended on them
        assert r.recommendation.strategy != "skill@1"
        assert "may be in-sample" in r.recommendation.not_recommendable["skill@1"]


# -- llm aggregators generate on the validation questions too ---------------------------------

def test_llm_strategies_are_scored_on_validation_through_the_executor(
        tmp_path, scripted):  # noqa: F811 (the fixture imported above)
    cfg, test, val = make_pool(tmp_path, extra_experts=[JUDGE])
    r = run_eval_job(test, cfg, out_dir=None, validation=val, cache=False,
                     strategies="best-single,all+llm", aggregator_expert="judge")[0]
    # the judge aggregates the 4 validation questions and the 8 test questions, in one call
    assert [(p.name, p.requests) for p in r.phases][-1] == ("aggregation", 12)
    assert [c[1] for c in scripted if c[2] == "aggregate"] == [
        *(f"v{i}" for i in range(4)), *(f"q{i}" for i in range(8))]
    # it repeats the last response shown, its own (D everywhere): right on v3 and q3, q7
    assert (r.val_score("all+llm").overall.correct, r.val_score("all+llm").overall.n) == (1, 4)
    assert r.score("all+llm").overall.correct == 2
    assert r.val_score("all+llm").aggregator_usage == {"judge": 4}
