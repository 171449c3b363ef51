"""``coe eval`` with the real local models of experts.yaml (llama.cpp on the CPU): every
strategy on 3 questions, a second identical run that generates nothing, and a job killed
with SIGKILL mid-run (on the fault proxy's N-th request, not on a clock) that resumes with
only the missing generations."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import cached_generations, write_jsonl
from tests.support.openai_server import openai_expert
from tests.support.proxy import Fault

REPO = Path(__file__).resolve().parents[3]
EXAMPLES = [json.loads(x) for x in (REPO / "examples" / "questions.jsonl").read_text().splitlines()]
CATEGORY = {"q1": "math", "q2": "math", "q3": "science", "q4": "science", "q5": "general",
            "q6": "math", "q7": "science", "q8": "general"}


def local_pool(tmp_path: Path, max_tokens: int = 32) -> Path:
    pool = yaml.safe_load((REPO / "experts.yaml").read_text())
    for e in pool["experts"]:  # shorter answers keep the test lean on 2 cores
        e["sampling"]["max_tokens"] = min(e["sampling"]["max_tokens"], max_tokens)
    cfg = tmp_path / "experts.yaml"
    cfg.write_text(yaml.safe_dump(pool))
    return cfg


def questions(tmp_path: Path, ids: list[str], name: str) -> Path:
    return write_jsonl(tmp_path / name, [{**q, "category": CATEGORY[q["id"]]}
                                         for q in EXAMPLES if q["id"] in ids])


def coe(*args, env):
    return subprocess.run([sys.executable, "-m", "coe", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=900)


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_local_models_every_strategy_then_zero_generations(tmp_path):
    cfg = local_pool(tmp_path)
    test = questions(tmp_path, ["q1", "q3", "q5"], "test.jsonl")
    val = questions(tmp_path, ["q4", "q6"], "val.jsonl")
    env = {**os.environ, "COE_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    args = ["eval", test, "-c", cfg, "--validation", val, "-q"]
    first = coe(*args, "-o", tmp_path / "r1", env=env)
    assert first.returncode == 0, first.stderr
    r1 = report(tmp_path / "r1")
    names = [s["name"] for s in r1["strategies"]]
    assert names[:4] == ["single:smollm2-generalist", "single:smollm2-math", "single:gemma3-base",
                         "best-single"]
    assert {"all+vote", "all+llm", "category+vote", "category+llm", "category@1",
            "random3+vote", "oracle"} <= set(names)
    # one executor call for 3 experts x (3 test + 2 validation), one for 2 llm strategies x
    # (2 validation + 3 test: every strategy is scored on validation too)
    # (two aggregation prompts can coincide, e.g. when gemma's answer is empty: made once)
    experts, agg = r1["phases"]
    assert (experts["name"], experts["unique"], agg["name"], agg["requests"]) == \
           ("experts", 15, "aggregation", 10)
    assert r1["generations"] == 15 + agg["unique"] and r1["cache_hits"] == 0
    assert r1["failed_generations"] == 0
    # two sets of weights (the two smollm2 personas share one): 2 loads for the experts, and
    # the aggregation starts on the weights left loaded
    assert r1["phases"][0]["loads"] == 2 and r1["model_loads"] <= 3
    by = {s["name"]: s for s in r1["strategies"]}
    assert by["all+llm"]["aggregator_usage"] == {"smollm2-generalist": 3}
    assert by["all+vote"]["avg_active_params_b"] == pytest.approx(0.135 * 2 + 0.27)
    # the aggregator's pass counts too, although it is also one of the recruits
    assert by["all+llm"]["avg_active_params_b"] == pytest.approx(0.135 * 2 + 0.27 + 0.135)
    assert by["single:gemma3-base"]["completion_tokens"] > 0
    assert by["oracle"]["accuracy"] >= max(by[n]["accuracy"] for n in names if n.startswith("single:"))
    print(f"\nfirst run: {first.stderr.splitlines()[1]}")

    second = coe(*args, "-o", tmp_path / "r2", env=env)
    assert second.returncode == 0, second.stderr
    r2 = report(tmp_path / "r2")
    print(f"second run: {second.stderr.splitlines()[1]}")
    assert r2["generations"] == 0 and r2["cache_hits"] == r1["generations"]
    assert r2["model_loads"] == 0
    assert [(s["name"], s["correct"]) for s in r2["strategies"]] == \
           [(s["name"], s["correct"]) for s in r1["strategies"]]
    # the same table (strategy, accuracy, CI); only the timings may differ
    assert [ln.split("|")[1:4] for ln in second.stdout.splitlines()] == \
           [ln.split("|")[1:4] for ln in first.stdout.splitlines()]



@pytest.mark.slow
def test_killed_eval_resumes_with_only_the_missing_generations(proxy, tmp_path):
    """SIGKILL on an event: the pool is experts.yaml plus an API expert behind the fault proxy
    (the session's llama_cpp.server), one request at a time. The experts phase runs the groups
    holding weights first, one at a time (gemma's, then smollm2's, whose generalist is the llm
    aggregator: its weights stay loaded for the aggregation), then the endpoint groups (at once;
    here one); the proxy kills ``coe eval`` when the API expert's KILL_AT-th request arrives and
    never answers it. Each generation is stored before the next request is sent, so exactly
    8 (gemma) + 16 (smollm2's two personas) + KILL_AT - 1 are kept."""
    kill_at = 4
    cfg = local_pool(tmp_path, max_tokens=24)
    pool = yaml.safe_load(cfg.read_text())
    pool["experts"].append(openai_expert("smollm2-api", proxy.base_url, max_concurrency=1,
                                         timeout=300.0))
    cfg.write_text(yaml.safe_dump(pool))
    test = questions(tmp_path, [q["id"] for q in EXAMPLES], "test.jsonl")
    n = len(EXAMPLES)
    cache = tmp_path / "cache"
    env = {**os.environ, "COE_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1"}
    args = ["eval", test, "-c", cfg, "-s", "all+vote,all+llm,category+vote", "-q", "--no-plots"]
    db = cache / "responses.sqlite"
    job: list[subprocess.Popen] = []  # armed before the start, so no request can slip past
    killed = proxy.on_request(kill_at, lambda: os.kill(job[0].pid, signal.SIGKILL),
                              then=Fault.hang())
    job.append(subprocess.Popen([sys.executable, "-m", "coe", *map(str, args), "-o",
                                 tmp_path / "killed"], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    proc = job[0]  # a real kill: no handler, no cleanup
    _, err = proc.communicate(timeout=600)
    assert killed.is_set(), err
    assert proc.returncode == -signal.SIGKILL
    done = cached_generations(db)
    assert done == 3 * n + kill_at - 1 and proxy.count == kill_at
    proxy.reset()
    resumed = coe(*args, "--resume", "-o", tmp_path / "resumed", env=env)
    assert resumed.returncode == 0, resumed.stderr
    r = report(tmp_path / "resumed")
    needed = sum(p["unique"] for p in r["phases"])  # 8 x 4 expert + up to 8 aggregation ones
    print(f"\nkilled after {done} of {needed} generations; resumed run: "
          f"{resumed.stderr.splitlines()[1]}")
    assert r["phases"][0]["unique"] == 4 * n and 4 * n < needed <= 5 * n
    assert r["cache_hits"] == done and r["generations"] == needed - done
    assert r["failed_generations"] == 0
    assert proxy.count == kill_at + n - (kill_at - 1)  # the API expert's missing ones only
    # the resumed job's figures are those of an uninterrupted one (served from the cache now)
    again = coe(*args, "-o", tmp_path / "again", env=env)
    a = report(tmp_path / "again")
    assert again.returncode == 0 and a["generations"] == 0 and a["cache_hits"] == needed
    assert [s["correct"] for s in a["strategies"]] == [s["correct"] for s in r["strategies"]]
    assert proxy.count == kill_at + n - (kill_at - 1)
