"""The learned CoE category router, on real MMLU-Pro questions from ../shared/data."""

import json
import random

import numpy as np
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


def test_given_category_is_used_unless_the_yaml_asks_to_predict(tmp_path, labelled):
    clf, report = train_category_router(labelled[:180], labelled[180:])
    clf.save(tmp_path / "r.joblib")
    held = labelled[180:] + [Question(id="odd", question=labelled[0].question, category="astrology")]
    given = build_router("category", pool(tmp_path, "r.joblib")).route(held)
    assert [r.category for r in given[:-1]] == [q.category for q in held[:-1]]
    assert all("given" in r.reason for r in given[:-1])
    assert given[-1].category == labelled[0].category and "predicted" in given[-1].reason
    cfg = pool(tmp_path, "r.joblib")
    cfg.router.use_given_category = False
    predicted = build_router("category", cfg).route(held)
    assert all("predicted" in r.reason for r in predicted)
    assert [r.category for r in predicted[:-1]] == clf.predict([q.question for q in held[:-1]])
    right = sum(r.category == q.category for r, q in zip(predicted, held[:-1]))
    assert right / 60 == pytest.approx(report.accuracy)


def test_split_from_the_training_file_then_refit_on_everything(labelled):
    clf, report = train_category_router(labelled[:180], test_fraction=0.25, seed=1)
    assert (report.n_train, report.n_test) == (135, 45)
    assert report.confusion.sum() == 45 and sorted(clf.labels) == sorted(CATS)
    again, same = train_category_router(labelled[:180], test_fraction=0.25, seed=1)
    assert same.accuracy == report.accuracy and (same.confusion == report.confusion).all()
    texts = [q.question for q in labelled[180:]]
    assert clf.predict(texts) == again.predict(texts)
    on_all, _ = train_category_router(labelled[:180], labelled[180:])  # fitted on all 180
    assert np.allclose(clf.estimator.coef_, on_all.estimator.coef_)


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
    """train-router prints the same held-out figures as the API; coe route shows the trained
    router's choice. The held-out questions' embeddings are in the cache train-router filled,
    so routing them loads no encoder (the test stays fast)."""
    train, held = labelled[:60], labelled[60:90]
    (tmp_path / "train.jsonl").write_text("".join(q.model_dump_json() + "\n" for q in train))
    (tmp_path / "held.jsonl").write_text("".join(q.model_dump_json() + "\n" for q in held))
    proc = coe("train-router", tmp_path / "train.jsonl", "--test", tmp_path / "held.jsonl",
               "-o", tmp_path / "router.joblib")
    assert proc.returncode == 0, proc.stderr
    clf, report = train_category_router(train, held)
    assert f"held-out accuracy: {report.accuracy:.1%} (train 60, test 30)" in proc.stdout
    matrix = proc.stdout.split("confusion matrix (rows: true, columns: predicted):\n")[1].splitlines()
    assert matrix[0].split() == [c[:6] for c in sorted(CATS)]
    for row, cat, counts in zip(matrix[1:4], sorted(CATS), report.confusion):
        assert row.split() == [cat, *map(str, counts)]
    assert "router.joblib: logreg over 3 categories" in proc.stdout
    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump({"experts": [
        {"name": c[:4], "backend": "replay", "model": "x.jsonl", "categories": [c]} for c in CATS],
        "router": {"kind": "category", "model_file": "router.joblib"}}))
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"id": q.id, "question": q.question}) + "\n" for q in held[:5]))
    expected = clf.predict([q.question for q in held[:5]])
    routed = coe("route", qs, "-c", cfg, "--json", "-k", "1")
    assert routed.returncode == 0, routed.stderr
    routes = [json.loads(line) for line in routed.stdout.splitlines()]
    assert [r["category"] for r in routes] == expected
    assert [[e["name"] for e in r["experts"]] for r in routes] == [[c[:4]] for c in expected]
    assert all("predicted" in r["reason"] and 0 < r["confidence"] <= 1 for r in routes)
    assert "5 routes; model loads for routing: 0" in routed.stderr
    table = coe("route", qs, "-c", cfg)
    assert table.returncode == 0, table.stderr
    first = table.stdout.splitlines()[0].split("\t")
    assert first[0] == held[0].id and first[1].startswith(f"{expected[0][:4]} 1.00")
    assert f"category '{expected[0]}' (predicted" in first[3]
