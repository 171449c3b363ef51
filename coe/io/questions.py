"""Question files: our JSONL, CSV (with MMLU-style choice columns) and GSM8K JSONL.

Every problem becomes an ``InputError`` naming the file and line. With ``skip_invalid`` the
loader reports bad lines in ``LoadReport.skipped`` and keeps the good ones.

``-`` reads standard input (``coe run - < q.jsonl``). A FIFO or pipe (``<(zcat q.jsonl.gz)``)
is read as a stream too, as Unix tools do: it waits for its writer, like ``cat``. A stream's
format is its suffix, else its first character: ``[`` a JSON list, ``{`` JSONL, else CSV.
A directory, a symlink loop, a socket or anything else that is not a file says what it is.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from coe.core.errors import InputError
from coe.core.types import LETTERS, AnswerKind, Question

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
    def __init__(self, path: str, skip_invalid: bool):
        self.path = path  # as shown in messages
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


def _load_jsonl(c: _Collector, f) -> None:
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
        except RecursionError:
            c.fail(lineno, "JSON nested too deeply")
            continue
        c.add(lineno, rec)


def _load_json_array(c: _Collector, f) -> None:
    try:
        data = json.loads(f.read().decode("utf-8-sig"))  # a BOM is no part of the JSON
    except UnicodeDecodeError as e:
        raise InputError(f"{c.path}: not valid UTF-8 (byte {e.start + 1})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{c.path}:{e.lineno}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise InputError(f"{c.path}: JSON nested too deeply") from None
    if not isinstance(data, list):
        raise InputError(f"{c.path}: expected a JSON list of questions")
    for i, rec in enumerate(data, 1):
        c.add(i, rec)


def _choice_columns(header: list[str]) -> list[str]:
    cols = [h for h in header if len(h) == 1 and h.upper() in LETTERS]
    if not cols:
        cols = [h for h in header if h.lower().startswith(("choice", "option"))]
    return cols


def _load_csv(c: _Collector, f) -> None:
    data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
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


_LOADERS = {".csv": _load_csv, ".json": _load_json_array, ".jsonl": _load_jsonl}


def _sniff(f):
    """The loader of a stream without a known suffix, from its first character."""
    if not hasattr(f, "peek"):
        return _load_jsonl
    head = f.peek(4096)[:4096].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head[:1] == b"[":
        return _load_json_array
    if head[:1] in (b"{", b""):
        return _load_jsonl
    return _load_csv


def _open(p: Path):
    """``p`` opened for reading, or an ``InputError`` saying why it cannot be (checked with
    ``stat`` first, so a FIFO is known to be one before it is opened)."""
    try:
        st = os.stat(p)
        kind = stat.S_IFMT(st.st_mode)
        if kind == stat.S_IFDIR:
            raise InputError(f"{p}: is a directory, not a question file")
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFCHR):
            raise InputError(f"{p}: not a regular file (a socket or block device), "
                             f"not a question file")
        return open(p, "rb"), kind != stat.S_IFREG
    except FileNotFoundError:
        raise InputError(f"{p}: question file not found") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError(f"{p}: symlink loop (too many levels of symbolic links)") from None
        raise InputError(f"{p}: cannot read the question file: {e.strerror or e}") from None


def load_questions(path: str | Path, skip_invalid: bool = False) -> LoadReport:
    """Read a question file (``.jsonl``, ``.json`` list, or ``.csv``); ``-`` is standard
    input."""
    if str(path) == "-":
        f, name, stream, suffix = getattr(sys.stdin, "buffer", sys.stdin), "<stdin>", None, ""
    else:
        p = Path(path)
        (f, stream), name, suffix = _open(p), str(p), p.suffix.lower()
    c = _Collector(name, skip_invalid)
    loader = _LOADERS.get(suffix)
    if loader is None:
        loader = _load_jsonl if stream is False else _sniff(f)
    try:
        loader(c, f)
    except OSError as e:
        raise InputError(f"{name}: cannot read the question file: {e.strerror or e}") from None
    finally:
        if stream is not None:  # not standard input
            f.close()
    return c.report()
