"""Yaml alias bombs ("billion laughs"), placed where the schema takes a free mapping
(``router.options``): every yaml ``coe`` reads goes through one bounded loader, so a bomb is
one ``ConfigError`` line before anything is built from it, whatever the command, and a command
ends within seconds (it used to spend minutes in C code that no SIGTERM interrupted).

The subprocesses run with their address space capped (``RLIMIT_AS``), so a regression fails
the test quickly instead of taking the machine's memory.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import yaml

from coe.core.config import load_config
from coe.core.errors import ConfigError
from coe.core.yamlfile import MAX_VALUES, load_yaml
from tests.conftest import write_jsonl
from tests.support.cli import REPO, one_line_error

LIMIT = 2 << 30  # bytes of address space a child may take


def bomb(levels: int = 9, width: int = 10, indent: str = "    ") -> str:
    """A mapping of ``levels`` anchors, each a list of ``width`` aliases of the one before:
    ``width ** levels`` values once expanded, a few hundred bytes written."""
    lines = [f"{indent}a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"{indent}a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


@pytest.fixture
def bombed(tmp_path):
    write_jsonl(tmp_path / "memo.jsonl", [{"id": f"q{i}", "text": "Answer: 2"} for i in range(2)])
    cfg = tmp_path / "pool.yaml"
    cfg.write_text("experts:\n  - {name: memo, backend: replay, model: memo.jsonl}\n"
                   "router:\n  kind: all\n  options:\n" + bomb())
    qs = write_jsonl(tmp_path / "q.jsonl", [{"id": f"q{i}", "question": f"What is {i} + 1?",
                                             "answer": str(i + 1)} for i in range(2)])
    return cfg, qs


def test_an_alias_bomb_is_one_line_for_every_reader(tmp_path, bombed):
    cfg, _ = bombed
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert str(e.value) == (f"{cfg}: the yaml stands for more than {MAX_VALUES:,} values once "
                            f"its aliases are expanded (an alias bomb?)")
    with pytest.raises(ConfigError, match="a yaml that never ends"):
        load_yaml("a: &a [1, *a]", "self.yaml")
    with pytest.raises(ConfigError, match="MiB: a yaml that big is not a configuration"):
        load_yaml("#" * (17 << 20), "big.yaml")
    # aliases that stay small are yaml as usual
    assert load_yaml("a: &a [1, 2]\nb: [*a, *a]") == {"a": [1, 2], "b": [[1, 2], [1, 2]]}
    assert load_yaml(bomb(levels=4, indent="")) is not None  # 10,000 values: fine


def _child(*args) -> subprocess.Popen:
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))

    return subprocess.Popen([sys.executable, "-c", "from coe.apps.cli import main; main()",
                             *map(str, args)], cwd=REPO, preexec_fn=cap, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _ended(proc: subprocess.Popen, seconds: float) -> subprocess.CompletedProcess:
    """The child's end: by itself within ``seconds``, else SIGTERM, which must end it within
    ten more; a child that outlives both is killed and fails the test."""
    deadline = time.monotonic() + seconds
    try:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"`coe {' '.join(proc.args[3:5])}` outlived SIGTERM by 10 s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_commands_given_a_bomb_end_in_one_line_within_seconds(tmp_path, bombed):
    cfg, qs = bombed
    runs = {
        "eval": _child("eval", qs, "-c", cfg, "-q", "--no-plots", "-o", tmp_path / "ev"),
        "run": _child("run", qs, "-c", cfg, "-q"),
        "serve": _child("serve", "-c", cfg, "--port", "1"),  # never bound: the yaml comes first
        "experts": _child("experts", "-c", cfg),
    }
    try:
        for proc in runs.values():
            done = _ended(proc, 60)
            one_line_error(done, 2, f"{cfg}: the yaml stands for more than", "(an alias bomb?)")
    finally:
        for proc in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert not (tmp_path / "ev").exists()


def test_the_vocabulary_and_recorded_pools_use_the_same_loader(tmp_path, monkeypatch):
    """The skill vocabulary (package data) and a pool's experts.yaml are read by it too."""
    from coe.routing.skills import vocabulary

    p = tmp_path / "skills.yaml"
    p.write_text("x: &x [a, b]\n" + bomb(levels=7, indent=""))
    monkeypatch.setattr(vocabulary, "VOCABULARY", p)
    with pytest.raises(ConfigError, match="alias bomb"):
        vocabulary.load_vocabulary()
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "experts.yaml").write_text(yaml.safe_dump({"experts": []}) + "x:\n" + bomb(7, 10, "  "))
    with pytest.raises(ConfigError, match="alias bomb"):
        load_config(pool / "experts.yaml")
