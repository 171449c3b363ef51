"""The openai backend against a REAL OpenAI-compatible server (llama_cpp.server + SmolLM2 on
127.0.0.1, started by ``tests/openai_server.py``), through the real ``openai`` client.

A loopback proxy (``tests/proxy.py``) in front of the server observes here: it records the
requests the client sends and how many are in flight at once; in the stopped-server test it
also stops the server on a given request and goes down with it.
"""

from __future__ import annotations

import json
import re

import pytest

from coe.apps.api import Orchestrator
from tests.support.openai_server import (
    MODEL_ALIAS,
    arithmetic_questions,
    cached_generations,
    openai_expert,
    run_cli,
    write_pool,
)
from tests.support.proxy import Fault


def test_chat_and_completion_formats_through_orchestrator_and_cache(openai_server, proxy, tmp_path):
    pool = write_pool(tmp_path, [
        openai_expert("smol-chat", proxy.base_url, prompt_format="chat",
                      system_prompt="You are a careful arithmetician."),
        openai_expert("smol-base", proxy.base_url, prompt_format="completion"),
    ])
    qs = arithmetic_questions(2)
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(qs, output=tmp_path / "out.jsonl")
        s = run.stats
        assert s.failures == {} and s.failed_generations == 0
        # same endpoint and model: one "load" serves both prompt formats
        assert s.loads == 1 and s.generations == 4 and s.cache_hits == 0
        for r in run.results:
            assert [x.expert for x in r.responses] == ["smol-chat", "smol-base"]
            assert r.route.failed == {}
            for x in r.responses:
                assert x.error is None and x.text.strip()
                assert 0 < x.completion_tokens <= 8 and x.prompt_tokens > 0 and x.seconds > 0

        # what went over the wire: the right endpoints, model alias, prompt shape, sampling
        sent = [(r.path, r.json()) for r in proxy.requests]
        chat = [b for p, b in sent if p == "/v1/chat/completions"]
        comp = [b for p, b in sent if p == "/v1/completions"]
        assert len(chat) == 2 and len(comp) == 2 and len(sent) == 4
        for b in chat + comp:
            assert b["model"] == MODEL_ALIAS and b["max_tokens"] == 8 and b["temperature"] == 0
        for b in chat:  # requests run concurrently: any order
            assert b["messages"][0] == {"role": "system",
                                        "content": "You are a careful arithmetician."}
        assert sorted(b["messages"][1]["content"][:13] for b in chat) == ["What is 0 + 1", "What is 1 + 2"]
        assert sorted(b["prompt"] for b in comp) == ["Question: What is 0 + 1?\nAnswer:",
                                                     "Question: What is 1 + 2?\nAnswer:"]
        assert all("\nQuestion:" in b["stop"] for b in comp)

        lines = [json.loads(x) for x in open(tmp_path / "out.jsonl")]
        assert [x["id"] for x in lines] == ["q0", "q1"]
        assert all(len(x["responses"]) == 2 and x["route"]["failed"] == {} for x in lines)

        # a rerun is served by the response cache: nothing reaches the server
        again = orch.run(qs)
    assert again.stats.generations == 0 and again.stats.cache_hits == 4
    assert again.stats.loads == 0 and proxy.count == 4
    assert ([[x.text for x in r.responses] for r in again.results]
            == [[x.text for x in r.responses] for r in run.results])
    assert all(x.cached for r in again.results for x in r.responses)


def test_max_concurrency_bounds_requests_in_flight(openai_server, proxy, tmp_path):
    pool = write_pool(tmp_path, [openai_expert("smol", proxy.base_url, max_concurrency=2)])
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(arithmetic_questions(5))
    assert run.stats.generations == 5 and run.stats.failures == {}
    assert proxy.count == 5
    # the server answers one request at a time, so the client's requests pile up in the
    # proxy: exactly max_concurrency of them at once, never more
    assert proxy.max_inflight == 2


def _summary(stderr: str) -> dict[str, int]:
    m = re.search(r"generations: (\d+), cached: (\d+), failed: (\d+)", stderr)
    assert m, stderr
    return dict(zip(("generations", "cached", "failed"), map(int, m.groups())))


@pytest.mark.slow
def test_server_stopped_mid_run_keeps_completed_answers(fresh_openai_server, fresh_proxy,
                                                        tmp_path):
    """Issue 2: the server goes away mid-run -> one clear line naming the expert, every
    finished answer kept (cache and -o file), and a rerun makes only the missing ones.

    The server is stopped (SIGTERM) when the 3rd request reaches it, and the proxy, the
    server's address for the client, goes down with it (that request dropped, the retry
    refused). One request at a time, each generation stored before the next is sent: exactly
    2 answers are kept. Server and proxy then come back at the same addresses, so the rerun
    hits the same cache keys (they include the expert's base_url)."""
    server, proxy = fresh_openai_server, fresh_proxy
    n = 4
    pool = write_pool(tmp_path, [openai_expert("smol", proxy.base_url, max_concurrency=1,
                                               max_retries=1, prompt_format="chat",
                                               timeout=300.0)])
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"id": q.id, "question": q.question, "answer": q.answer})
                             + "\n" for q in arithmetic_questions(n)))
    out, cache = tmp_path / "out.jsonl", tmp_path / "cache.sqlite"

    stopped = proxy.on_request(3, server.stop, then=Fault.down())
    proc = run_cli("run", qfile, "-c", pool, "-o", out, "-q", timeout=300)
    assert stopped.is_set() and not server.alive
    assert proxy.count == 3 and [r.fault for r in proxy.requests] == [None, None, "down"]

    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    failed_lines = [x for x in proc.stderr.splitlines() if x.startswith("expert 'smol' failed: ")]
    assert failed_lines == [f"expert 'smol' failed: connection to {proxy.base_url} failed after "
                            "1 retry: ConnectError: All connection attempts failed"], proc.stderr

    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"q{i}" for i in range(n)]  # every question reported
    done = [r for r in rows if r["responses"][0]["error"] is None]
    lost = [r for r in rows if r["responses"][0]["error"] is not None]
    # the two answered are the two questions whose requests the server answered
    asked = [r.json()["messages"][-1]["content"] for r in proxy.requests]
    assert len(done) == 2 and len(lost) == 2
    assert all(a.startswith(r["question"] + "\n") for a, r in zip(asked, done))
    assert all(r["responses"][0]["text"] for r in done)
    assert all(set(r["route"]["failed"]) == {"smol"} for r in lost)
    assert cached_generations(cache) == 2  # nothing finished was lost
    assert _summary(proc.stderr) == {"generations": 2, "cached": 0, "failed": 2}

    # the server comes back, and so does the proxy (same addresses): a rerun completes only
    # the missing ones
    server.start()
    proxy.reset()
    rerun = run_cli("run", qfile, "-c", pool, "-o", out, "-q")
    assert rerun.returncode == 0, rerun.stderr
    assert _summary(rerun.stderr) == {"generations": 2, "cached": 2, "failed": 0}
    assert proxy.count == 3 + 2
    rows2 = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows2) == n and all(r["responses"][0]["error"] is None for r in rows2)
    before = {r["id"]: r["responses"][0]["text"] for r in done}
    assert {r["id"]: r["responses"][0]["text"] for r in rows2 if r["id"] in before} == before


def test_a_stream_cut_short_is_that_generation_s_error(proxy, tmp_path):
    """A streamed answer whose body stops early (the proxy sends half of it), or that ends
    without a finish_reason (as llama_cpp.server ends a stream when another request comes), is
    that generation's error, never a shorter answer."""
    from coe.core.config import load_config
    from coe.text.prompts import build_request

    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "4"},
                          "finish_reason": None}]}
    unfinished = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
    cfg = load_config(write_pool(tmp_path, [openai_expert(
        "smol", proxy.base_url, prompt_format="chat", max_concurrency=1, max_retries=0,
        timeout=300.0, sampling={"max_tokens": 16})]))
    qs = arithmetic_questions(2)
    with Orchestrator(cfg, cache=False) as orch:
        requests = [build_request(cfg.expert("smol"), q) for q in qs]
        proxy.inject(Fault.status(200, body=unfinished))
        gens = orch.executor.run(requests, on_token=lambda i, text: None).generations
        proxy.inject(Fault.truncate())
        cut = orch.executor.run(requests[:1], on_token=lambda i, text: None).generations[0]
    assert gens[0].error == ("stream ended before the answer did (no finish_reason) after 1 "
                             f"pieces ({proxy.base_url})")
    assert gens[1].error is None and gens[1].text and gens[1].finish_reason
    assert cut.error.startswith(f"connection to {proxy.base_url} failed after 0 retries: "
                                "RemoteProtocolError: peer closed connection")


@pytest.mark.server
def test_a_base_url_with_a_query_string_keeps_its_path_and_hides_its_secrets(tmp_path):
    """Azure OpenAI's ``.../deployments/NAME?api-version=...``: each request goes to the
    endpoint's path under the base URL, with the query string sent as parameters; a secret in
    it (a signature) is in nothing coe writes."""
    from tests.support.openai_server import free_port
    from tests.support.proxy import FaultProxy

    endpoint = FaultProxy(f"http://127.0.0.1:{free_port()}")  # no upstream: answers injected
    endpoint.always = Fault.status(200, body=json.dumps({
        "id": "c", "object": "text_completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "text": "The answer is 7.", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}))
    sig = "sig-" + "0123456789abcdef" * 2
    base = endpoint.base_url.replace("/v1", "/openai/deployments/smol")
    pool = write_pool(tmp_path, [openai_expert("azure", f"{base}?api-version=2024-02-01&sig={sig}",
                                               max_retries=0)])
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": "What is 3 + 4?",
                                     "answer": "7"}) + "\n")
    try:
        run = run_cli("run", questions, "-c", pool, "-o", tmp_path / "out.jsonl")
    finally:
        endpoint.close()
    assert run.returncode == 0, run.stderr
    (request,) = endpoint.requests
    assert request.path == f"/openai/deployments/smol/completions?api-version=2024-02-01&sig={sig}"
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["correct"] is True
    for text in (run.stdout, run.stderr, (tmp_path / "out.jsonl").read_text()):
        assert sig not in text
