"""The answers file: JSONL, one whole line per question, appended and flushed as each question
is finished. A rerun with ``resume`` keeps the complete lines, drops a torn last line, the
questions an expert failed on and the answers to questions asked differently since (their
text or choices changed), and answers only the rest.

What can be checked before any work is, when the writer is made (``check_output``): that the
file can be created or appended to, is not a directory, and is not one of the run's inputs
(the question file, the config, every file the pool reads). The writer then holds the file's
lock (``coe.io.lock``) until it is closed, its ``--resume`` rewrite included: a second run
writing the same file at the same time is refused in one line naming the first. A write that fails later (a full disk) is a ``StorageError``
naming the file; the file keeps its whole lines, never half of one.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Iterable

from coe.core.errors import StorageError, describe_os_error
from coe.core.types import Question, QuestionResult
from coe.io.lock import OutputLock


def _file_id(path: str | Path) -> tuple[int, int] | None:
    """(device, inode) of a regular file (``-``: standard input), None for anything else: two
    names of one regular file (a symlink, a hard link) have the same id. Terminals and pipes
    are never "the same file" as an output: ``coe run - -o /dev/stdout`` is fine."""
    try:
        st = os.fstat(sys.stdin.fileno()) if str(path) == "-" else os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def check_output(path: str | Path, inputs: Iterable[tuple[str, str | Path | None]] = (),
                 what: str = "answers file") -> None:
    """Raise ``StorageError`` unless ``path`` can be written without losing anything: it is
    none of ``inputs`` (``(what, path)`` pairs, e.g. ``("question file", "q.jsonl")``, also
    through a symlink or hard link), not a directory, and can be created or appended to
    (tried, changing nothing). A device or pipe (``/dev/stdout``) is written as a stream."""
    p = Path(path)
    out_id = _file_id(p)
    if out_id is not None:
        for name, src in inputs:
            if src is not None and _file_id(src) == out_id:
                shown = "standard input" if str(src) == "-" else str(src)
                raise StorageError(f"{p}: the {what} would overwrite the {name} ({shown}): "
                                   f"choose another output")
    try:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory")
        if st is None:  # can a file be made where it goes (a dangling symlink's target)?
            parent = p.resolve().parent
            parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=parent):
                pass
        elif stat.S_ISREG(st.st_mode):
            with open(p, "ab"):
                pass
    except OSError as e:
        raise StorageError(f"{p}: cannot write the {what}: {describe_os_error(e)}") from None


def _asked_as(row: dict, q: Question | None) -> bool:
    """Whether an answer line answers ``q`` as it is asked now (same text, same choices);
    a line whose id is not among the questions is kept as it is."""
    return q is None or (row.get("question") == q.question and row.get("choices") == q.choices)


def _keep_for_resume(path: Path, questions: list[Question] | None = None) -> tuple[set[str], int]:
    """Rewrite an answers file to its complete lines of questions every expert answered, and
    return their ids and how many lines were dropped because their question changed. A torn
    trailing line (a kill mid-write), questions with a failed expert and answers to questions
    whose text or choices have changed since are dropped, so a resumed run answers them again
    (finished generations come from the response cache)."""
    if not path.is_file():
        return set(), 0
    asked = {q.id: q for q in questions} if questions is not None else {}
    ids: set[str] = set()
    keep: list[bytes] = []
    changed = 0
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
            if not _asked_as(row, asked.get(qid)):
                changed += 1
                continue
            ids.add(qid)
            keep.append(raw)
    data = b"".join(keep)
    if len(data) != path.stat().st_size:
        tmp = path.with_name(path.name + ".tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise StorageError(f"{path}: cannot rewrite the answers file for --resume: "
                               f"{describe_os_error(e)} (the file is unchanged)") from None
    return ids, changed


class ResultWriter:
    """Without ``resume`` an existing file is replaced only when the first result is ready, so
    a run that fails before answering anything leaves the previous answers in place. With
    ``questions``, ``resume`` keeps only the answers to those questions as they are asked now
    (``changed`` counts the answers dropped because their question changed). The file is
    locked from here to ``close`` (another writer: a ``StorageError`` naming it)."""

    def __init__(self, path: str | Path, resume: bool = False,
                 questions: list[Question] | None = None,
                 inputs: Iterable[tuple[str, str | Path | None]] = ()):
        self.path = Path(path)
        check_output(self.path, inputs)
        self._lock = OutputLock(self.path)
        self.resume = resume
        try:
            self.done, self.changed = (_keep_for_resume(self.path, questions) if resume
                                       else (set(), 0))
        except BaseException:
            self._lock.release()
            raise
        self.written = 0
        self._f = None
        self._broken = False  # a write failed: the file is left with its whole lines

    def _fail(self, e: OSError) -> StorageError:
        return StorageError(f"{self.path}: cannot write the answers: {describe_os_error(e)} "
                            f"({self.written} written by this run; the generations are in the "
                            f"response cache: rerun with --resume once it can be written)")

    def write(self, result: QuestionResult) -> None:
        data = (result.model_dump_json() + "\n").encode("utf-8")
        if self._broken:
            raise StorageError(f"{self.path}: an earlier write failed")
        try:
            if self._f is None:
                self._f = open(self.path, "ab" if self.resume else "wb", buffering=0)
            fd = self._f.fileno()
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
            start = os.fstat(fd).st_size if regular else 0
        except OSError as e:
            raise self._fail(e) from None
        try:
            view = memoryview(data)
            while view:  # an unbuffered file may take part of a line at a time
                view = view[self._f.write(view):]
        except OSError as e:
            self._broken = True
            if regular:  # a whole line or nothing: cut what part of this one got written
                try:
                    os.ftruncate(fd, start)
                except OSError:
                    pass
            raise self._fail(e) from None
        self.written += 1

    def close(self) -> None:
        if self._f is None:
            self._lock.release()
            return
        f, self._f = self._f, None
        try:
            os.fsync(f.fileno())
        except OSError as e:
            # a pipe or a device cannot be synced; after a failed write, that error stands
            if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EROFS) and not self._broken:
                raise self._fail(e) from None
        finally:
            f.close()
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
