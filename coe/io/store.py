"""The one on-disk key-value store under coe's caches: a SQLite table of ``key -> value``.

The response cache (generations) and the embedding cache (vectors) are both such a table. SQLite
in WAL mode is safe for several processes writing one file and for several threads of one
process (a lock serialises this process's use of its connection); each ``put`` is committed
at once, which is what lets a killed run keep every generation it finished. Lookups go in
chunks under SQLite's bound-parameter limit.

Why not a library (diskcache, sqlitedict): both pickle values and keep their own schema; the
response cache must stay a plain, inspectable table that other processes (and the tests) read
with the ``sqlite3`` module, and this is thirty lines.

A store that cannot be written (its folder is a file, a read-only file system, a full disk)
raises ``StorageError`` naming its path: when it is opened (a write is tried and rolled
back, so a run finds out before any model loads) and on a ``put`` (what was committed before
stays). ``what`` names the store in those messages ("response cache").
"""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
from pathlib import Path
from typing import Iterable

from coe.core.errors import StorageError, describe_os_error

CHUNK = 500  # keys per SELECT ... IN (...), well under SQLite's parameter limit


def cache_dir() -> Path:
    """Where coe keeps its caches: ``$COE_CACHE_DIR``, else ``$XDG_CACHE_HOME/coe``, else
    ``~/.cache/coe``."""
    root = os.environ.get("COE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "coe")
    return Path(root)


class KeyValueStore:
    def __init__(self, path: str | Path, table: str, value_type: str = "TEXT",
                 what: str = "cache"):
        if not table.isidentifier():
            raise ValueError(f"bad table name {table!r}")
        self.path = Path(path)
        self.table = table
        self.what = what
        self._lock = threading.Lock()
        self._db = None
        try:
            if self.path.is_dir():
                raise IsADirectoryError(21, "Is a directory")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except FileExistsError:  # a file where the folder should be
                raise NotADirectoryError(errno.ENOTDIR, f"{self.path.parent} is not a directory"
                                         ) from None
            self._db = sqlite3.connect(self.path, check_same_thread=False,
                                       isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # Files written by earlier versions name the value column differently; every
            # query here is positional, so they are read as they are.
            self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} "
                             f"(key TEXT PRIMARY KEY, value {value_type} NOT NULL)")
            self._db.execute("BEGIN IMMEDIATE")  # can it be written? (a read-only file opens)
            try:
                self._db.execute(f"INSERT OR REPLACE INTO {table} VALUES ('', '')")
            finally:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
        except (OSError, sqlite3.Error) as e:
            if self._db is not None:
                self._db.close()
            raise self._error(e) from None

    def _error(self, e: BaseException) -> StorageError:
        return StorageError(f"{self.path}: cannot write the {self.what}: {describe_os_error(e)}")

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
            try:
                self._db.executemany(f"INSERT OR REPLACE INTO {self.table} VALUES (?, ?)",
                                     items)
            except (OSError, sqlite3.OperationalError) as e:  # a full disk, a lost file system
                raise self._error(e) from None

    def put(self, key: str, value: object) -> None:
        self.put_many([(key, value)])

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute(f"SELECT COUNT(*) FROM {self.table}").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
