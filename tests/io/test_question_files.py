import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coe.core.errors import InputError
from coe.io.questions import load_questions
from tests.conftest import write_jsonl


def test_jsonl_with_all_fields(tmp_path):
    p = write_jsonl(tmp_path / "q.jsonl", [
        {"id": 1, "question": "2+2?", "answer": 4},
        {"id": "b", "question": "Pick", "choices": ["x", "y"], "answer": "B", "category": "math"},
    ])
    qs = load_questions(p).questions
    assert [q.id for q in qs] == ["1", "b"]
    assert qs[0].answer_kind == "number" and qs[1].answer_kind == "mc"


def test_gsm8k_and_mmlu_pro_field_names(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [
        {"question": "Sum?", "answer": "3 + 4 = 7\n#### 1,007"},
        {"question_id": 70, "question": "Q", "options": ["a", "b", "c"], "answer": "C",
         "category": "law", "src": "x"},
    ])
    g, m = load_questions(p).questions
    assert g.answer == "1007" and g.kind == "number" and g.id == "1"
    assert m.id == "70" and m.choices == ["a", "b", "c"] and m.meta == {"src": "x"}


def test_a_utf8_bom_is_accepted_in_every_format(tmp_path):
    """Windows editors write one (Notepad, Excel's "CSV UTF-8"): it is no part of the data."""
    records = [{"id": "a", "question": "Café?", "answer": "yes"}]
    bom = b"\xef\xbb\xbf"
    files = {"q.json": json.dumps(records).encode(), "q.jsonl": json.dumps(records[0]).encode(),
             "q.csv": "id,question,answer\na,Café?,yes\n".encode()}
    for name, data in files.items():
        (tmp_path / name).write_bytes(bom + data)
        (q,) = load_questions(tmp_path / name).questions
        assert (q.id, q.question, q.answer) == ("a", "Café?", "yes"), name


def test_csv_with_header_and_headerless_mmlu(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text("id,question,A,B,C,answer\n1,Red?,yes,no,maybe,A\n2,Blue?,x,y,,B\n")
    qs = load_questions(p).questions
    assert qs[0].choices == ["yes", "no", "maybe"] and qs[1].choices == ["x", "y"]
    h = tmp_path / "mmlu.csv"
    h.write_text('"What is 1+1?",1,2,3,4,B\n')
    (q,) = load_questions(h).questions
    assert q.choices == ["1", "2", "3", "4"] and q.answer == "B"


@pytest.mark.parametrize("content, expected", [
    (b"", "no questions (empty file)"),
    (b'{"question": "ok"}\n{"question": \n', ":2: invalid JSON"),
    (b'{"id": "x"}\n', ":1: field 'question': missing"),
    (b'{"id": 1, "question": "a"}\n{"id": 1, "question": "b"}\n', ":2: duplicate id '1' (first on line 1)"),
    (b'{"question": ["not", "text"]}\n', ":1: field 'question': Input should be a valid string"),
    (b'{"question": "q", "choices": "abc"}\n', ":1: field 'choices'"),
    (b'{"question": "caf\xe9"}\n', ":1: not valid UTF-8"),
    (b'[1, 2]\n', ":1: expected a JSON object"),
    (b'{"question": "' + b"x" * (2 << 20) + b'"}\n', ":1: line is over the 1,048,576-byte limit"),
])
def test_bad_jsonl_is_one_line_naming_file_and_line(tmp_path, content, expected):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(InputError) as e:
        load_questions(p)
    assert expected in str(e.value) and str(p) in str(e.value) and "\n" not in str(e.value)


def test_csv_missing_columns(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("id,question,A,B,answer\n1,Q?,a,b,A\n2,Q2?,a\n")
    with pytest.raises(InputError, match=r"bad.csv:3: expected 5 columns, got 3"):
        load_questions(p)


def test_skip_invalid_reports_and_keeps_good_lines(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b'{"question": "good"}\nnot json\n{"id": "x"}\n{"question": "good too"}\n')
    report = load_questions(p, skip_invalid=True)
    assert [q.question for q in report.questions] == ["good", "good too"]
    assert len(report.skipped) == 2 and ":2: invalid JSON" in report.skipped[0]


record = st.fixed_dictionaries(
    {"question": st.text(min_size=1).filter(lambda s: s.strip())},
    optional={"id": st.one_of(st.integers(0, 10**6), st.text(min_size=1, max_size=8)),
              "choices": st.lists(st.text(max_size=20), min_size=1, max_size=10),
              "answer": st.one_of(st.integers(), st.text(max_size=10)),
              "category": st.text(max_size=10)})


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(record, min_size=1, max_size=8, unique_by=lambda r: str(r.get("id", id(r)))))
def test_property_valid_records_round_trip(tmp_path, recs):
    # ids default to the line number; give explicit ids that cannot clash with those
    recs = [{**r, "id": f"id-{r['id']}"} if "id" in r else r for r in recs]
    p = write_jsonl(tmp_path / "p.jsonl", recs)
    qs = load_questions(p).questions
    assert [q.question for q in qs] == [r["question"] for r in recs]
    assert all(q.choices == r.get("choices") for q, r in zip(qs, recs))


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300))
def test_property_arbitrary_bytes_never_crash(tmp_path, data):
    p = tmp_path / "fuzz.jsonl"
    p.write_bytes(data)
    try:
        report = load_questions(p, skip_invalid=True)
    except InputError as e:  # the only failure a user may see: one line, naming the file
        assert str(p) in str(e) and "\n" not in str(e)
    else:
        assert all(q.question.strip() for q in report.questions)
        json.dumps([q.model_dump() for q in report.questions])


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_property_arbitrary_csv_never_crashes(tmp_path, text):
    p = tmp_path / "fuzz.csv"
    p.write_text(text, encoding="utf-8")
    try:
        load_questions(p, skip_invalid=True)
    except InputError as e:
        assert str(p) in str(e) and "\n" not in str(e)
