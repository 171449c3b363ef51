"""Two ``coe run``s writing one answers file at once: the second is refused in one line naming
the first (its pid), the first finishes with every answer, nothing is torn or lost.

The first run is held mid-generation by a *gate*: a plugin backend (installed the way a pip
package is, through an entry point) whose generation reads a FIFO. The test opens the FIFO's
other end, which returns only once the first run has opened it, i.e. once it is generating
and so holds the lock; the second run starts then. Ordered by events, never by sleeps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import yaml

from coe.core.errors import StorageError
from coe.io.lock import OutputLock
from coe.io.output import ResultWriter
from tests.conftest import write_jsonl
from tests.support.cli import REPO, one_line_error

GATE = '''
from typing import Literal

from coe.backends.base import Backend
from coe.core.config import ExpertConfig
from coe.core.types import Generation


class GateExpert(ExpertConfig):
    backend: Literal["gate"]
    gate: str


class GateBackend(Backend):
    """Answers B to everything, once its gate (a FIFO) has been opened and closed."""

    config_model = GateExpert

    def load(self):
        pass

    def generate(self, requests, on_result):
        with open(self.config.gate, "rb") as f:
            f.read()
        for i, _ in enumerate(requests):
            on_result(i, Generation(text="The answer is (B)."))

    def unload(self):
        pass
'''


@pytest.fixture
def gated(tmp_path):
    site = tmp_path / "site"
    info = site / "coe_gate_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (site / "coe_gate_plugin.py").write_text(textwrap.dedent(GATE))
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: coe-gate-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[coe.backends]\ngate = coe_gate_plugin:GateBackend\n")
    gate = tmp_path / "gate.fifo"
    os.mkfifo(gate)
    (tmp_path / "open-gate").write_bytes(b"")  # a regular file: never waits
    pools = []
    for name, path in (("pool.yaml", gate), ("open.yaml", tmp_path / "open-gate")):
        pools.append(tmp_path / name)
        pools[-1].write_text(yaml.safe_dump({
            "experts": [{"name": "g", "backend": "gate", "model": "-", "gate": str(path)}],
            "router": {"kind": "all"}}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', REPO)}"}
    return pools, gate, env


def _questions(path, ids):
    return write_jsonl(path, [{"id": f"q{i}", "question": f"Question {i}?",
                               "choices": ["w", "x", "y"], "answer": "B"} for i in ids])


def _coe(env, *args):
    return [sys.executable, "-c", "from coe.apps.cli import main; main()", *map(str, args)]


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(gated, tmp_path):
    (cfg, open_cfg), gate, env = gated
    first_half = _questions(tmp_path / "a.jsonl", range(1, 13))
    second_half = _questions(tmp_path / "b.jsonl", range(13, 25))
    out = tmp_path / "answers.jsonl"
    first = subprocess.Popen(_coe(env, "run", first_half, "-c", cfg, "-q", "-o", out),
                             env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    opened: list = []
    opener = threading.Thread(target=lambda: opened.append(open(gate, "wb")), daemon=True)
    opener.start()  # returns once the first run has opened the gate: it is generating
    opener.join(timeout=180)
    try:
        assert opened, f"the first run never reached its generation: {first.poll()}"
        for resume in ((), ("--resume",)):
            # its own gate is open: unlocked, it would answer and overwrite at once
            second = subprocess.run(_coe(env, "run", second_half, "-c", open_cfg, "-q", "-o",
                                         out, *resume),
                                    env=env, cwd=REPO, capture_output=True, text=True,
                                    timeout=300)
            one_line_error(second, StorageError.exit_code,
                           f"{out}: the answers file is being written by pid {first.pid} on ",
                           "coe run", "wait for it to finish or choose another output")
    finally:
        for f in opened:
            f.close()  # the gate opens: the first run answers
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(1, 13)]
    assert not (tmp_path / "answers.jsonl.lock").exists()  # removed by its holder


def test_the_lock_refuses_a_second_holder_and_is_free_again_once_released(tmp_path):
    """In one process too (the lock is on the open file, not the process): a second writer
    of the same file, through a symlink or not, is refused until the first is closed."""
    out = tmp_path / "answers.jsonl"
    (tmp_path / "link.jsonl").symlink_to(out)
    writer = ResultWriter(out)
    with pytest.raises(StorageError, match=f"being written by pid {os.getpid()} on "):
        ResultWriter(tmp_path / "link.jsonl", resume=True)
    with pytest.raises(StorageError, match="being written by"):
        OutputLock(out)
    writer.close()
    with OutputLock(tmp_path / "link.jsonl"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.jsonl"]
    ResultWriter("/dev/null").close()  # a device: a stream, never locked
