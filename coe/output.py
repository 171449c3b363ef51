"""The answers file: JSONL, one whole line per question, appended and flushed as each question
is finished. A rerun with ``resume`` keeps the complete lines, drops a torn last line and the
questions an expert failed on, and answers only the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from coe.types import QuestionResult


def _keep_for_resume(path: Path) -> set[str]:
    """Rewrite an answers file to its complete lines of questions every expert answered, and
    return their ids. A torn trailing line (a kill mid-write) and questions with a failed
    expert are dropped, so a resumed run answers them again (finished generations come
    from the response cache)."""
    if not path.exists():
        return set()
    ids: set[str] = set()
    keep: list[bytes] = []
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                row = json.loads(raw)
                qid = str(row["id"])
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                break
            if (row.get("route") or {}).get("failed"):
                continue
            ids.add(qid)
            keep.append(raw)
    data = b"".join(keep)
    if len(data) != path.stat().st_size:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return ids


class ResultWriter:
    """Without ``resume`` an existing file is replaced only when the first result is ready, so
    a run that fails before answering anything leaves the previous answers in place."""

    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.done = _keep_for_resume(self.path) if resume else set()
        self._f = None

    def write(self, result: QuestionResult) -> None:
        if self._f is None:
            self._f = open(self.path, "a" if self.resume else "w", encoding="utf-8")
        self._f.write(result.model_dump_json() + "\n")  # one write: a whole line or nothing
        self._f.flush()

    def close(self) -> None:
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
