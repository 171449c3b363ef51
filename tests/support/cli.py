"""The ``coe`` command as a user runs it: a subprocess, its exit code and its one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def coe(*args, cwd=REPO, env=None, timeout=600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "coe", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


def one_line_error(proc, code, *fragments) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for f in fragments:
        assert f in lines[0]
