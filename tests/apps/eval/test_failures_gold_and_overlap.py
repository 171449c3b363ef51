"""Issue 14, evaluation: failed experts, ungradable gold answers, validation overlapping the test.

- 8: ``coe eval`` exits 4 like ``coe run`` when an expert fails (the report is written
  first); a question on which a generation a strategy needed failed is counted in the
  strategy's ``failed`` column and left out of its accuracy, not scored as a wrong answer.
- 9: a multiple-choice gold answer written as the text of a choice is mapped to its letter;
  one that names no choice is reported as not gradable, by ``coe eval`` and by ``coe run``.
- 10: ``--validation`` that shares questions (by id or text) with the test set is warned
  about, and the overlap is in the report.

Replay pools only (tests/test_eval.py's hand-checked pool), so everything here is fast.
"""

from __future__ import annotations

import json

import pytest

from coe.apps.eval.job import run_eval_job
from coe.core.types import Question
from coe.text import answers
from coe.text.answers import gold_answer, is_correct
from tests.apps.eval.test_eval import acc, job, make_pool
from tests.conftest import write_jsonl
from tests.support.openai_server import run_cli

PLANETS = ["Mars", "Jupiter", "Venus", "Earth"]


def _broken_pool(tmp_path, recorded: str = "ABCD"):
    """The hand-checked pool plus expert 'broken', whose records cover only the first
    ``len(recorded)`` test and validation questions: it fails on the others."""
    records = [{"id": f"{p}{i}", "text": f"The answer is ({letter})."}
               for p in ("q", "v") for i, letter in enumerate(recorded)]
    write_jsonl(tmp_path / "broken.jsonl", records)
    return make_pool(tmp_path, extra_experts=[
        {"name": "broken", "backend": "replay", "model": "broken.jsonl", "params": 1.0}])


# -- 8. failed experts ---------------------------------------------------------------------

def test_failed_generations_are_counted_apart_not_scored_wrong(tmp_path):
    cfg, test, val = _broken_pool(tmp_path)  # broken: right on q0-q3, fails on q4-q7
    r = job(cfg, test, val, strategies="single:*,all+vote,oracle,best-single")
    s = r.score("single:broken")
    # 4 answered (all right), 4 failed: 100 % on 4, not 50 % on 8
    assert (s.overall.correct, s.overall.n, s.failed_questions) == (4, 4, 4)
    assert s.to_json()["failed_questions"] == 4 and s.to_json()["failed_generations"] == 4
    assert acc(r, "single:a") == (6, 8) and r.score("single:a").failed_questions == 0
    # every strategy that used broken's generation on q4-q7 leaves those questions out
    assert r.score("all+vote").failed_questions == 4 and r.score("all+vote").overall.n == 4
    assert r.score("oracle").failed_questions == 4
    # on validation broken is right on v0-v3 like b; the tie goes to b's yaml strength
    assert r.best_single == "b" and r.validation_accuracy["broken"].value == 1.0
    outcomes = {o.question_id: o for o in r.outcomes["single:broken"]}
    assert outcomes["q5"].failed and outcomes["q5"].correct is None
    assert not outcomes["q1"].failed and outcomes["q1"].correct is True
    assert r.stats.failures["broken"] == "no recorded response for question 'q4'"


def test_an_expert_failing_on_every_question_has_no_accuracy(tmp_path):
    cfg, test, val = _broken_pool(tmp_path, recorded="")
    r = job(cfg, test, val, strategies="single:*,best-single")
    s = r.score("single:broken")
    assert (s.overall.n, s.overall.value, s.failed_questions) == (0, None, 8)
    assert r.best_single == "b"  # failing on all validation questions, broken is not picked
    assert r.validation_accuracy["broken"].n == 0 and r.validation_failed == {"broken": 4}


def test_best_single_is_not_an_expert_that_failed_on_validation(tmp_path):
    # broken: right on v0 and v1, fails on v2 and v3; b is right on all four. broken's
    # validation accuracy is 2 of 2 answered, but with its failures it is 2 of 4: b is picked
    cfg, test, val = _broken_pool(tmp_path, recorded="AB")
    r = job(cfg, test, val, strategies="best-single")
    assert r.validation_accuracy["broken"].value == 1.0 and r.validation_failed == {"broken": 2}
    assert r.best_single == "b" and r.score("best-single").failed_questions == 0


def test_cli_eval_exits_4_after_writing_the_report(tmp_path):
    cfg, test, val = _broken_pool(tmp_path)
    out = tmp_path / "rep"
    p = run_cli("eval", test, "-c", cfg, "--validation", val, "-o", out, "-q", "--no-plots",
                "-s", "single:*,all+vote")
    assert p.returncode == 4, p.stderr
    assert "expert 'broken' failed: no recorded response for question 'q4'" in p.stderr
    # the table: accuracy on the 4 answered questions, and the 4 failed ones in their column
    assert "| single:broken | 100.0 | [51.0, 100.0] | 4 | 4 |" in p.stdout
    assert "| single:a | 75.0 | [40.9, 92.9] | 8 | 0 |" in p.stdout
    assert "failed" in p.stdout.splitlines()[0]
    data = json.loads((out / "report.json").read_text())
    by = {s["name"]: s for s in data["strategies"]}
    assert by["single:broken"]["failed_questions"] == 4 and by["single:broken"]["n"] == 4
    assert data["failures"] == {"broken": "no recorded response for question 'q4'"}
    rows = [json.loads(x) for x in (out / "outcomes.jsonl").read_text().splitlines()]
    assert rows[4]["strategies"]["single:broken"]["failed"] is True
    assert rows[0]["strategies"]["single:broken"]["failed"] is False


# -- 9. gold answers that name a choice by its text, or name no choice -------------------

@pytest.mark.parametrize("gold, letter", [
    ("B", "B"), ("(b)", "B"), ("Jupiter", "B"), ("  jupiter. ", "B"), ("B. Jupiter", "B"),
    ("(D) Earth", "D"), ("E", None), ("Pluto", None), ("C. Jupiter", None),
])
def test_multiple_choice_gold_as_letter_or_choice_text(gold, letter):
    q = Question(id="1", question="Largest planet?", choices=PLANETS, answer=gold)
    assert gold_answer(q) == letter
    if letter is None:
        problem = answers.gold_problem(q)
        assert problem and repr(gold.strip()) in problem and "4 choices" in problem
        assert is_correct("B", q) is None
    else:
        assert answers.gold_problem(q) is None and is_correct(letter, q) is True


def test_gold_problems_other_kinds_and_ambiguous_text():
    assert answers.gold_problem(Question(id="1", question="q")) is None  # no gold: nothing to grade
    twin = Question(id="2", question="q", choices=["yes", "no", "Yes"], answer="yes")
    assert gold_answer(twin) is None and "choices A, C" in answers.gold_problem(twin)
    number = Question(id="3", question="q", kind="number", answer="many")
    assert gold_answer(number) is None and "'many'" in answers.gold_problem(number)
    # numeric choices: the gold may be the number itself
    assert gold_answer(Question(id="4", question="q", choices=["3", "5", "7"], answer="7")) == "C"


def _ungradable_test(tmp_path, test):
    """The test file with q1's gold written as its choice's text ('x' is B) and q7's gold
    'E', a letter outside its four choices."""
    rows = [json.loads(x) for x in test.read_text().splitlines()]
    rows[1]["answer"], rows[7]["answer"] = "x", "E"
    return write_jsonl(tmp_path / "test_text_gold.jsonl", rows)


def test_eval_maps_choice_text_and_reports_what_cannot_be_graded(tmp_path):
    cfg, test, val = make_pool(tmp_path)
    test = _ungradable_test(tmp_path, test)
    r, _, _ = run_eval_job(test, cfg, out_dir=tmp_path / "rep", validation=val, plots=False,
                           cache=False, strategies="single:*")
    # a is right on q0-q5 (q1 included, graded as B now); q7 is left out: 6 of 7
    assert acc(r, "single:a") == (6, 7)
    assert r.ungraded == {"q7": "gold answer 'E' is not one of the 4 choices (A-D) "
                                "nor the text of one"}
    from coe.apps.eval.report import summary_lines

    assert any(line.startswith("1 of 8 test questions could not be graded (q7: gold answer 'E'")
               for line in summary_lines(r))
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert data["ungraded"] == {"q7": r.ungraded["q7"]} and data["graded_questions"] == 7


def test_cli_run_accuracy_counts_choice_text_gold_and_says_what_is_not_graded(tmp_path):
    cfg, test, _ = make_pool(tmp_path)
    test = _ungradable_test(tmp_path, test)
    out = tmp_path / "answers.jsonl"
    p = run_cli("run", test, "-c", cfg, "--router", "all", "-o", out, "-q")
    assert p.returncode == 0, p.stderr
    # all+vote: right on q0-q3, q5, q6; q4 wrong; q7 not graded -> 6 of 7 (was 5 of 6)
    assert "accuracy against gold: 85.7% (7 graded questions); 1 question could not be " \
           "graded (q7: gold answer 'E' is not one of the 4 choices (A-D) nor the text of one)" \
           in p.stderr
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["q1"]["gold"] == "B" and rows["q1"]["correct"] is True
    assert rows["q7"]["gold"] is None and rows["q7"]["correct"] is None


# -- 10. validation overlapping the test set ---------------------------------------------

def test_validation_equal_to_the_test_file_is_warned_about(tmp_path):
    cfg, test, _ = make_pool(tmp_path)
    out = tmp_path / "rep"
    p = run_cli("eval", test, "-c", cfg, "--validation", test, "-o", out, "-q", "--no-plots",
                "-s", "best-single,all+vote")
    assert p.returncode == 0, p.stderr
    warning = [ln for ln in p.stderr.splitlines() if ln.startswith("warning:")]
    assert warning == [f"warning: the validation questions ({test}) overlap the test set: "
                       "8 of the 8 test questions (same id: 8, same text: 8); best-single "
                       "and the recommendation are chosen partly on the test questions"]
    data = json.loads((out / "report.json").read_text())
    assert data["validation"]["overlap"] == {
        "questions": 8, "same_id": 8, "same_text": 8,
        "ids": [f"q{i}" for i in range(8)], "duplicates": 0, "repeated_within": 0}
    assert warning[0] in (out / "report.md").read_text()


def test_validation_overlap_by_text_or_by_id(tmp_path):
    cfg, test, val = make_pool(tmp_path)
    rows = [json.loads(x) for x in val.read_text().splitlines()]
    rows[0]["question"] = " test  QUESTION 3? "  # q3's text, another id and spacing
    rows[1]["id"] = "q5"  # q5's id, another text
    val = write_jsonl(tmp_path / "val_overlap.jsonl", rows)
    r = job(cfg, test, val, strategies="best-single")
    assert r.validation_overlap == {"questions": 2, "same_id": 1, "same_text": 1,
                                    "ids": ["q3", "q5"], "duplicates": 0, "repeated_within": 0}
    assert any(n.startswith("warning: the validation questions") for n in r.notes)
    clean = job(cfg, test, make_pool(tmp_path)[2], strategies="best-single")
    assert clean.validation_overlap["questions"] == 0
    assert not any(n.startswith("warning:") for n in clean.notes)


def test_duplicates_in_the_data_are_reported_as_duplicates_not_overlap(tmp_path):
    """MMLU-Pro holds 159 questions twice under two ids: a seeded split puts some pairs on
    both sides. When the data repeats questions within a side too, a test question whose
    text and choices a validation question repeats under another id is a duplicate of the
    data (a note, counted apart), not overlap of the split (no warning)."""
    cfg, test, val = make_pool(tmp_path)
    tests = [json.loads(x) for x in test.read_text().splitlines()]
    tests[1]["question"] = tests[0]["question"]  # the test set repeats q0 as q1
    test = write_jsonl(tmp_path / "test_dup.jsonl", tests)
    rows = [json.loads(x) for x in val.read_text().splitlines()]
    rows[0]["question"], rows[0]["choices"] = tests[3]["question"], tests[3]["choices"]
    val = write_jsonl(tmp_path / "val_dup.jsonl", rows)  # v0 repeats q3 under its own id
    r = job(cfg, test, val, strategies="best-single")
    assert r.validation_overlap == {"questions": 0, "same_id": 0, "same_text": 1, "ids": [],
                                    "duplicates": 1, "repeated_within": 1}
    assert not any(n.startswith("warning:") for n in r.notes)
    assert any(n.startswith("note: 1 test question repeats") and "duplicates in the data" in n
               for n in r.notes), r.notes


def test_validation_overlap_not_checked_without_best_single(tmp_path):
    cfg, test, _ = make_pool(tmp_path)
    r = job(cfg, test, test, strategies="single:*")  # validation unused: nothing to warn of
    assert not any(n.startswith("warning:") for n in r.notes)
