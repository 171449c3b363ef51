"""User-facing errors: each renders as one line naming the file, line or expert at fault.

The CLI prints ``str(error)`` and exits non-zero without a traceback; anything that is
not a ``CoeError`` is a bug and keeps its traceback.
"""

from __future__ import annotations


class CoeError(Exception):
    """An error caused by the user's input, config or environment."""

    exit_code = 1


class ConfigError(CoeError):
    """The experts yaml (or a file it names) is invalid."""

    exit_code = 2


class InputError(CoeError):
    """A question file is malformed."""

    exit_code = 3


class ExpertError(CoeError):
    """An expert failed to load or generate (unreachable API, crashed model...)."""

    exit_code = 4

    def __init__(self, expert: str, message: str):
        self.expert = expert
        self.detail = message
        super().__init__(f"expert {expert!r}: {message}")


class StorageError(CoeError):
    """A file coe writes (answers, a report, a cache) cannot be written: it is the input, a
    directory, not writable, or the disk is full. Work already stored is kept."""

    exit_code = 5


def file_kind(mode: int) -> str:
    """What a ``stat`` mode says a path is, as an error names it: "a directory", "a FIFO"..."""
    import stat

    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def describe_os_error(e: BaseException) -> str:
    """``No space left on device`` for an ``OSError``, the message of anything else (a
    SQLite error), without the path (the caller names it) or a traceback."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e) or type(e).__name__
