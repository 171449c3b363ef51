"""``coe serve`` as a real subprocess on 127.0.0.1, called by the real ``openai`` client.

The default local pool (llama.cpp) answers chat and text completions, streams, lists its
compositions and passes requests through to one expert. A replay expert beside an OpenAI expert
behind the fault proxy (in front of the real ``llama_cpp.server``) drives the rest by request
counts: a held answer keeps a batch busy so the queue fills (429), a client leaves before its
batch (dropped, never sent), SIGTERM arrives with requests queued (all answered, exit 0).
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import socket
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from tests.conftest import write_jsonl
from tests.support.coe_server import CoeServer
from tests.support.openai_server import openai_expert
from tests.support.proxy import Fault, FaultProxy

pytestmark = pytest.mark.server  # every test here runs `coe serve` as a subprocess

REPO = Path(__file__).resolve().parents[3]
KEY = "sk-test-" + "k" * 40


def client(server: CoeServer, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=300)


# -- the default local pool ------------------------------------------------------------------

@pytest.fixture(scope="module")
def local_server(tmp_path_factory, _shared_models):
    """The repository's default pool (three llama.cpp experts, two sets of weights)."""
    d = tmp_path_factory.mktemp("serve-local")
    shutil.copy(REPO / "experts.yaml", d / "experts.yaml")
    # a cache of its own (module fixtures start before the per-test cache isolation), with
    # the session's static embedding model
    (d / "cache").mkdir()
    (d / "cache" / "models").symlink_to(_shared_models, target_is_directory=True)
    server = CoeServer(d / "experts.yaml", d, "--batch-window-ms", "50",
                       env={"COE_CACHE_DIR": str(d / "cache")}).start()
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()


@pytest.mark.slow
def test_models_list_names_compositions_and_experts(local_server):
    ids = [m.id for m in client(local_server).models.list().data]
    assert ids[0] == "coe"
    assert {"coe/all+vote", "coe/category+llm", "coe/category+single"} <= set(ids)
    assert {"smollm2-generalist", "smollm2-math", "gemma3-base"} <= set(ids)
    assert "coe/skill+vote" not in ids  # the default pool has no profiles
    with pytest.raises(openai.NotFoundError, match="needs router.profiles"):
        client(local_server).chat.completions.create(
            model="coe/skill+vote", messages=[{"role": "user", "content": "Hi?"}])


@pytest.mark.slow
def test_chat_completion_carries_the_route_and_every_answer(local_server):
    r = client(local_server).chat.completions.create(
        model="coe", max_tokens=48,
        messages=[{"role": "system", "content": "Reply in English."},
                  {"role": "user", "content": "What is 12 + 7?"}])
    ext = r.model_extra["coe"]
    assert ext["composition"] == "coe" and ext["aggregator"] == "vote"
    assert ext["route"]["category"] == "math"  # the category router's choice, and why
    names = [e["name"] for e in ext["route"]["experts"]]
    assert [x["expert"] for x in ext["responses"]] == names and len(names) == 3
    assert r.choices[0].message.content in [x["text"] for x in ext["responses"]]
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == sum(x["completion_tokens"] for x in ext["responses"])
    assert r.usage.prompt_tokens == sum(x["prompt_tokens"] for x in ext["responses"]) > 0
    assert all(x["completion_tokens"] <= 48 for x in ext["responses"])


@pytest.mark.slow
def test_text_completion_pass_through_and_sampling_override(local_server):
    c = client(local_server)
    r = c.completions.create(model="coe/all+vote", prompt="What is the capital of France?",
                             max_tokens=1)
    ext = r.model_extra["coe"]
    assert r.object == "text_completion" and len(ext["responses"]) == 3
    # max_tokens=1 overrides the yaml's 96 and 16 for this request only
    assert all(x["completion_tokens"] <= 1 for x in ext["responses"])
    assert all(x["finish_reason"] == "length" for x in ext["responses"])

    one = c.chat.completions.create(model="smollm2-math", max_tokens=32,
                                    messages=[{"role": "user", "content": "What is 3 + 4?"}])
    ext = one.model_extra["coe"]
    assert [e["name"] for e in ext["route"]["experts"]] == ["smollm2-math"]
    assert one.choices[0].message.content == ext["responses"][0]["text"] != ""


@pytest.mark.slow
def test_streaming_sends_the_aggregators_tokens_as_they_come(local_server):
    c = client(local_server)
    ask = dict(model="coe/category+llm", max_tokens=40,
               messages=[{"role": "user", "content": "Which planet is the largest?"}])
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                            **ask))
    pieces = [ch.choices[0].delta.content for ch in chunks
              if ch.choices and ch.choices[0].delta.content]
    assert len(pieces) > 3  # token by token, not the answer in one piece
    last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][-1]
    ext = last.model_extra["coe"]
    assert ext["aggregator"].startswith("llm:")
    text = "".join(pieces)
    assert text == ext["aggregator_response"]["text"]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    again = c.chat.completions.create(**ask)  # the same request: from the response cache
    assert again.choices[0].message.content == text
    assert all(x["cached"] for x in again.model_extra["coe"]["responses"])


# -- faults, driven by request counts -----------------------------------------------------------

def replay_and_api_pool(tmp_path: Path, api_url: str) -> Path:
    """Two experts: a replay (answers q0..q9 at once; the stronger, so it wins a tie) and an
    OpenAI expert at ``api_url``."""
    write_jsonl(tmp_path / "memo.jsonl",
                [{"id": f"q{i}", "text": f"Answer: {i + 1}"} for i in range(10)])
    cfg = tmp_path / "pool.yaml"
    cfg.write_text(yaml.safe_dump({
        "experts": [{"name": "memo", "backend": "replay", "model": "memo.jsonl", "strength": 0.9},
                    openai_expert("api", api_url, max_retries=0, strength=0.1)],
        "router": {"kind": "all"}, "cache": "cache.sqlite"}))
    return cfg


def ask(server: CoeServer, qid: str, key: str = KEY):
    return client(server, key).chat.completions.create(
        model="coe", messages=[{"role": "user", "content": f"What is {qid[1:]} + 1?"}],
        extra_body={"coe": {"id": qid, "kind": "number"}})


def release(proxy: FaultProxy) -> None:
    """A POST of the test's own to the proxy: the arrival a held answer waits for."""
    body = json.dumps({"model": "x", "prompt": "1", "max_tokens": 1}).encode()
    req = urllib.request.Request(proxy.base_url + "/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def queued(server: CoeServer) -> int:
    status, body = server.get("/health")
    return json.loads(body).get("queued", -1) if status == 200 else -1


def test_bad_requests_get_the_right_status_and_one_line(tmp_path, proxy):
    cfg = replay_and_api_pool(tmp_path, proxy.base_url)
    server = CoeServer(cfg, tmp_path, "--api-key-env", "COE_TEST_KEY", "--max-body-bytes",
                       "2000", env={"COE_TEST_KEY": KEY}).start()
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        def error(status_body):
            status, body, _ = status_body
            msg = body["error"]["message"]
            assert "\n" not in msg
            return status, msg

        assert error(server.post("/v1/chat/completions", b"{not json", auth))[0] == 400
        status, msg = error(server.post("/v1/chat/completions", {
            "model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, auth))
        assert status == 404 and "unknown model 'gpt-9'" in msg
        assert "coe, coe/all+vote" in msg and "memo, api" in msg
        assert error(server.post("/v1/chat/completions", {"model": "coe"}, auth)) == \
            (400, "messages: Field required")
        big = {"model": "coe", "messages": [{"role": "user", "content": "x" * 3000}]}
        assert error(server.post("/v1/chat/completions", big, auth))[0] == 413
        # the key: missing, wrong; never in the log
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}):
            assert error(server.post("/v1/chat/completions", {
                "model": "coe", "messages": [{"role": "user", "content": "x"}]}, headers))[0] == 401
        with pytest.raises(openai.AuthenticationError):
            ask(server, "q1", key="sk-wrong")
        assert server.get("/health")[0] == 200  # a probe needs no key
        assert server.get("/metrics")[0] == 401 and server.get("/v1/models")[0] == 401

        # an expert that fails mid-request: the other answers, the response names the failure
        proxy.always = Fault.status(400, body='{"error": {"message": "model overloaded"}}')
        r = ask(server, "q4")
        ext = r.model_extra["coe"]
        assert r.choices[0].message.content == "Answer: 5" and ext["final_answer"] == "5"
        assert list(ext["failed"]) == ["api"] and "HTTP 400" in ext["failed"]["api"]
        assert server.metric("coe_expert_failures_total", 'expert="api"', auth) == 1
        assert server.metric("coe_requests_total", 'model="-",status="401"', auth) == 4  # before the body is read
    finally:
        assert server.stop() == 0
    assert KEY not in server.log_path.read_text()
    assert "What is" not in server.log_path.read_text()  # prompts only with --log-prompts


def test_a_full_queue_answers_429_with_retry_after(tmp_path, proxy):
    cfg = replay_and_api_pool(tmp_path, proxy.base_url)
    server = CoeServer(cfg, tmp_path, "--max-queue", "1", "--max-batch", "1",
                       "--batch-window-ms", "0", "--log-prompts").start()
    pool = concurrent.futures.ThreadPoolExecutor(2)
    try:
        proxy.inject(Fault.hold(until_arrived=2))  # the first API call waits for our POST
        arrived = proxy.on_request(1)
        first = pool.submit(ask, server, "q1")
        assert arrived.wait(60)  # batch 1 is running, held
        second = pool.submit(ask, server, "q2")
        server.wait_for(lambda: queued(server) == 1, message="the second request queued")
        with pytest.raises(openai.RateLimitError) as e:
            ask(server, "q3")
        assert int(e.value.response.headers["retry-after"]) >= 1
        assert "too many requests waiting (1)" in e.value.message
        release(proxy)
        assert first.result(120).model_extra["coe"]["final_answer"] == "2"
        assert second.result(120).model_extra["coe"]["failed"] == {}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        assert server.stop() == 0
    assert "prompt='What is 1 + 1?'" in server.log_path.read_text()


def test_a_client_gone_before_its_batch_is_dropped(tmp_path, proxy):
    cfg = replay_and_api_pool(tmp_path, proxy.base_url)
    server = CoeServer(cfg, tmp_path, "--max-batch", "1", "--batch-window-ms", "0").start()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        proxy.inject(Fault.hold(until_arrived=2))
        arrived = proxy.on_request(1)
        first = pool.submit(ask, server, "q1")
        assert arrived.wait(60)
        # a raw client sends its request, waits until it is queued, and hangs up
        body = json.dumps({"model": "coe", "messages": [{"role": "user", "content": "Bye?"}],
                           "coe": {"id": "q7"}}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)
            server.wait_for(lambda: queued(server) == 1, message="the request queued")
        server.wait_for(lambda: server.metric("coe_requests_total",
                                              'model="coe",status="499"') == 1,
                        message="the hang-up noticed")
        release(proxy)
        assert first.result(120).model_extra["coe"]["final_answer"] == "2"
        server.wait_for(lambda: queued(server) == 0 and
                        server.metric("coe_batches_total") == 1, message="the queue drained")
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        assert server.stop() == 0
    # the dropped request's question never reached the API expert (POST 2 was the release)
    assert [r.number for r in proxy.requests if r.method == "POST"] == [1, 2]


def test_sigterm_answers_every_accepted_request_and_exits_0(tmp_path, proxy):
    cfg = replay_and_api_pool(tmp_path, proxy.base_url)
    server = CoeServer(cfg, tmp_path, "--batch-window-ms", "0").start()
    pool = concurrent.futures.ThreadPoolExecutor(6)
    try:
        proxy.inject(Fault.hold(until_arrived=2))
        arrived = proxy.on_request(1)
        futures = [pool.submit(ask, server, "q0")]
        assert arrived.wait(60)
        futures += [pool.submit(ask, server, f"q{i}") for i in range(1, 6)]
        server.wait_for(lambda: queued(server) == 5, message="five requests queued")
        server.proc.send_signal(15)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                return False
            except OSError:
                return True

        server.wait_for(refused, message="no new connections after SIGTERM")
        release(proxy)
        results = [f.result(120) for f in futures]
        assert [r.model_extra["coe"]["final_answer"] for r in results] == \
            [str(i + 1) for i in range(6)]
        assert server.proc.wait(60) == 0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        server.stop()
    assert "status=5" not in server.log_path.read_text()


def test_an_unset_key_variable_is_one_line_before_anything_starts(tmp_path, monkeypatch):
    from tests.support.openai_server import run_cli

    monkeypatch.delenv("COE_UNSET_KEY", raising=False)
    cfg = replay_and_api_pool(tmp_path, "http://127.0.0.1:9/v1")
    r = run_cli("serve", "-c", cfg, "--api-key-env", "COE_UNSET_KEY", timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --api-key-env: environment variable COE_UNSET_KEY is not set"
