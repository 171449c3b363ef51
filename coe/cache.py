"""SQLite response cache: every finished generation is stored at once, keyed by the model
fingerprint, the full prompt and the sampling parameters.

This is also what makes a killed run resumable: a rerun finds every generation that finished
before the kill and makes only the missing ones. Errors are never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path

from coe.experts.base import Generation, GenRequest


def default_cache_path() -> Path:
    root = os.environ.get("COE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "coe")
    return Path(root) / "responses.sqlite"


def cache_key(fingerprint: str, request: GenRequest, by_question: bool = False) -> str:
    """Identical prompts to identical weights with identical sampling share a key (and so a
    generation), unless the backend answers per question id (``by_question``)."""
    payload = {
        "question": request.question_id if by_question else None,
        "model": fingerprint,
        "prompt": request.prompt,
        "messages": request.messages,
        "sampling": request.sampling.model_dump(),
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, generation TEXT NOT NULL)")

    def get_many(self, keys: list[str]) -> dict[str, Generation]:
        found: dict[str, Generation] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(
                    f"SELECT key, generation FROM responses WHERE key IN ({marks})", chunk)
                for key, blob in rows:
                    found[key] = Generation.model_validate_json(blob)
        return found

    def put(self, key: str, gen: Generation) -> None:
        if gen.error is not None:
            return
        blob = gen.model_copy(update={"cached": False}).model_dump_json()
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, blob))

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
