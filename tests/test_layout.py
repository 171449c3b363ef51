"""The layout shows the flow, and stays that way: folders by stage whose imports only go down
(import-linter's contracts, one per folder), at most ten modules at the top of ``coe/``, no
module over 450 lines, and capabilities read from declarations, never probed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COE = REPO / "coe"
STAGES = ["core", "io", "text", "backends", "execution", "learned", "routing", "aggregation",
          "pipeline", "apps"]


def lint_imports(cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_layering_contracts_hold():
    proc = lint_imports(REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 kept, 0 broken" in proc.stdout


def test_the_layering_contracts_catch_a_backend_that_imports_a_router(tmp_path):
    shutil.copytree(COE, tmp_path / "coe", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    replay = tmp_path / "coe" / "backends" / "replay.py"
    replay.write_text(replay.read_text() + "\nfrom coe.routing import ROUTERS  # noqa\n")
    proc = lint_imports(tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = " ".join(proc.stdout.split())
    assert "Stages: apps > pipeline" in out and "BROKEN" in out
    assert "coe.backends.replay -> coe.routing" in out


def test_the_top_of_coe_is_its_stages():
    folders = sorted(p.name for p in COE.iterdir() if (p / "__init__.py").exists())
    modules = sorted(p.name for p in COE.glob("*.py"))
    assert folders == sorted(STAGES)
    assert len(modules) <= 10 and modules == ["__init__.py", "__main__.py"]


def test_no_module_is_over_450_lines():
    long = {str(p.relative_to(REPO)): n for p in COE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert long == {}


def test_plugins_are_read_by_their_declarations_never_probed():
    """No ``hasattr``/``getattr`` on a backend, router, aggregator or executor, and no check of
    a backend by its name: callers read ``capabilities``, ``cascade``, ``cross_fitted``,
    ``generates``, ``placement``..."""
    probe = re.compile(r"\b(hasattr|getattr)\((\w+\.)*(backend|router|aggregator|agg|executor|"
                       r"ex|clf|classifier)\b|\.backend\s*[!=]=\s*[\"']")
    found = [f"{p.relative_to(REPO)}:{i}: {line.strip()}"
             for p in COE.rglob("*.py") for i, line in enumerate(p.read_text().splitlines(), 1)
             if probe.search(line)]
    assert found == []
