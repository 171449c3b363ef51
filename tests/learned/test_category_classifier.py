"""The learned CoE category router (MiniLM embeddings + logistic regression), trained on
labelled questions this file writes itself: three well-separated subjects, built from varied
templates and fillers, so the suite needs nothing beside the repository."""

import json
import random

import numpy as np
import pytest
import yaml

from coe.core.config import parse_config
from coe.core.errors import ConfigError
from coe.io.questions import Question
from coe.learned.classifier import LearnedCategoryClassifier, train_category_router
from coe.routing import build_router
from tests.support.cli import coe, one_line_error

CATS = ("law", "chemistry", "psychology")
PER_CATEGORY = 40  # labelled[:90] trains (30 per subject), labelled[90:] is held out (10 each)

# subject -> (templates, fillers); every template is filled from the subject's own words
SUBJECTS = {
    "law": ([
        "Under the doctrine of {doctrine}, is the {party} liable when {event}?",
        "A {party} sued the {other} for {claim}. Which defense is most likely to succeed?",
        "What must a plaintiff prove to win a claim of {claim} against a {party}?",
        "A {party} signed a contract with a {other} but {event}. Is the contract enforceable?",
        "Which constitutional protection applies when the police {search}?",
        "Can evidence found when officers {search} be admitted at the {party}'s criminal trial?",
        "On appeal, should the court reverse a judgment for the {other} in a {claim} case where "
        "{event}?",
        "Does the statute of limitations bar a {claim} action brought by a {party} years after "
        "{event}?",
    ], {
        "doctrine": ["respondeat superior", "promissory estoppel", "adverse possession",
                     "res ipsa loquitur", "strict liability", "the parol evidence rule",
                     "the statute of frauds", "sovereign immunity"],
        "party": ["landlord", "tenant", "employer", "defendant", "trustee", "buyer",
                  "corporation", "municipality"],
        "other": ["seller", "contractor", "neighbor", "insurer", "lender", "employee",
                  "state agency", "testator's heirs"],
        "claim": ["breach of contract", "negligence", "defamation", "trespass", "fraud",
                  "nuisance", "battery", "unjust enrichment"],
        "event": ["a guest slipped on an icy staircase", "the delivery arrived late",
                  "the deed was never recorded", "an oral promise was broken",
                  "the warranty was disclaimed in small print", "a juror was biased",
                  "the will had only one witness", "the zoning ordinance changed"],
        "search": ["search a car without a warrant", "question a suspect without Miranda "
                   "warnings", "use a thermal imager on a home", "stop a pedestrian on a "
                   "hunch", "seize a phone during an arrest", "enter a house in hot pursuit"],
    }),
    "chemistry": ([
        "What is the molar mass of {compound}?",
        "How many moles of {compound} are in {grams} grams?",
        "What is the oxidation state of {element} in {compound}?",
        "What is the pH of a {conc} M solution of {acid}?",
        "Which hybridization does the central atom of {molecule} have?",
        "When {compound} reacts with {acid}, which gas is released?",
        "What volume of {conc} M {acid} is needed to titrate {grams} mL of sodium hydroxide?",
        "Which intermolecular force dominates in liquid {molecule}, and how does it affect the "
        "boiling point?",
    ], {
        "compound": ["calcium carbonate", "potassium permanganate", "sodium bicarbonate",
                     "iron(III) oxide", "copper sulfate", "magnesium chloride",
                     "ammonium nitrate", "sodium sulfite"],
        "element": ["manganese", "sulfur", "nitrogen", "chromium", "iron", "chlorine",
                    "carbon", "phosphorus"],
        "acid": ["hydrochloric acid", "acetic acid", "nitric acid", "sulfuric acid",
                 "hydrofluoric acid", "formic acid"],
        "molecule": ["methane", "ammonia", "boron trifluoride", "sulfur hexafluoride",
                     "carbon dioxide", "ethanol", "water", "xenon tetrafluoride"],
        "grams": ["12.5", "25", "40", "58.4", "100", "2.0", "7.3", "250"],
        "conc": ["0.01", "0.10", "0.25", "0.5", "1.0", "2.0"],
    }),
    "psychology": ([
        "In {theorist}'s theory of development, what characterizes the {stage} stage?",
        "A patient reports {symptom} after {experience}. Which disorder is most likely?",
        "Which brain region is most closely associated with {function}?",
        "In classical conditioning, what is the {term} when {scenario}?",
        "Which research design best tests whether {variable} changes a person's {behavior}?",
        "According to {theorist}, why might a child show {behavior} toward a caregiver?",
        "A therapist treats {symptom} with {therapy}. What is the goal of this approach?",
        "Why does {experience} lead some people to {behavior}, according to social "
        "psychologists?",
    ], {
        "theorist": ["Piaget", "Erikson", "Freud", "Vygotsky", "Bowlby", "Kohlberg",
                     "Maslow", "Bandura"],
        "stage": ["sensorimotor", "preoperational", "concrete operational", "latency",
                  "identity versus role confusion", "trust versus mistrust"],
        "symptom": ["persistent low mood", "intrusive memories and nightmares",
                    "panic attacks in crowds", "compulsive hand washing",
                    "hearing voices", "loss of interest and fatigue", "excessive worry"],
        "experience": ["a car accident", "losing a job", "a divorce", "combat deployment",
                       "the death of a parent", "moving to a new country",
                       "being bullied at school"],
        "function": ["forming new long-term memories", "fear responses", "language "
                     "production", "impulse control and planning", "balance and motor "
                     "coordination", "regulating hunger"],
        "term": ["conditioned stimulus", "unconditioned response", "extinction",
                 "spontaneous recovery"],
        "scenario": ["a dog salivates at the sound of a bell", "a child fears white rabbits "
                     "after a loud noise", "a rat stops pressing a lever", "a patient feels "
                     "nausea at the smell of a hospital"],
        "variable": ["sleep deprivation", "social media use", "mindfulness training",
                     "peer pressure", "praise from a teacher", "caffeine"],
        "behavior": ["conformity", "aggression", "anxious attachment", "procrastination",
                     "risk taking", "helping strangers"],
        "therapy": ["cognitive behavioral therapy", "exposure therapy", "psychoanalysis",
                    "client-centered therapy", "systematic desensitization"],
    }),
}


def _fill(template: str, fillers: dict[str, list[str]], rng: random.Random) -> str:
    import string

    names = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    return template.format(**{n: rng.choice(fillers[n]) for n in names})


@pytest.fixture(scope="module")
def labelled():
    """PER_CATEGORY distinct questions per subject, interleaved (law, chemistry, psychology,
    law, ...) so that every slice used below is balanced across the three subjects."""
    rng = random.Random(0)
    per: dict[str, list[str]] = {}
    for cat in CATS:
        templates, fillers = SUBJECTS[cat]
        seen: list[str] = []
        i = 0
        while len(seen) < PER_CATEGORY:  # bounded: each template has hundreds of fillings
            text = _fill(templates[i % len(templates)], fillers, rng)
            i += 1
            if text not in seen:
                seen.append(text)
            assert i < 100 * PER_CATEGORY
        per[cat] = seen
    return [Question(id=f"{cat[:3]}{i}", question=per[cat][i], category=cat)
            for i in range(PER_CATEGORY) for cat in CATS]


def pool(tmp_path, model_file=None, cats=CATS):
    data = {"experts": [{"name": c[:4], "backend": "replay", "model": "x.jsonl", "categories": [c]}
                        for c in cats] + [{"name": "gen", "backend": "replay", "model": "x.jsonl",
                                           "categories": ["default"]}],
            "router": {"kind": "category", "threshold": 0.5, **({"model_file": model_file} if model_file else {})}}
    return parse_config(data, base_dir=tmp_path)


def test_train_report_save_load_and_route(tmp_path, labelled):
    clf, report = train_category_router(labelled[:90], labelled[90:])
    assert report.n_test == 30 and report.accuracy > 0.8  # three well-separated subjects
    assert report.confusion.sum() == 30 and report.confusion.trace() == round(report.accuracy * 30)
    assert "confusion matrix" in report.table()
    clf.save(tmp_path / "r.joblib")
    again = LearnedCategoryClassifier.load(tmp_path / "r.joblib")
    texts = [q.question for q in labelled[90:]]
    assert again.predict(texts) == clf.predict(texts)
    router = build_router("category", pool(tmp_path, "r.joblib"), k=2)
    hidden = [q.model_copy(update={"category": None}) for q in labelled[90:]]
    routes = router.route(hidden)
    right = sum(r.category == q.category for r, q in zip(routes, labelled[90:]))
    assert right / 30 == pytest.approx(report.accuracy)
    law = next(r for r, q in zip(routes, labelled[90:]) if r.category == "law" and r.confidence >= 0.5)
    assert law.names[0] == "law" and "predicted" in law.reason


def test_given_category_is_used_unless_the_yaml_asks_to_predict(tmp_path, labelled):
    clf, report = train_category_router(labelled[:90], labelled[90:])
    clf.save(tmp_path / "r.joblib")
    held = labelled[90:] + [Question(id="odd", question=labelled[0].question, category="astrology")]
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
    assert right / 30 == pytest.approx(report.accuracy)


def test_split_from_the_training_file_then_refit_on_everything(labelled):
    clf, report = train_category_router(labelled[:90], test_fraction=0.2, seed=1)
    assert (report.n_train, report.n_test) == (72, 18)
    assert report.confusion.sum() == 18 and sorted(clf.labels) == sorted(CATS)
    again, same = train_category_router(labelled[:90], test_fraction=0.2, seed=1)
    assert same.accuracy == report.accuracy and (same.confusion == report.confusion).all()
    texts = [q.question for q in labelled[90:]]
    assert clf.predict(texts) == again.predict(texts)
    on_all, _ = train_category_router(labelled[:90], labelled[90:])  # fitted on all 90
    assert np.allclose(clf.estimator.coef_, on_all.estimator.coef_)


def test_threshold_sends_unsure_questions_to_default(tmp_path, labelled):
    clf, _ = train_category_router(labelled[:90], labelled[90:])
    clf.save(tmp_path / "r.joblib")
    cfg = pool(tmp_path, "r.joblib")
    cfg.router.threshold = 0.99
    routes = build_router("category", cfg).route([Question(id="x", question="Tell me something.")])
    assert routes[0].names == ["gen"] and "default experts (low confidence)" in routes[0].reason


def test_router_trained_on_other_categories_is_refused_before_any_load(tmp_path, labelled):
    clf, _ = train_category_router(labelled[:90], labelled[90:])
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


def test_a_router_trained_on_other_static_embeddings_is_refused(tmp_path, labelled):
    """A classifier fits the vectors of the static model it was trained on: a file from a
    machine whose distilled model differs (another model2vec, another source) is refused in
    one line instead of routing on vectors it never saw."""
    import joblib

    clf, _ = train_category_router(labelled[:90], labelled[90:], embedding_model="static")
    clf.save(tmp_path / "r.joblib")
    LearnedCategoryClassifier.load(tmp_path / "r.joblib")  # this machine's own: fine
    blob = joblib.load(tmp_path / "r.joblib")
    assert blob["embedding_tag"].startswith("static-")
    blob["embedding_tag"] = "static-000000000000"
    joblib.dump(blob, tmp_path / "r.joblib")
    with pytest.raises(ConfigError, match="retrain it with coe train-router") as e:
        LearnedCategoryClassifier.load(tmp_path / "r.joblib")
    assert "static-000000000000" in str(e.value) and "\n" not in str(e.value)


def test_a_training_question_is_classified_by_the_copy_that_did_not_see_it(tmp_path, labelled):
    """Cross-fitting: routing the training questions again is out-of-sample; new questions get
    the classifier fitted on everything; the copies survive save and load."""
    from coe.learned.classifier import FOLDS
    from coe.learned.neighbours import text_hash

    clf, _ = train_category_router(labelled[:90], labelled[90:])
    clf.save(tmp_path / "r.joblib")
    clf = LearnedCategoryClassifier.load(tmp_path / "r.joblib")
    hashes, fold, copies = clf.folds
    assert len(copies) == FOLDS and len(hashes) == 90  # every training question
    seen = [q.question for q in labelled[:40]]
    x = clf.embed(seen)
    f = (text_hash(seen) % FOLDS).astype(int)
    _, p = clf.predict_proba(seen)
    for i in range(len(seen)):
        assert np.allclose(p[i], copies[f[i]].predict_proba(x[i:i + 1])[0])
        assert not np.allclose(p[i], clf.estimator.predict_proba(x[i:i + 1])[0])
    new = ["Under contract law, is a promise made without any consideration enforceable?"]
    assert np.allclose(clf.predict_proba(new)[1], clf.estimator.predict_proba(clf.embed(new)))
    assert build_router("category", pool(tmp_path, "r.joblib")).cross_fitted
