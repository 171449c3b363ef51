"""``coe serve`` under a hostile client: silent and slow sockets are closed, connections are
bounded, bad bodies are 400s, what is logged and echoed is cut and escaped, a port in use is
one line before anything says "ready", a client that leaves leaves no traceback behind, and a
secret split across streamed pieces never reaches the stream.

A real ``coe serve`` subprocess over a replay expert and an OpenAI expert whose endpoint is a
``FaultProxy`` with no upstream: every answer of the endpoint is injected, so nothing loads a
model and every fault is driven by request counts.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import openai
import pytest

from tests.conftest import write_jsonl
from tests.support.coe_server import CoeServer
from tests.support.openai_server import free_port, openai_expert, write_pool
from tests.support.proxy import Fault, FaultProxy

pytestmark = pytest.mark.server

SECRET = f"sk-{uuid.uuid4().hex}{uuid.uuid4().hex}"  # the api expert's key
IDLE = 2.0  # the server's --idle-timeout in these tests


@pytest.fixture(scope="module")
def endpoint():
    p = FaultProxy(f"http://127.0.0.1:{free_port()}")  # no upstream: every answer injected
    try:
        yield p
    finally:
        p.close()


def _pool(d, endpoint):
    write_jsonl(d / "memo.jsonl", [{"id": f"q{i}", "text": f"Answer: {i + 1}"} for i in range(9)])
    return write_pool(d, [
        {"name": "memo", "backend": "replay", "model": "memo.jsonl"},
        openai_expert("api", endpoint.base_url, api_key_env="COE_TEST_SECRET", max_retries=0,
                      max_concurrency=1, timeout=120)], router={"kind": "all"})


@pytest.fixture(scope="module")
def server(tmp_path_factory, endpoint):
    d = tmp_path_factory.mktemp("serve-stays-up")
    (d / "cache").mkdir()
    srv = CoeServer(_pool(d, endpoint), d, "--idle-timeout", str(IDLE), "--batch-window-ms",
                    "0", "--max-batch", "1", env={"COE_TEST_SECRET": SECRET,
                                                  "COE_CACHE_DIR": str(d / "cache")}).start()
    try:
        yield srv
    finally:
        srv.stop()


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds (its read sees the end)."""
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def _error(status_body_headers) -> tuple[int, dict]:
    status, body, _ = status_body_headers
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "\n" not in body["error"]["message"]
    return status, body["error"]


# -- 6: idle connections, slow headers, a connection limit ----------------------------------

def test_silent_and_slow_connections_are_closed(server):
    silent = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(50)]
    slow = socket.create_connection(("127.0.0.1", server.port))
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < IDLE + 30:  # a header line a byte at a time
            readable, _, _ = select.select([slow], [], [], 0.3)
            if readable and slow.recv(1024) == b"":
                break
            slow.sendall(b"X")
        else:
            pytest.fail("a connection sending its headers a byte at a time was never closed")
        assert all(_closed_by_server(s, IDLE + 30) for s in silent)
    finally:
        for s in [*silent, slow]:
            s.close()
    assert server.get("/health")[0] == 200  # and the server serves on


def test_connections_beyond_the_limit_are_closed_at_once(tmp_path, endpoint):
    srv = CoeServer(_pool(tmp_path, endpoint), tmp_path, "--max-connections", "20",
                    "--idle-timeout", "300", env={"COE_TEST_SECRET": SECRET}).start()
    socks = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(26)]
    try:
        deadline = time.monotonic() + 30
        closed: set[int] = set()
        while len(closed) < 6 and time.monotonic() < deadline:
            readable, _, _ = select.select([s for i, s in enumerate(socks) if i not in closed],
                                           [], [], 1)
            closed |= {socks.index(s) for s in readable if s.recv(1) == b""}
        assert sorted(closed) == list(range(20, 26))  # the six beyond the limit
        socks[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the others serve
        socks[0].settimeout(30)
        assert socks[0].recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        for s in socks:
            s.close()
        assert srv.stop() == 0


# -- 7: bodies that used to be 500s ---------------------------------------------------------

def test_bad_bodies_are_400s_and_the_server_stays_healthy(server):
    chat = '"messages": [{"role": "user", "content": "hi"}]'
    bodies = {
        "100,000-deep JSON": b'{"model": "coe", "x": ' + b"[" * 100_000 + b"]" * 100_000
        + b", " + chat.encode() + b"}",
        "a lone surrogate": ('{"model": "coe", "messages": [{"role": "system", "content": '
                             '"\\ud800"}, {"role": "user", "content": "hi"}]}').encode(),
        "a 5,000-digit integer": b'{"model": "coe", "seed": ' + b"9" * 5000 + b", "
        + chat.encode() + b"}",
    }
    for what, body in bodies.items():
        status, error = _error(server.post("/v1/chat/completions", body))
        assert (status, error["type"], error["code"]) == \
            (400, "invalid_request_error", "invalid_json"), (what, error)
    assert "nested more than 64 levels" in _error(server.post(
        "/v1/chat/completions", bodies["100,000-deep JSON"]))[1]["message"]
    assert "lone surrogate" in _error(server.post(
        "/v1/chat/completions", bodies["a lone surrogate"]))[1]["message"]
    # more than 26 choices: refused naming the field (400 once invalid fields are, issue 23)
    status, error = _error(server.post("/v1/chat/completions", {
        "model": "coe", "messages": [{"role": "user", "content": "hi"}],
        "coe": {"choices": [f"c{i}" for i in range(27)]}}))
    assert status in (400, 422) and "needs 1 to 26 choices" in error["message"]
    assert server.get("/health")[0] == 200
    assert "Traceback" not in server.log_path.read_text()


# -- 8: what is logged and echoed -----------------------------------------------------------

def test_a_forged_model_name_is_escaped_in_the_log_and_cut_in_the_error(server):
    forged = "x\n12:00:00 chatcmpl-forged model=coe status=200\x1b[31m"
    status, error = _error(server.post("/v1/chat/completions", {
        "model": forged, "messages": [{"role": "user", "content": "hi"}]}))
    assert status == 404 and "\\n12:00:00" in error["message"] and "\x1b" not in error["message"]
    huge = "m" * 100_000
    status, error = _error(server.post("/v1/chat/completions", {
        "model": huge, "messages": [{"role": "user", "content": "hi"}]}))
    assert status == 404 and len(error["message"]) < 1000
    assert "(100,000 characters)" in error["message"]
    log = server.log_path.read_bytes()
    assert b"\x1b" not in log and b"m" * 200 not in log
    assert not any(line.startswith(b"12:00:00 chatcmpl-forged") for line in log.splitlines())


# -- 10: a client that leaves -----------------------------------------------------------------

def test_a_client_gone_before_its_batch_leaves_no_traceback(tmp_path):
    endpoint = FaultProxy(f"http://127.0.0.1:{free_port()}")  # its own: POSTs counted from 1
    srv = CoeServer(_pool(tmp_path, endpoint), tmp_path, "--max-batch", "1",
                    "--batch-window-ms", "0", env={"COE_TEST_SECRET": SECRET}).start()
    pool = concurrent.futures.ThreadPoolExecutor(2)
    ask = lambda qid: srv.post("/v1/chat/completions", {  # noqa: E731
        "model": "coe", "messages": [{"role": "user", "content": "What?"}], "coe": {"id": qid}})
    try:
        endpoint.inject(Fault.hold(until_arrived=2))  # the first batch's API call waits
        arrived = endpoint.on_request(1)
        first = pool.submit(ask, "q0")
        assert arrived.wait(60)
        body = json.dumps({"model": "coe", "messages": [{"role": "user", "content": "Bye?"}],
                           "coe": {"id": "q1"}}).encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)
            srv.wait_for(lambda: json.loads(srv.get("/health")[1])["queued"] == 1,
                         message="the request queued")
        srv.wait_for(lambda: srv.metric("coe_requests_total", 'model="coe",status="499"') == 1,
                     message="the hang-up noticed")
        try:  # POST 2 (no upstream: a 502): the held answer goes
            urllib.request.urlopen(urllib.request.Request(
                endpoint.base_url + "/completions", data=b"{}", method="POST"), timeout=60)
        except urllib.error.HTTPError as e:
            assert e.code == 502
        assert first.result(120)[0] == 200
        assert ask("q2")[0] == 200  # the next batch (the dropped job is let go)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        endpoint.close()
        assert srv.stop() == 0
    log = srv.log_path.read_text()
    assert "status=499" in log
    assert "never retrieved" not in log and "Traceback" not in log, log


# -- 9: a port in use -------------------------------------------------------------------------

def test_a_port_in_use_is_one_line_and_never_ready(tmp_path, endpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-c", "from coe.apps.cli import main; main()",
                            "serve", "-c", _pool(tmp_path, endpoint), "--port", str(port)],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "COE_TEST_SECRET": SECRET})
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == (f"error: port {port} on 127.0.0.1 is already in use (another "
                                f"server?): choose another with --port"), r.stderr


# -- 4: a secret split across streamed pieces -------------------------------------------------

def _sse(pieces: list[str]) -> str:
    """A streamed text completion (the api expert's prompt format) in these pieces."""
    chunks = [{"id": "c1", "object": "text_completion", "created": 0, "model": "m",
               "choices": [{"index": 0, "text": p, "finish_reason": None}]} for p in pieces]
    chunks.append({"id": "c1", "object": "text_completion", "created": 0, "model": "m",
                   "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def test_a_secret_cut_across_streamed_pieces_never_reaches_the_client(server, endpoint):
    text = f"The key you gave me is {SECRET}, and that is all."
    cut = text.index(SECRET) + 10  # ten characters of the key in one piece, the rest next
    pieces = [text[:cut - 14], text[cut - 14:cut], text[cut:cut + 20], text[cut + 20:]]
    endpoint.always = Fault.status(200, body=_sse(pieces), content_type="text/event-stream")
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                               timeout=120)
        stream = client.chat.completions.create(
            model="api", stream=True, messages=[{"role": "user", "content": "Key?"}])
        chunks = list(stream)
        seen = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finally:
        endpoint.always = None
    streamed = "".join(seen)
    assert streamed == "The key you gave me is ***, and that is all.", chunks[-1].model_extra["coe"]["responses"][0]["error"]
    for i in range(len(SECRET) - 8):  # not even 8 characters of it in a row
        assert SECRET[i:i + 8] not in streamed
