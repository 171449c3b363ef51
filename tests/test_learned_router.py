"""The learned CoE category router, on real MMLU-Pro questions from ../shared/data."""

import json
import random

import pytest
import yaml

from coe.config import parse_config
from coe.errors import ConfigError
from coe.questions import Question
from coe.routers import build_router
from coe.routers.learned import LearnedCategoryClassifier, train_category_router
from tests.conftest import SHARED_DATA
from tests.test_cli import coe, one_line_error

CATS = ("law", "chemistry", "psychology")


@pytest.fixture(scope="module")
def labelled():
    from coe.eval.mmlu_pro import read_records

    recs = read_records(SHARED_DATA / "mmlu-pro-outputs" / "model_outputs_gemma-7b_5shots.zip")
    picked = [r for r in recs if r["category"] in CATS]
    random.Random(0).shuffle(picked)
    return [Question(id=str(r["question_id"]), question=r["question"], category=r["category"])
            for r in picked[:240]]


def pool(tmp_path, model_file=None, cats=CATS):
    data = {"experts": [{"name": c[:4], "backend": "replay", "model": "x.jsonl", "categories": [c]}
                        for c in cats] + [{"name": "gen", "backend": "replay", "model": "x.jsonl",
                                           "categories": ["default"]}],
            "router": {"kind": "category", "threshold": 0.5, **({"model_file": model_file} if model_file else {})}}
    return parse_config(data, base_dir=tmp_path)


def test_train_report_save_load_and_route(tmp_path, labelled):
    clf, report = train_category_router(labelled[:180], labelled[180:])
    assert report.n_test == 60 and report.accuracy > 0.8  # three well-separated subjects
    assert report.confusion.sum() == 60 and report.confusion.trace() == round(report.accuracy * 60)
    assert "confusion matrix" in report.table()
    clf.save(tmp_path / "r.joblib")
    again = LearnedCategoryClassifier.load(tmp_path / "r.joblib")
    texts = [q.question for q in labelled[180:]]
    assert again.predict(texts) == clf.predict(texts)
    router = build_router("category", pool(tmp_path, "r.joblib"), k=2)
    hidden = [q.model_copy(update={"category": None}) for q in labelled[180:]]
    routes = router.route(hidden)
    right = sum(r.category == q.category for r, q in zip(routes, labelled[180:]))
    assert right / 60 == pytest.approx(report.accuracy)
    law = next(r for r, q in zip(routes, labelled[180:]) if r.category == "law" and r.confidence >= 0.5)
    assert law.names[0] == "law" and "predicted" in law.reason


def test_threshold_sends_unsure_questions_to_default(tmp_path, labelled):
    clf, _ = train_category_router(labelled[:180], labelled[180:])
    clf.save(tmp_path / "r.joblib")
    cfg = pool(tmp_path, "r.joblib")
    cfg.router.threshold = 0.99
    routes = build_router("category", cfg).route([Question(id="x", question="Tell me something.")])
    assert routes[0].names == ["gen"] and "default experts (low confidence)" in routes[0].reason


def test_router_trained_on_other_categories_is_refused_before_any_load(tmp_path, labelled):
    clf, _ = train_category_router(labelled[:180], labelled[180:])
    clf.save(tmp_path / "r.joblib")
    with pytest.raises(ConfigError, match=r"r.joblib: router was trained on categories the pool does not have: psychology"):
        build_router("category", pool(tmp_path, "r.joblib", cats=("law", "chemistry")))
    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump({"experts": [{"name": "l", "backend": "replay", "model": "x.jsonl",
                                                "categories": ["law"]}],
                                   "router": {"kind": "category", "model_file": "r.joblib"}}))
    (tmp_path / "x.jsonl").write_text("")
    one_line_error(coe("experts", "-c", cfg, "--check"), 2, "router was trained on categories",
                   "chemistry, psychology")
    (tmp_path / "junk.joblib").write_text("not a router")
    with pytest.raises(ConfigError, match="not a coe router file"):
        LearnedCategoryClassifier.load(tmp_path / "junk.joblib")


def test_cli_train_router_and_route(tmp_path, labelled):
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(q.model_dump_json() + "\n" for q in labelled))
    proc = coe("train-router", data, "-o", tmp_path / "router.joblib", "--test-fraction", "0.25")
    assert proc.returncode == 0, proc.stderr
    assert "held-out accuracy:" in proc.stdout and "(train 180, test 60)" in proc.stdout
    assert "confusion matrix" in proc.stdout and "router.joblib: logreg over 3 categories" in proc.stdout
    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump({"experts": [
        {"name": c[:4], "backend": "replay", "model": "x.jsonl", "categories": [c]} for c in CATS],
        "router": {"kind": "category", "model_file": "router.joblib"}}))
    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"id": "a", "question": "Is the oral contract for land enforceable under the statute of frauds?"}) + "\n")
    routed = coe("route", qs, "-c", cfg, "--json")
    assert routed.returncode == 0, routed.stderr
    r = json.loads(routed.stdout)
    assert r["category"] == "law" and r["experts"][0]["name"] == "law"
    assert "model loads for routing: 0" in routed.stderr
