import pytest

from coe.io.questions import Question
from coe.text.answers import extract_answer, is_correct, normalize

MC = Question(id="1", question="q", choices=["Mars", "Jupiter", "Venus", "Earth"], answer="B")
NUM = Question(id="2", question="q", answer="1200")
TEXT = Question(id="3", question="q", answer="The Eiffel Tower")


@pytest.mark.parametrize("text, expected", [
    ("Let's think. The answer is (C).", "C"),
    ("Reasoning...\nAnswer: d", "D"),
    ("B. Jupiter", "B"),
    ("The largest planet is Jupiter.", "B"),  # the text of exactly one choice
    ("The answer is (B).\n\nQuestion: next one... The answer is (A).", "B"),  # cut at next question
    ("I am not sure.", None),
    ("The answer is (Z).", None),  # not a choice of this question
])
def test_multiple_choice(text, expected):
    assert extract_answer(text, MC) == expected


@pytest.mark.parametrize("text, expected", [
    ("so 1,200 in total\n#### 1,200", "1200"),
    ("Answer: $1200.00", "1200"),
    ("\\boxed{1200}", "1200"),
    ("first 3 then 4, the answer is 1200.", "1200"),
    ("3 apples and 7 pears, so 10", "10"),  # last number
    ("-0.50", "-0.5"),
    ("no digits here", None),
])
def test_numbers(text, expected):
    assert extract_answer(text, NUM) == expected


def test_text_answers_are_normalised():
    assert extract_answer("Answer: the Eiffel tower.", TEXT) == "eiffel tower"
    assert is_correct("eiffel tower", TEXT) is True


def test_is_correct_numeric_tolerance_and_no_gold():
    assert is_correct("1200.0000000001", NUM) is True
    assert is_correct("1201", NUM) is False
    assert is_correct(None, NUM) is False
    assert is_correct("A", Question(id="x", question="q")) is None


def test_normalize_kinds():
    assert normalize("(c)", "mc", 4) == "C" and normalize("E", "mc", 4) is None
    assert normalize("1,000", "number") == "1000"
