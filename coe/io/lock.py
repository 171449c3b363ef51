"""One writer per output file: an OS advisory lock (``flock``) on a sidecar ``<output>.lock``.

Two ``coe run``s writing one answers file at once used to lose answers: the second truncated
what the first had written, and their lines could tear each other. Now the first to start
holds ``answers.jsonl.lock`` until it has finished (its ``--resume`` rewrite included) and the
second is refused at once, in one line naming the holder (pid, host, command, since when).

The lock is the kernel's: it goes away with the process that held it, however it ended (a
``kill -9`` leaves no stale lock to clean up). The sidecar file is removed by its holder when it
is done; a waiter that opened the old file before it was removed finds it gone after locking
and tries again, so two processes never both believe they hold the lock.

A sidecar rather than the output itself because ``--resume`` replaces the output (a new file,
renamed over it): a lock on the old file would no longer guard the new one. Where no sidecar
can be made (an existing output in a read-only folder) the output itself is locked. Devices
and pipes (``-o /dev/stdout``) are not locked: they are streams, not files anyone shares.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path

from coe.core.errors import StorageError
from coe.core.secrets import redact

MAX_COMMAND_CHARS = 200


def _holder() -> bytes:
    command = " ".join(["coe", *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "command": redact(command)[:MAX_COMMAND_CHARS],
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()


def _describe(fd: int) -> str:
    """Who holds the lock, from what the holder wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another process"
    where = f"pid {info['pid']} on {info.get('host', '?')}"
    since = f" since {info['since']}" if info.get("since") else ""
    command = f": {info['command']}" if info.get("command") else ""
    return f"{where}{since}{command}"


class OutputLock:
    """Hold ``path`` for writing until ``release`` (or the end of a ``with`` block); raise
    ``StorageError`` naming the holder when another process holds it."""

    def __init__(self, path: str | Path, what: str = "answers file"):
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None
        self._sidecar: Path | None = None
        self._acquire()

    def _acquire(self) -> None:
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            return  # a device or a pipe: a stream
        real = self.path.resolve()  # one lock for every symlink to the file
        sidecar = real.with_name(real.name + ".lock")
        for _ in range(100):  # each retry means a holder just removed the file: bounded
            try:
                fd = os.open(sidecar, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and st is not None:
                    self._lock_output_itself()
                    return
                raise StorageError(f"{sidecar}: cannot make the lock of the {self.what}: "
                                   f"{e.strerror}") from None
            if not self._lock(fd):
                return  # no locks on this file system: warned
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(sidecar))
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it after we opened it: take the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, _holder(), 0)
            self._fd, self._sidecar = fd, sidecar
            return
        raise StorageError(f"{self.path}: cannot lock the {self.what}: its lock file keeps "
                           f"changing")

    def _lock(self, fd: int) -> bool:
        """Lock ``fd`` (True), or find that this file system has no locks (False: warned,
        ``fd`` closed); another holder is a ``StorageError`` naming it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise StorageError(f"{self.path}: the {self.what} is being written by {holder}; "
                               f"wait for it to finish or choose another output") from None
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        sys.stderr.write(f"coe: warning: {self.path}: this file system cannot lock files; "
                         f"nothing stops another run from writing it at the same time\n")
        return False

    def _lock_output_itself(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        if self._lock(fd):
            self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._sidecar is not None:  # removed while still held: see the module doc
            try:
                self._sidecar.unlink()
            except OSError:
                pass
        os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
