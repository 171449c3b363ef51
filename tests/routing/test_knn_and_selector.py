"""kNN recruiting, learned answer selection and cascades over a small synthetic replay pool
with real static embeddings: two specialists (arithmetic, history) and two weak experts that
make the *same* mistakes, so they outvote a specialist; ``coe profile`` builds the validation
record and the selector on one half, everything is measured on the other."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import yaml

from coe.apps.api import Orchestrator
from coe.core.config import load_config
from coe.core.errors import ConfigError
from coe.io.questions import load_questions
from coe.learned.profiles import Profiles
from tests.conftest import write_jsonl

NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun"]
CITIES = ["Carthage", "Antioch", "Ravenna", "Toledo", "Kyiv", "Samarkand", "Cusco", "Aachen"]
EMPIRES = ["Roman", "Byzantine", "Ottoman", "Mongol", "Inca", "Carolingian", "Abbasid"]


def _questions(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    qs = []
    for i in range(n):
        if i % 2 == 0:
            a, b, c = rnd.randint(2, 99), rnd.randint(2, 99), rnd.randint(3, 12)
            text = (f"{rnd.choice(NAMES)} computes {a} times {b} and divides the product by {c}. "
                    f"What is the remainder of this arithmetic calculation?")
            topic = "math"
        else:
            text = (f"Which {rnd.choice(EMPIRES)} ruler governed the city of {rnd.choice(CITIES)} "
                    f"during the war of {rnd.randint(700, 1500)}, according to historians?")
            topic = "history"
        qs.append({"id": f"q{i}", "question": text, "choices": ["w", "x", "y", "z"],
                   "answer": rnd.choice("ABCD"), "meta": {"topic": topic}})
    return qs


def _answers(qs: list[dict], seed: int = 1) -> dict[str, list[str]]:
    """Specialists: right 90 % on their topic, 30 % elsewhere; the two weak experts right
    40 % and, when wrong, both give the same wrong letter."""
    rnd = random.Random(seed)
    out: dict[str, list[str]] = {"mathy": [], "historian": [], "weak1": [], "weak2": []}
    for q in qs:
        gold = q["answer"]
        wrong = [x for x in "ABCD" if x != gold]
        shared_wrong = rnd.choice(wrong)
        for name, topic in (("mathy", "math"), ("historian", "history")):
            p = 0.9 if q["meta"]["topic"] == topic else 0.3
            out[name].append(gold if rnd.random() < p else rnd.choice(wrong))
        weak_right = rnd.random() < 0.4
        for name in ("weak1", "weak2"):
            out[name].append(gold if weak_right else shared_wrong)
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """(folder, yaml path, validation path, test path); the profiles built by coe profile."""
    from tests.support.cli import coe

    d = tmp_path_factory.mktemp("knn-pool")
    qs = _questions(480)
    letters = _answers(qs)
    for name, ans in letters.items():
        write_jsonl(d / f"{name}.jsonl", [{"id": q["id"], "text": f"So the answer is ({a})."}
                                          for q, a in zip(qs, ans)])
    cfg = {"experts": [{"name": n, "backend": "replay", "model": f"{n}.jsonl"} for n in letters],
           "router": {"kind": "knn", "k": 2, "neighbours": 40, "profiles": "profiles.json"},
           "aggregator": {"kind": "learned"}}
    (d / "pool.yaml").write_text(yaml.safe_dump(cfg))
    write_jsonl(d / "val.jsonl", qs[:320])
    write_jsonl(d / "test.jsonl", qs[320:])
    done = coe("profile", d / "val.jsonl", "-c", d / "pool.yaml", "-o", d / "profiles.json", "-q")
    assert done.returncode == 0, done.stderr
    return d


def _load(path):
    return load_questions(path).questions


def _run(d, tmp_path, router: dict | None = None, aggregator: str = "learned", which="test"):
    cfg = yaml.safe_load((d / "pool.yaml").read_text())
    cfg["router"].update(router or {})
    cfg["aggregator"] = {"kind": aggregator}
    path = d / f"pool-{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with Orchestrator.from_yaml(path, cache=False) as orch:
        return orch.run(_load(d / f"{which}.jsonl"))


def test_profile_writes_a_readable_json_and_a_checked_sidecar_record(pool):
    data = json.loads((pool / "profiles.json").read_text())
    rec = data["record"]
    assert rec["file"] == "profiles.npz" and rec["questions"] == 320
    assert rec["embedding_model"] == "static" and rec["embedding_tag"]
    assert len(rec["sha256"]) == 64 and (pool / "profiles.npz").is_file()
    sel = data["selector"]
    assert sel["experts"] == ["mathy", "historian", "weak1", "weak2"]
    assert len(sel["model"]["coef"]) == len(sel["features"]) and len(sel["folds"]) == 5
    with np.load(pool / "profiles.npz", allow_pickle=False) as z:  # plain arrays, no pickle
        assert z["answers"].shape == (320, 4) and z["embeddings"].shape[0] == 320
    record = Profiles.load(pool / "profiles.json").validation_record()
    assert record.ids[:2] == ["q0", "q1"] and (record.right[:, 0] >= 0).all()


def test_a_changed_record_is_refused_in_one_line(pool, tmp_path):
    for name in ("profiles.json", "profiles.npz"):
        (tmp_path / name).write_bytes((pool / name).read_bytes())
    with open(tmp_path / "profiles.npz", "r+b") as f:  # one byte of the arrays changed
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ConfigError, match="does not match profiles.json.*rebuild") as e:
        Profiles.load(tmp_path / "profiles.json").validation_record()
    assert "\n" not in str(e.value)
    (tmp_path / "profiles.npz").unlink()
    with pytest.raises(ConfigError, match="validation record not found"):
        Profiles.load(tmp_path / "profiles.json").validation_record()


def test_knn_recruits_each_topics_specialist_first(pool, tmp_path):
    run = _run(pool, tmp_path, aggregator="vote")
    first = {"math": [], "history": []}
    for q, r in zip(_load(pool / "test.jsonl"), run.results):
        first[q.meta["topic"]].append(r.route.names[0])
    assert first["math"].count("mathy") / len(first["math"]) > 0.9
    assert first["history"].count("historian") / len(first["history"]) > 0.9
    assert run.results[0].route.reason.startswith("knn (40 neighbours): ")


def test_a_profiled_question_is_not_its_own_neighbour(pool):
    """Same id and text: left out; same text under another id: a neighbour like any other."""
    from coe.core.types import Question
    from coe.learned.neighbours import Neighbourhood

    cfg = load_config(pool / "pool.yaml")
    record = Profiles.load(pool / "profiles.json").validation_record()
    hood = Neighbourhood(record, cfg, neighbours=1)
    val = _load(pool / "val.jsonl")[:40]
    own = hood.local(val)
    renamed = hood.local([Question(id=f"new-{q.id}", question=q.question) for q in val])
    right = (record.right[:40] == 1).astype(float)
    glob = record.global_accuracy()
    alone = (right + hood.prior * glob) / (1 + hood.prior)  # its own row as the one neighbour
    assert np.allclose(renamed, alone)
    assert not np.allclose(own, alone)


def test_learned_selection_beats_the_vote_the_weak_pair_wins(pool, tmp_path):
    learned = _run(pool, tmp_path, router={"kind": "all"}, aggregator="learned")
    voted = _run(pool, tmp_path, router={"kind": "all"}, aggregator="vote")
    assert learned.accuracy > voted.accuracy + 0.1, (learned.accuracy, voted.accuracy)
    test = _load(pool / "test.jsonl")
    for name in ("mathy", "historian", "weak1", "weak2"):
        said = {json.loads(line)["id"]: json.loads(line)["text"][-3]
                for line in (pool / f"{name}.jsonl").read_text().splitlines()}
        alone = np.mean([said[q.id] == q.answer for q in test])
        assert learned.accuracy > alone + 0.1, (name, alone, learned.accuracy)
    r = learned.results[0]
    assert r.aggregator == "learned" and 0 < r.confidence < 1 and r.votes


def test_learned_without_a_selector_votes_and_says_why(pool, tmp_path):
    cfg = yaml.safe_load((pool / "pool.yaml").read_text())
    cfg["router"] = {"kind": "all"}
    cfg["aggregator"] = {"kind": "learned"}
    path = tmp_path / "pool.yaml"
    for name in ("mathy", "historian", "weak1", "weak2"):
        (tmp_path / f"{name}.jsonl").write_bytes((pool / f"{name}.jsonl").read_bytes())
    path.write_text(yaml.safe_dump(cfg))
    with Orchestrator.from_yaml(path, cache=False) as orch:
        run = orch.run(_load(pool / "test.jsonl")[:5])
    assert all(r.aggregator == "learned" and r.note.startswith("vote: no profiles")
               for r in run.results)


def test_validation_questions_are_scored_by_the_fold_model_that_did_not_see_them(pool):
    from coe.learned.selector import fold_of

    cfg = load_config(pool / "pool.yaml")
    selector = Profiles.load(pool / "profiles.json").selector_for(cfg)
    rec = selector.record
    asked = np.ones(rec.answers.shape, bool)
    local = selector.hood.local_of_record()
    from coe.learned.selector import candidates

    x, q, _ = candidates(rec.answers, asked, local, selector.hood.glob)
    inside = selector.probabilities(x, q, np.arange(len(rec)))
    outside = selector.probabilities(x, q, np.full(len(rec), -1))
    assert np.allclose(outside, selector.model.model.probability(x))
    folds = fold_of(rec.ids)[q]
    for f, m in enumerate(selector.model.folds):
        assert np.allclose(inside[folds == f], m.probability(x[folds == f]))


def test_cascade_meets_its_budget_and_asks_recruits_strongest_first(pool, tmp_path):
    """A budget asked for as a mean (``budget_mode: mean``): the average on validation is at
    most the budget, a question may ask up to k."""
    from coe.routing import build_router

    cfg = load_config(pool / "pool.yaml")
    cfg.router.k, cfg.router.budget, cfg.router.budget_mode = 4, 1.6, "mean"
    router = build_router("knn", cfg)
    c = router.cascade
    assert c.validation_experts <= 1.6 + 1e-9 and c.max_experts == 4
    run = _run(pool, tmp_path, router={"k": 4, "budget": 1.6, "budget_mode": "mean"})
    asked = [len(r.responses) for r in run.results]
    assert 1.0 < np.mean(asked) < 2.5 and min(asked) == 1 and max(asked) > 1
    assert run.stats.generations == sum(asked)
    full = router.route(_load(pool / "test.jsonl"))
    for r, f in zip(run.results, full):
        assert [x.expert for x in r.responses] == f.names[:len(r.responses)]
        assert r.route.names == f.names[:len(r.responses)]
        assert r.route.reason.endswith(f"cascade: asked {len(r.responses)} of 4")
    everyone = _run(pool, tmp_path, router={"k": 4, "budget": 4.0, "budget_mode": "mean"})
    assert all(len(r.responses) == 4 for r in everyone.results)


def test_a_budget_is_a_cap_on_every_question_unless_a_mean_is_asked_for(pool, tmp_path):
    """``budget: 2`` (cap, the default): no question asks more than 2 experts, whatever k;
    the threshold is the most accurate on validation. As a mean the same budget lets some
    questions ask 3 or 4 (what a mean allows, and what the cap is for)."""
    from coe.routing import build_router
    from coe.routing.cascade import _accuracy

    capped = _run(pool, tmp_path, router={"k": 4, "budget": 2.0})
    assert max(len(r.responses) for r in capped.results) <= 2
    mean = _run(pool, tmp_path, router={"k": 4, "budget": 2.0, "budget_mode": "mean"})
    assert max(len(r.responses) for r in mean.results) > 2
    cfg = load_config(pool / "pool.yaml")
    cfg.router.k, cfg.router.budget = 4, 2.5
    c = build_router("knn", cfg).cascade
    assert (c.mode, c.max_experts) == ("cap", 2) and c.validation_max <= 2
    assert "at most 2 per question" in c.describe()
    assert f"{c.validation_max} at most" in c.describe()
    # the accuracy at each threshold, against a direct count
    running = np.array([[0.2, 0.7], [0.9, 0.9], [0.1, 0.3]])
    right = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1]], bool)
    grid = np.array([0.05, 0.2, 0.5, 0.95, np.inf])
    expected = [np.mean([right[i, (running[i] < t).sum()] for i in range(3)]) for t in grid]
    assert np.allclose(_accuracy(running, right, grid), expected)


def test_coe_eval_runs_knn_learned_and_cascades_and_their_yaml_answers_alike(pool, tmp_path):
    """In ``coe eval``: the cascade asks only what its rounds need (no full k per question),
    its figures and its recommended yaml agree with ``coe run``; learned selection without a
    selector is skipped, not passed off as a vote."""
    from coe.apps.eval.recommend import recommended_pool
    from coe.apps.eval.runner import EvalOptions, EvaluationJob

    cfg = load_config(pool / "pool.yaml")
    test, val = _load(pool / "test.jsonl"), _load(pool / "val.jsonl")
    opts = EvalOptions(validation=val, cache=False, budgets=("mean:1.5", 2),
                       strategies="best-single,knn+vote,knn+learned,all+vote,all+learned,knn+learned~*")
    job = EvaluationJob(cfg, test, opts)
    r = job.run()
    acc = {s.name: s.overall.value for s in r.scores}
    assert acc["all+learned"] > acc["all+vote"] + 0.1 and acc["knn+learned"] > acc["best-single"]
    cascade = r.score("knn+learned~mean1.5")
    assert 1.0 < cascade.avg_experts < 2.2
    assert job.cascades["knn+learned~mean1.5"].validation_experts <= 1.5
    capped = r.score("knn+learned~2")
    assert 1 <= capped.max_generations <= 2  # a cap: no question asks a third
    # every table shows the mean and the most generations one question took
    from coe.apps.eval.report import comparison_table, strategy_table

    for table in (strategy_table(r), comparison_table(r)):
        assert "generations/q (max)" in table
        assert any(row.startswith("| knn+learned~mean1.5 |") and
                   f" ({cascade.max_generations}) |" in row for row in table.splitlines())
    # generations on the test set: the cascade's asked experts and the other strategies', no more
    asked = r.outcomes["knn+learned~mean1.5"].routes.mask()
    asked |= r.outcomes["knn+learned~2"].routes.mask()
    others = np.zeros_like(asked)
    for name in ("best-single", "knn+vote", "knn+learned", "all+vote", "all+learned"):
        others |= r.outcomes[name].routes.mask()
    assert (r.responses.has == (asked | others)).all()
    assert r.val_score("knn+learned~mean1.5").overall.n == len(val)
    spec = next(s for s in r.specs if s.name == "knn+learned~mean1.5")
    raw = recommended_pool(job.config, spec, k=job.router_k[spec.name], strength=job.strength)
    assert raw["router"]["budget"] == 1.5 and raw["router"]["budget_mode"] == "mean"
    assert raw["router"]["k"] == job.cascades[spec.name].max_experts
    asked = r.outcomes[spec.name].routes.mask()
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with Orchestrator.from_yaml(path, cache=False) as orch:
        run = orch.run(test)
    assert [x.final_answer for x in run.results] == [o.answer for o in r.outcomes[spec.name]]
    assert [len(x.responses) for x in run.results] == asked.sum(axis=1).tolist()

    plain = yaml.safe_load((pool / "pool.yaml").read_text())
    plain["router"] = {"kind": "all"}
    (pool / "no-profiles.yaml").write_text(yaml.safe_dump(plain))
    bare = EvaluationJob(load_config(pool / "no-profiles.yaml"), test,
                         EvalOptions(validation=val, cache=False, strategies="best-single,all+*"))
    skipped = bare.run().skipped
    assert "learned aggregator is not trained: no profiles" in skipped["all+learned"]


def test_a_cascade_without_a_selector_is_skipped_naming_the_selector_not_the_router(pool):
    """The profiles route (knn+vote runs) but hold no answer selector, which a cascade needs
    to decide when to stop: the skip says so, not that the knn router is unavailable."""
    from coe.apps.eval.runner import EvalOptions, EvaluationJob

    data = json.loads((pool / "profiles.json").read_text())
    data["selector"] = None
    (pool / "no-selector.json").write_text(json.dumps(data))
    raw = yaml.safe_load((pool / "pool.yaml").read_text())
    raw["router"]["profiles"] = "no-selector.json"
    (pool / "no-selector.yaml").write_text(yaml.safe_dump(raw))
    job = EvaluationJob(load_config(pool / "no-selector.yaml"), _load(pool / "test.jsonl"),
                        EvalOptions(validation=_load(pool / "val.jsonl"), cache=False,
                                    budgets=(2,), strategies="knn+vote,knn+learned~2"))
    r = job.run()
    assert [s.name for s in r.scores] == ["knn+vote"]
    why = r.skipped["knn+learned~2"]
    assert why.startswith("the knn router's cascade cannot run (the knn router itself can): ")
    assert "no answer selector" in why and "knn router unavailable" not in why
