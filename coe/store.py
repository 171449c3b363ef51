"""The one on-disk key-value store under coe's caches: a SQLite table of ``key -> value``.

The response cache (generations) and the embedding cache (vectors) are both such a table. SQLite
in WAL mode is safe for several processes writing one file and for several threads of one
process (a lock serialises this process's use of its connection); each ``put`` is committed
at once, which is what lets a killed run keep every generation it finished. Lookups go in
chunks under SQLite's bound-parameter limit.

Why not a library (diskcache, sqlitedict): both pickle values and keep their own schema; the
response cache must stay a plain, inspectable table that other processes (and the tests) read
with the ``sqlite3`` module, and this is thirty lines.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterable

CHUNK = 500  # keys per SELECT ... IN (...), well under SQLite's parameter limit


def cache_dir() -> Path:
    """Where coe keeps its caches: ``$COE_CACHE_DIR``, else ``$XDG_CACHE_HOME/coe``, else
    ``~/.cache/coe``."""
    root = os.environ.get("COE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "coe")
    return Path(root)


class KeyValueStore:
    def __init__(self, path: str | Path, table: str, value_type: str = "TEXT"):
        if not table.isidentifier():
            raise ValueError(f"bad table name {table!r}")
        self.path = Path(path)
        self.table = table
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # Files written by earlier versions name the value column differently; every query
        # here is positional, so they are read as they are.
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} "
                         f"(key TEXT PRIMARY KEY, value {value_type} NOT NULL)")

    def get_many(self, keys: list[str]) -> dict[str, object]:
        found: dict[str, object] = {}
        with self._lock:
            for start in range(0, len(keys), CHUNK):
                chunk = keys[start:start + CHUNK]
                marks = ",".join("?" * len(chunk))
                found.update(self._db.execute(
                    f"SELECT * FROM {self.table} WHERE key IN ({marks})", chunk))  # (key, value)
        return found

    def put_many(self, items: Iterable[tuple[str, object]]) -> None:
        with self._lock:
            self._db.executemany(f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?)", items)

    def put(self, key: str, value: object) -> None:
        self.put_many([(key, value)])

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
