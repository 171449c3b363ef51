"""Final-answer extraction and normalisation: the one place that decides what an expert answered.

Voting compares normalised answers; evaluation compares them with the gold answer.
- multiple choice: a letter A..Z ("The answer is (C)", "Answer: c", or the text of one choice)
- number: canonical decimal ("#### 1,200" -> "1200", "3.50" -> "3.5", "\\boxed{7}" -> "7")
- text: lower-case, articles and punctuation removed, white space folded
- JSON (a request with a JSON ``response_format``): the canonical JSON, when it parses and
  validates against the request's schema
- free text (``kind: free``, or an open request whose answers carry no final-answer line:
  ``free_text``): the whole response, stripped; it is compared by meaning
  (``coe.aggregation.consensus``), never normalised, and not graded by matching a gold answer
  (a judge or recorded judgements grade it)

Gold answers go through the same normalisation (``gold_answer``); a multiple-choice gold may
also be the text of a choice. One that names no answer of its question is not graded, and
``gold_problem`` says why, so a score can say how many questions it left out.
"""

from __future__ import annotations

import json
import re
import string
from decimal import Decimal

from coe.core.types import (
    LETTERS,
    AnswerKind,
    ExpertResponse,
    Generation,
    Question,
    ResponseFormat,
    parse_number,
)

_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_NUM_RE = re.compile(_NUM)
_NEXT_QUESTION = re.compile(r"\n\s*Question\s*:")
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.S)


def _canonical_number(d: Decimal) -> str:
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def normalize(answer: str | None, kind: AnswerKind, n_choices: int = len(LETTERS)) -> str | None:
    if answer is None:
        return None
    a = answer.strip()
    if not a:
        return None
    if kind == "free":
        return a
    if kind == "mc":
        m = re.fullmatch(r"\(?([A-Za-z])[\).:]?", a)
        if m and m.group(1).upper() in LETTERS[:n_choices]:
            return m.group(1).upper()
        return None
    if kind == "number":
        m = _NUM_RE.search(a)
        d = parse_number(m.group(0)) if m else None
        return _canonical_number(d) if d is not None else None
    d = parse_number(a)
    if d is not None:
        return _canonical_number(d)
    t = a.lower().strip().strip(string.punctuation + " ")
    t = re.sub(r"\b(a|an|the)\b", " ", t)
    t = "".join(ch for ch in t if ch not in string.punctuation)
    return " ".join(t.split()) or None


_MC_PATTERNS = [
    r"answer is:?\s*\(?([A-Z])\b\)?",
    r"answer:\s*\**\(?([A-Z])\b\)?",
    r"\\boxed\{\(?([A-Z])\)?\}",
    r"^\s*\(?([A-Z])\)?(?:[\.\):]|\s*$)",  # the response starts with the letter
]


def _extract_mc(text: str, choices: list[str]) -> str | None:
    letters = LETTERS[: len(choices)]
    for pat in _MC_PATTERNS:
        hits = [h.upper() for h in re.findall(pat, text, flags=re.IGNORECASE | re.MULTILINE)]
        hits = [h for h in hits if h in letters]
        if hits:
            return hits[-1]
    # The text of exactly one choice appears in the response.
    low = text.lower()
    found = [letters[i] for i, ch in enumerate(choices) if ch.strip() and ch.strip().lower() in low]
    if len(found) == 1:
        return found[0]
    hits = [h for h in re.findall(r"\(([A-Z])\)", text) if h in letters]
    return hits[-1] if hits else None


def _extract_number(text: str) -> str | None:
    for pat in (r"####\s*(" + _NUM + ")", r"\\boxed\{\s*(" + _NUM + r")\s*\}",
                r"answer is:?\s*\**\s*(" + _NUM + ")", r"answer:\s*\**\s*(" + _NUM + ")"):
        hits = re.findall(pat, text, flags=re.IGNORECASE)
        if hits:
            return hits[-1]
    hits = _NUM_RE.findall(text)
    return hits[-1] if hits else None


def _extract_text(text: str) -> str | None:
    hits = re.findall(r"answer(?: is)?:?\s*(.+)", text, flags=re.IGNORECASE)
    if hits:
        return hits[-1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else None


def parse_json(text: str) -> object:
    """The JSON value of a response: the whole text, or the inside of a fenced code block
    (a model answering JSON without a grammar often fences it). Raises ValueError."""
    t = text.strip()
    m = _FENCE.fullmatch(t)
    return json.loads(m.group(1) if m else t)


def json_answer(text: str, fmt: ResponseFormat) -> str | None:
    """The canonical JSON (keys sorted, no spaces) of a response that a JSON
    ``response_format`` asked for: None unless it parses, is an object (``json_object``) and
    validates against the schema (``json_schema``). Votes compare these, so key order and
    spacing do not split them."""
    try:
        value = parse_json(text)
    except ValueError:
        return None
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    if fmt.type == "json_object" and not isinstance(value, dict):
        return None
    if fmt.type == "json_schema" and schema:
        import jsonschema

        try:
            jsonschema.validate(value, schema)
        except (jsonschema.ValidationError, jsonschema.SchemaError):
            return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def extract_answer(text: str | None, question: Question) -> str | None:
    """The normalised final answer in a response, or None if there is none (a request that
    asks for JSON: its canonical JSON, see ``json_answer``)."""
    if not text or not text.strip():
        return None
    fmt = question.response_format
    if fmt is not None and fmt.wants_json:
        return json_answer(text, fmt)
    kind = question.answer_kind
    if kind == "free":
        return text.strip()
    text = _NEXT_QUESTION.split(text, 1)[0]  # a base model may go on to invent the next question
    if kind == "mc":
        raw = _extract_mc(text, question.choices or list(LETTERS))
        return normalize(raw, "mc", len(question.choices or LETTERS))
    if kind == "number":
        return normalize(_extract_number(text), "number")
    return normalize(_extract_text(text), "text")


#: a final-answer line (or mark) that the short-answer extraction reads
_MARKED = re.compile(r"answer(?: is)?\s*:|####|\\boxed\{", re.IGNORECASE)


def marked(text: str) -> bool:
    """Whether a response carries an explicit final answer ("Answer: ...", "#### 12",
    "\\boxed{7}")."""
    return bool(_MARKED.search(text))


def free_text(question: Question, texts: list[str]) -> bool:
    """Whether a question's answers are free text: declared (``kind: free``), or an open
    request (``Question.open``: asked as a chat, nothing to grade against) whose answers
    mostly carry no explicit final answer to extract."""
    if question.kind == "free":
        return True
    if not question.open:
        return False
    said = [t for t in texts if t and t.strip()]
    return bool(said) and 2 * sum(marked(t) for t in said) < len(said)


def _choice_key(text: str) -> str:
    """A choice's text for matching a gold answer to it: case, surrounding punctuation and
    white space do not count."""
    return " ".join(text.casefold().strip().strip(string.punctuation + " ").split())


def _grade_gold(question: Question) -> tuple[str | None, str | None]:
    """(the normalised gold answer, None) or (None, why it cannot be graded)."""
    gold = question.answer.strip()
    kind = question.answer_kind
    if kind == "mc" and question.choices:
        choices = question.choices
        letters = LETTERS[: len(choices)]
        letter = normalize(gold, "mc", len(choices))
        if letter is not None:
            return letter, None
        # the text of a choice ("Jupiter"), or a letter with its choice's text ("B. Jupiter")
        key = _choice_key(gold)
        same = [letters[i] for i, c in enumerate(choices) if key and _choice_key(c) == key]
        if len(same) == 1:
            return same[0], None
        m = re.fullmatch(r"\(?([A-Za-z])[\).:]?\s+(.+)", gold, flags=re.DOTALL)
        if not same and m and m.group(1).upper() in letters:
            i = letters.index(m.group(1).upper())
            if _choice_key(m.group(2)) == _choice_key(choices[i]):
                return letters[i], None
        if same:
            return None, (f"gold answer {gold!r} is the text of more than one choice "
                          f"(choices {', '.join(same)})")
        return None, (f"gold answer {gold!r} is not one of the {len(choices)} choices "
                      f"(A-{letters[-1]}) nor the text of one")
    norm = normalize(gold, kind, len(question.choices or LETTERS))
    if norm is not None:
        return norm, None
    if kind == "number":
        return None, f"gold answer {gold!r} is not a number"
    if kind == "mc":
        return None, f"gold answer {gold!r} is not a letter"
    return None, f"gold answer {question.answer!r} is empty once normalised"


def gold_answer(question: Question) -> str | None:
    """The question's gold answer, normalised like an extracted one. A multiple-choice gold
    may be the letter or the text of a choice (mapped to its letter; a letter wins over a
    choice whose text is that letter). None when there is no gold answer or it cannot be
    graded (``gold_problem`` says why)."""
    if question.answer is None or not question.answer.strip() or question.answer_kind == "free":
        return None
    return _grade_gold(question)[0]


def gold_problem(question: Question) -> str | None:
    """Why the question's gold answer cannot be graded (one line naming the answer), or None
    when it can be or there is none."""
    if question.answer is None or not question.answer.strip() or question.answer_kind == "free":
        return None
    return _grade_gold(question)[1]


def describe_ungraded(ungraded: dict[str, str], show: int = 5) -> str:
    """The first ungradable question with why, then the ids of a few more: for one line."""
    if not ungraded:
        return ""
    (first, why), rest = next(iter(ungraded.items())), list(ungraded)[1:]
    out = f"{first}: {why}"
    if rest:
        out += "; also " + ", ".join(rest[:show])
        if len(rest) > show:
            out += f" and {len(rest) - show} more"
    return out


def is_correct(pred: str | None, question: Question, rel_tol: float = 1e-6) -> bool | None:
    """None when the question has no gold answer."""
    return grade(pred, gold_answer(question), question.answer_kind, rel_tol)


def grade(pred: str | None, gold: str | None, kind: AnswerKind,
          rel_tol: float = 1e-6) -> bool | None:
    """``is_correct`` with the question's ``gold_answer`` and ``answer_kind`` already known
    (an evaluation grades every answer to a question against the same gold)."""
    if gold is None:
        return None
    if pred is None:
        return False
    if kind == "number":
        a, b = parse_number(pred), parse_number(gold)
        if a is None or b is None:
            return False
        return abs(a - b) <= Decimal(str(rel_tol)) * max(abs(b), Decimal(1))
    return pred == gold


def answer_of(gen: Generation, question: Question) -> str | None:
    """The normalised final answer of a generation: None for a failed one; the answer
    recorded with a replayed generation, normalised; else the one extracted from its text."""
    if gen.error:
        return None
    if gen.has_recorded_answer:
        return (normalize(gen.recorded_answer, question.answer_kind,
                          len(question.choices or LETTERS)) if gen.recorded_answer else None)
    return extract_answer(gen.text, question)


def response_from(expert: str, gen: Generation, question: Question) -> ExpertResponse:
    """An expert's generation with its final answer extracted (or the answer recorded with a
    replayed generation, normalised)."""
    return ExpertResponse(expert=expert, text=gen.text, prompt_tokens=gen.prompt_tokens,
                          completion_tokens=gen.completion_tokens, seconds=round(gen.seconds, 4),
                          cached=gen.cached, error=gen.error, answer=answer_of(gen, question),
                          finish_reason=gen.finish_reason,
                          truncated=gen.error is None and gen.finish_reason == "length",
                          truncated_by=gen.truncated_by)
