"""Question files: our JSONL, CSV (with MMLU-style choice columns) and GSM8K JSONL.

Every problem becomes an ``InputError`` naming the file and line. With ``skip_invalid`` the
loader reports bad lines in ``LoadReport.skipped`` and keeps the good ones.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from coe.errors import InputError
from coe.types import LETTERS, AnswerKind, Question

MAX_LINE_BYTES = 1 << 20  # a question line over 1 MiB is almost certainly not a question

__all__ = ["LETTERS", "AnswerKind", "LoadReport", "Question", "load_questions"]


@dataclass
class LoadReport:
    questions: list[Question]
    skipped: list[str] = field(default_factory=list)


# Keys other datasets use for our fields.
_ALIASES = {
    "question_id": "id",
    "qid": "id",
    "options": "choices",
    "gold_answer": "answer",
    "problem": "question",
    "type": "kind",
}


def _from_record(rec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    known = set(Question.model_fields)
    for k, v in rec.items():
        key = _ALIASES.get(k, k)
        if key in known and key not in out:
            out[key] = v
        else:
            meta[k] = v
    ans = out.get("answer")
    if isinstance(ans, str) and "####" in ans:  # GSM8K: reasoning, then '#### 72'
        meta["solution"] = ans
        out["answer"] = ans.rsplit("####", 1)[1].strip().replace(",", "")
        out.setdefault("kind", "number")
    if isinstance(out.get("meta"), dict):
        meta = {**out["meta"], **meta}
    out["meta"] = meta
    return out


def _validation_message(e: ValidationError) -> str:
    first = e.errors()[0]
    fld = ".".join(str(p) for p in first["loc"]) or "record"
    msg = "missing" if first["type"] == "missing" else first["msg"]
    return f"field {fld!r}: {msg}"


class _Collector:
    def __init__(self, path: Path, skip_invalid: bool):
        self.path = path
        self.skip_invalid = skip_invalid
        self.questions: list[Question] = []
        self.skipped: list[str] = []
        self.ids: dict[str, int] = {}

    def fail(self, line: int | None, msg: str) -> None:
        where = f"{self.path}:{line}" if line is not None else str(self.path)
        text = f"{where}: {msg}"
        if not self.skip_invalid:
            raise InputError(text)
        self.skipped.append(text)

    def add(self, line: int, rec: Any) -> None:
        if not isinstance(rec, dict):
            return self.fail(line, f"expected a JSON object, got {type(rec).__name__}")
        data = _from_record(rec)
        data.setdefault("id", str(line))
        try:
            q = Question.model_validate(data)
        except ValidationError as e:
            return self.fail(line, _validation_message(e))
        if q.id in self.ids:
            return self.fail(line, f"duplicate id {q.id!r} (first on line {self.ids[q.id]})")
        self.ids[q.id] = line
        self.questions.append(q)

    def report(self) -> LoadReport:
        if not self.questions:
            detail = f" ({len(self.skipped)} invalid)" if self.skipped else " (empty file)"
            raise InputError(f"{self.path}: no questions{detail}")
        return LoadReport(self.questions, self.skipped)


def _lines(f):
    """Binary lines, never holding more than MAX_LINE_BYTES of one line in memory;
    an over-long line is yielded as None after skipping the rest of it."""
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(MAX_LINE_BYTES)
            yield None
            continue
        yield raw


def _decode(c: _Collector, lineno: int, raw: bytes | None) -> str | None:
    if raw is None:
        c.fail(lineno, f"line is over the {MAX_LINE_BYTES:,}-byte limit")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        c.fail(lineno, f"not valid UTF-8 (byte {e.start + 1})")
        return None


def _load_jsonl(c: _Collector) -> None:
    with open(c.path, "rb") as f:
        for lineno, raw in enumerate(_lines(f), 1):
            text = _decode(c, lineno, raw)
            if text is None or not text.strip():
                continue
            if lineno == 1 and text.startswith("\ufeff"):
                text = text[1:]
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                c.fail(lineno, f"invalid JSON: {e.msg} (column {e.colno})")
                continue
            c.add(lineno, rec)


def _load_json_array(c: _Collector) -> None:
    try:
        data = json.loads(c.path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{c.path}: not valid UTF-8 (byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{c.path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise InputError(f"{c.path}: expected a JSON list of questions")
    for i, rec in enumerate(data, 1):
        c.add(i, rec)


def _choice_columns(header: list[str]) -> list[str]:
    cols = [h for h in header if len(h) == 1 and h.upper() in LETTERS]
    if not cols:
        cols = [h for h in header if h.lower().startswith(("choice", "option"))]
    return cols


def _load_csv(c: _Collector) -> None:
    try:
        text = c.path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = c.path.read_bytes()[: e.start].count(b"\n") + 1
        raise InputError(f"{c.path}:{line}: not valid UTF-8") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        _read_csv_rows(c, rows)
    except csv.Error as e:
        raise InputError(f"{c.path}:{rows.line_num}: malformed CSV: {e}") from None


def _read_csv_rows(c: _Collector, rows) -> None:
    try:
        header = next(rows)
    except StopIteration:
        return
    lower = [h.strip().lower() for h in header]
    if "question" in lower:
        names = [h.strip() for h in header]
        choice_cols = _choice_columns(names)
        for row in rows:
            lineno = rows.line_num
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(names):
                c.fail(lineno, f"expected {len(names)} columns, got {len(row)}")
                continue
            rec = dict(zip(names, row))
            choices = [rec.pop(col) for col in choice_cols]
            choices = [x for x in choices if x.strip()]
            rec = {k.lower(): v for k, v in rec.items() if v != ""}
            if choices:
                rec["choices"] = choices
            c.add(lineno, rec)
        return
    # Headerless MMLU-style rows: question, choice..., answer letter.
    for row in [header, *rows]:
        lineno = rows.line_num if row is not header else 1
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < 4:
            c.fail(lineno, "expected a header with a 'question' column, or: question,A,B,...,answer")
            continue
        c.add(lineno, {"question": row[0], "choices": row[1:-1], "answer": row[-1].strip()})


def load_questions(path: str | Path, skip_invalid: bool = False) -> LoadReport:
    """Read a question file (``.jsonl``, ``.json`` list, or ``.csv``)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: question file not found")
    c = _Collector(p, skip_invalid)
    suffix = p.suffix.lower()
    if suffix == ".csv":
        _load_csv(c)
    elif suffix == ".json":
        _load_json_array(c)
    else:
        _load_jsonl(c)
    return c.report()
