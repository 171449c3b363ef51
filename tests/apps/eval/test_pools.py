"""``coe pool``: a replay pool built from a folder of recorded outputs (MMLU-Pro zip/json files
or the generic questions.jsonl + outputs/<model>.jsonl), on small real files made here."""

import json
import random
import zipfile

import pytest
import yaml

from coe.apps.eval.pools import build_pool, split_ids
from coe.apps.eval.recorded import PoolSourceError
from tests.conftest import write_jsonl
from tests.support.cli import coe, one_line_error

IDS = list(range(1, 13))  # as integers "10" < "2" would sort them wrong: the split must not
CHOICES = ["w", "x", "y", "z"]


def gold(i: int) -> str:
    return "ABCD"[i % 4]


def wrong(i: int) -> str:
    return "ABCD"[(i + 1) % 4]


def category(i: int) -> str:
    return "math" if i % 2 else "law"


# which question each model gets right (None: no answer recorded)
RIGHT = {
    "Yi-6b-Chat": lambda i: i % 2 == 1,  # every math question, no law one
    "alpha": lambda i: i % 2 == 0 or (None if i in (3, 5) else False),  # law; 3, 5 unanswered
    "beta": lambda i: i not in (2, 3, 4),
}


def record(model: str, i: int, options=CHOICES) -> dict:
    r = RIGHT[model](i)
    pred = None if r is None else gold(i) if r else wrong(i)
    return {"question_id": i, "question": f"Question {i}?", "options": options,
            "answer": gold(i), "answer_index": "ABCD".index(gold(i)), "category": category(i),
            "src": f"ori_{category(i)}", "cot_content": "",
            "generated_text": f"Thinking. The answer is ({pred})." if pred else "I do not know.",
            "pred": pred}


def mmlu_pro_folder(tmp_path, ids=IDS):
    """Yi-6b-Chat as a zip, alpha and beta as plain JSON lists (beta's options written as a
    Python literal, as some MMLU-Pro dumps have them)."""
    src = tmp_path / "recorded"
    src.mkdir()
    with zipfile.ZipFile(src / "model_outputs_Yi-6b-Chat_5shots.zip", "w") as z:
        z.writestr("model_outputs_Yi-6b-Chat_5shots.json",
                   json.dumps([record("Yi-6b-Chat", i) for i in ids]))
    (src / "model_outputs_alpha_5shots.json").write_text(
        json.dumps([record("alpha", i) for i in ids]))
    (src / "beta.json").write_text(json.dumps([record("beta", i, str(CHOICES)) for i in ids]))
    (src / "LICENSE").write_text("not a model")
    return src


def spec_split(ids, seed=0):
    order = sorted(ids, key=int)
    random.seed(seed)
    random.shuffle(order)
    return order[: len(order) // 2], order[len(order) // 2:]


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_mmlu_pro_folder_of_zip_and_json(tmp_path):
    src, out = mmlu_pro_folder(tmp_path), tmp_path / "pool"
    summary = build_pool(src, out, top_per_category=2, params={"beta": 1.5})
    train, test = spec_split([str(i) for i in IDS])
    assert [q["id"] for q in lines(out / "train.jsonl")] == train
    assert [q["id"] for q in lines(out / "test.jsonl")] == test
    as_strings = sorted(map(str, IDS))
    random.seed(0)
    random.shuffle(as_strings)
    assert as_strings[:6] != train  # the fixture tells the two sorts apart
    q = lines(out / "train.jsonl")[0]
    i = int(q["id"])
    assert q == {"id": str(i), "question": f"Question {i}?", "choices": CHOICES,
                 "answer": gold(i), "category": category(i), "meta": {"src": f"ori_{category(i)}"}}
    beta = lines(out / "replay" / "beta.jsonl")
    assert [r["id"] for r in beta] == [str(i) for i in IDS]  # file order
    assert beta[1] == {"id": "2", "text": f"Thinking. The answer is ({wrong(2)}).",
                       "answer": wrong(2)}
    assert lines(out / "replay" / "alpha.jsonl")[2] == {"id": "3", "text": "I do not know.",
                                                        "answer": None}

    pool = yaml.safe_load((out / "experts.yaml").read_text())
    # the known model first, then the others by name; params known, given, or absent
    assert [e["name"] for e in pool["experts"]] == ["Yi-6b-Chat", "alpha", "beta"]
    assert [e.get("params") for e in pool["experts"]] == [6.1, None, 1.5]
    assert "params" not in pool["experts"][1]
    expected = {m: round(sum(bool(RIGHT[m](int(i))) for i in train) / len(train), 4) for m in RIGHT}
    assert {e["name"]: e["strength"] for e in pool["experts"]} == expected == summary["strength"]
    assert pool["experts"][0]["model"] == "replay/Yi-6b-Chat.jsonl"
    assert pool["categories"]["math"]["experts"] == ["Yi-6b-Chat", "beta"]
    assert pool["categories"]["law"]["experts"][0] == "alpha"
    assert pool["categories"]["default"]["experts"] == sorted(expected, key=lambda m: -expected[m])[:2]
    assert not list((out / "replay").glob(".*"))  # no temporary file left


def test_split_sorts_ids_as_integers_only_when_all_are():
    ids = [str(i) for i in range(1, 21)]
    assert split_ids(ids, 3) == spec_split(ids, 3)
    mixed = ids + ["x7"]
    order = sorted(mixed)
    random.seed(3)
    random.shuffle(order)
    assert split_ids(mixed, 3) == (order[:10], order[10:])


def generic_folder(tmp_path):
    src = tmp_path / "mine"
    (src / "outputs").mkdir(parents=True)
    write_jsonl(src / "questions.jsonl", [
        {"id": "q1", "question": "Pick B", "choices": ["a", "b", "c"], "answer": "B",
         "category": "easy"},
        {"id": "q2", "question": "Six times seven?", "answer": 42, "category": "math"},
        {"id": "q3", "question": "Pick the third", "choices": ["a", "b", "c"], "answer": "c"},
        {"id": "q4", "question": "Capital of France?", "answer": "Paris", "category": "easy",
         "meta": {"source": "me"}},
    ])
    write_jsonl(src / "outputs" / "m1.jsonl", [  # recorded answers, used as they are
        {"id": "q1", "text": "...", "answer": "B"},
        {"id": "q2", "text": "...", "answer": 42},
        {"id": "q3", "text": "The answer is (C).", "answer": None},  # recorded: no answer
        {"id": "q4", "text": "...", "answer": "paris", "completion_tokens": 7},
    ])
    write_jsonl(src / "outputs" / "m2.jsonl", [  # no answer key: extracted as for a live model
        {"id": "q4", "text": "Answer: Paris."},
        {"id": "q3", "text": "The answer is (C)."},
        {"id": "q2", "text": "That makes #### 41"},
        {"id": "q1", "text": "The answer is (A)."},
    ])
    return src


def test_generic_format(tmp_path):
    src, out = generic_folder(tmp_path), tmp_path / "pool"
    summary = build_pool(src, out)
    assert summary["format"] == "generic" and summary["questions"] == 4
    train, test = split_ids(["q1", "q2", "q3", "q4"], 0)
    assert [q["id"] for q in lines(out / "train.jsonl")] == train
    assert [q["id"] for q in lines(out / "test.jsonl")] == test
    qs = {q["id"]: q for q in lines(out / "train.jsonl") + lines(out / "test.jsonl")}
    assert qs["q2"] == {"id": "q2", "question": "Six times seven?", "answer": "42",
                        "category": "math"}
    assert qs["q4"]["meta"] == {"source": "me"} and "category" not in qs["q3"]
    assert lines(out / "replay" / "m1.jsonl")[3] == {"id": "q4", "text": "...", "answer": "paris",
                                                     "completion_tokens": 7}
    assert lines(out / "replay" / "m1.jsonl")[1]["answer"] == "42"
    assert lines(out / "replay" / "m2.jsonl")[0] == {"id": "q4", "text": "Answer: Paris."}
    right = {"m1": {"q1", "q2", "q4"}, "m2": {"q3", "q4"}}  # as coe eval grades them
    expected = {m: round(len(right[m] & set(train)) / 2, 4) for m in right}
    assert summary["strength"] == expected
    pool = yaml.safe_load((out / "experts.yaml").read_text())
    assert all("params" not in e for e in pool["experts"])
    cats = {q["category"] for q in qs.values() if q["id"] in train and "category" in q}
    assert set(pool["categories"]) == cats | {"default"}


def test_experts_subset_in_the_order_given(tmp_path):
    src, out = mmlu_pro_folder(tmp_path), tmp_path / "pool"
    build_pool(src, out, experts="beta,Yi-*")
    pool = yaml.safe_load((out / "experts.yaml").read_text())
    assert [e["name"] for e in pool["experts"]] == ["beta", "Yi-6b-Chat"]
    assert sorted(p.name for p in (out / "replay").iterdir()) == ["Yi-6b-Chat.jsonl", "beta.jsonl"]
    # a pattern matching several keeps the pool order; repeats are dropped
    build_pool(src, tmp_path / "p2", experts=["*a", "alpha"])
    pool = yaml.safe_load((tmp_path / "p2" / "experts.yaml").read_text())
    assert [e["name"] for e in pool["experts"]] == ["alpha", "beta"]


def test_each_mmlu_pro_model_is_graded_on_its_own_version_of_a_question(tmp_path):
    """Published MMLU-Pro outputs of different models hold a few questions in different
    versions (the shared data: 3 with another gold answer): a model's recorded pred is graded
    against the question it was asked."""
    src = mmlu_pro_folder(tmp_path)
    recs = json.loads((src / "beta.json").read_text())
    train, _ = spec_split([str(i) for i in IDS])
    i = int(train[0])
    recs[i - 1]["answer"] = recs[i - 1]["pred"] = "D" if gold(i) != "D" else "A"
    (src / "beta.json").write_text(json.dumps(recs))
    notes = []
    summary = build_pool(src, tmp_path / "pool", log=notes.append)
    assert summary["strength"]["beta"] == round(
        (sum(bool(RIGHT["beta"](int(t))) for t in train) + (not RIGHT["beta"](i))) / 6, 4)
    assert any("beta.json states 1 question otherwise" in n and "1 with another gold" in n
               for n in notes)
    assert lines(tmp_path / "pool" / "train.jsonl")[0]["answer"] == gold(i)  # the first file's


@pytest.mark.parametrize("case, fragments", [
    ("empty folder", ["no recorded outputs", "expected MMLU-Pro .zip or .json files"]),
    ("bad output line", ["outputs/m2.jsonl:2: field 'text': missing"]),
    ("bad question line", ["questions.jsonl:3: field 'choices'"]),
    ("bad mmlu-pro record", ["beta.json: record 4: field 'question'"]),
    ("missing model file", ["--experts 'gamma': no recorded outputs of that model",
                            "have: Yi-6b-Chat, alpha, beta"]),
    ("mismatched ids", ["beta.json: model 'beta' does not answer the same 12 question ids as "
                        "model_outputs_Yi-6b-Chat_5shots.zip: 2 missing (e.g. '11'), "
                        "1 not in it (e.g. '99')"]),
    ("unknown question in generic", ["m1.jsonl: model 'm1' does not answer the same 4 question "
                                     "ids", "1 missing (e.g. 'q4')"]),
    ("ungradable gold", ["questions.jsonl:1: gold answer 'E' is not one of the 3 choices"]),
    ("bad params", ["--params 'beta=big': expected NAME=BILLIONS"]),
])
def test_errors_are_one_line_and_leave_no_pool(tmp_path, case, fragments):
    args = []
    if case == "empty folder":
        src = tmp_path / "empty"
        src.mkdir()
    elif case in ("bad output line", "bad question line", "unknown question in generic",
                  "ungradable gold"):
        src = generic_folder(tmp_path)
        qpath, m1, m2 = src / "questions.jsonl", src / "outputs/m1.jsonl", src / "outputs/m2.jsonl"
        if case == "bad output line":
            m2.write_text(m2.read_text().replace('"text": "The answer is (C)."', '"txt": "C"'))
        elif case == "bad question line":
            qpath.write_text(qpath.read_text().replace('["a", "b", "c"], "answer": "c"',
                                                       '"abc", "answer": "c"'))
        elif case == "unknown question in generic":
            m1.write_text("".join(m1.read_text().splitlines(keepends=True)[:3]))
        else:
            qpath.write_text(qpath.read_text().replace('"answer": "B"', '"answer": "E"'))
    else:
        src = mmlu_pro_folder(tmp_path)
        beta = src / "beta.json"
        recs = json.loads(beta.read_text())
        if case == "bad mmlu-pro record":
            del recs[3]["question"]
        elif case == "mismatched ids":
            recs = recs[:10] + [{**recs[0], "question_id": 99}]
        elif case == "missing model file":
            args = ["--experts", "beta,gamma"]
        else:
            args = ["--params", "beta=big"]
        beta.write_text(json.dumps(recs))
    out = tmp_path / "pool"
    proc = coe("pool", src, "-o", out, "-q", *args)
    one_line_error(proc, 2, *fragments)
    assert not (out / "experts.yaml").exists()
    assert not out.exists() or not [p for p in (out / "replay").iterdir()]


def test_a_failed_build_keeps_the_earlier_pool(tmp_path):
    src, out = mmlu_pro_folder(tmp_path), tmp_path / "pool"
    build_pool(src, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    recs = json.loads((src / "beta.json").read_text())
    (src / "beta.json").write_text(json.dumps(recs[:-1]))
    with pytest.raises(PoolSourceError, match="1 missing"):
        build_pool(src, out)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_cli_pool_then_eval(tmp_path):
    src, out = mmlu_pro_folder(tmp_path), tmp_path / "pool"
    p = coe("pool", src, "-o", out, "--params", "alpha=7,beta=1.5", "--top-per-category", "2")
    assert p.returncode == 0, p.stderr
    assert "3 replay experts, 12 mmlu-pro questions (train 6, test 6)" in p.stderr
    assert "read model_outputs_alpha_5shots.json" in p.stderr
    rows = [ln.split() for ln in p.stdout.splitlines()[1:]]
    strength = {e["name"]: e["strength"]
                for e in yaml.safe_load((out / "experts.yaml").read_text())["experts"]}
    assert [r[0] for r in rows] == sorted(strength, key=lambda m: -strength[m])  # strongest first
    assert {r[0]: r[2] for r in rows} == {"Yi-6b-Chat": "6.1B", "alpha": "7B", "beta": "1.5B"}

    rep = tmp_path / "rep"
    e = coe("eval", out / "test.jsonl", "-c", out / "experts.yaml", "--validation",
            out / "train.jsonl", "-s", "single:*,best-single,all+vote", "-o", rep, "-q",
            "--no-plots")
    assert e.returncode == 0, e.stderr
    _, test = spec_split([str(i) for i in IDS])
    scores = {s["name"]: s for s in json.loads((rep / "report.json").read_text())["strategies"]}
    for m in RIGHT:
        assert scores[f"single:{m}"]["correct"] == sum(bool(RIGHT[m](int(i))) for i in test)
        assert scores[f"single:{m}"]["n"] == 6
    assert scores["all+vote"]["n"] == 6 and "best-single" in scores


def test_the_pool_table_rounds_each_accuracy_once(tmp_path):
    """14 right of 17 is 82.35...%: 82.4 %, not 82.3 % (the yaml's four-place 0.8235 shown
    again as a percentage)."""
    from tests.support.cli import coe

    src = tmp_path / "mine"
    (src / "outputs").mkdir(parents=True)
    ids = [f"q{i}" for i in range(34)]
    train, _ = split_ids(ids, 0)
    assert len(train) == 17
    write_jsonl(src / "questions.jsonl", [{"id": i, "question": f"Pick B ({i})",
                                           "choices": ["a", "b"], "answer": "B"} for i in ids])
    wrong_on = set(train[:3])
    write_jsonl(src / "outputs" / "m1.jsonl", [
        {"id": i, "text": "...", "answer": "A" if i in wrong_on else "B"} for i in ids])
    p = coe("pool", src, "-o", tmp_path / "pool", "-q")
    assert p.returncode == 0, p.stderr
    row = next(line for line in p.stdout.splitlines() if line.startswith("m1 "))
    assert row.split()[1] == "82.4%", p.stdout
