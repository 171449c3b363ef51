"""The answers file: JSONL, one whole line per question, appended and flushed as each question
is finished. A rerun with ``resume`` keeps the complete lines, drops a torn last line, and
skips the questions already answered.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from coe.results import QuestionResult


def finished_ids(path: Path) -> set[str]:
    """Ids of the complete lines in an answers file; truncates a torn trailing line."""
    if not path.exists():
        return set()
    ids: set[str] = set()
    good = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                ids.add(str(json.loads(raw)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
                break
            good += len(raw)
    if good != path.stat().st_size:
        with open(path, "r+b") as f:
            f.truncate(good)
    return ids


class ResultWriter:
    def __init__(self, path: str | Path, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = finished_ids(self.path) if resume else set()
        self._f = open(self.path, "a" if resume else "w", encoding="utf-8")

    def write(self, result: QuestionResult) -> None:
        self._f.write(result.model_dump_json() + "\n")  # one write: a whole line or nothing
        self._f.flush()

    def close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
