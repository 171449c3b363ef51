"""Issue 14, defect 1: an expert's ``timeout`` bounds the whole response, and API experts do not
wait on each other.

A "drip" server (below, on 127.0.0.1) answers every POST with an HTTP 200 head and then one
space a second: JSON (or SSE) whitespace, so the body is never complete and no single read ever
waits long. A per-read timeout never fires on it; only a bound on the whole attempt does.

Outcomes are decided by events, never by a clock: the drip ends when the client hangs up (its
timeout), when a test's ``release`` condition holds (the proxy in front of the real server has
seen the other expert's requests end), or at a safety limit no passing test reaches.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from coe.apps.api import Orchestrator
from tests.support.openai_server import MODEL_ALIAS, arithmetic_questions, openai_expert, write_pool

DRIP_LIMIT = 60.0  # safety only: seconds after which the drip server gives up on everything
PACE = 1.0  # one byte this often


@dataclass
class DripRecord:
    path: str
    start: float
    end: float = 0.0
    outcome: str = ""  # client (it hung up) | released | limit


COMPLETION = {"id": "drip", "object": "text_completion", "created": 0, "model": MODEL_ALIAS,
              "choices": [{"text": " 42", "index": 0, "logprobs": None, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


class DripServer:
    """Every POST: a 200 head at once, then a space every ``PACE`` s until the client hangs
    up, ``release()`` is true (then a real completion body) or the safety limit (then the
    connection closes)."""

    def __init__(self, release: Callable[[], bool] | None = None):
        self.release = release or (lambda: False)
        self.records: list[DripRecord] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.arrived = threading.Event()  # set by the first POST
        self.deadline = time.monotonic() + DRIP_LIMIT
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"  # the body ends when the connection closes

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                rec = DripRecord(self.path, time.monotonic())
                with owner.lock:
                    owner.records.append(rec)
                owner.arrived.set()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream" if body.get("stream")
                                     else "application/json")
                    self.end_headers()
                    self.wfile.flush()
                    rec.outcome = self._drip()
                    if rec.outcome == "released":
                        self.wfile.write(json.dumps(COMPLETION).encode())
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    rec.outcome = "client"
                finally:
                    rec.end = time.monotonic()

            def _drip(self) -> str:
                while True:
                    if owner.release():
                        return "released"
                    if owner.stopping.is_set() or time.monotonic() >= owner.deadline:
                        return "limit"
                    # the pace: wait for the client to hang up, at most PACE s
                    r, _, _ = select.select([self.connection], [], [], PACE)
                    if r and self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return "client"
                    self.wfile.write(b" ")
                    self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def drip():
    servers: list[DripServer] = []

    def make(release: Callable[[], bool] | None = None) -> DripServer:
        servers.append(DripServer(release))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def one_line(msg: str) -> bool:
    return bool(msg) and "\n" not in msg and len(msg) <= 300


@pytest.mark.parametrize("retries", [0, 1])
def test_timeout_bounds_a_dripping_response(drip, proxy, tmp_path, retries):
    """``timeout: 2`` against a server that sends a byte a second: each attempt is cut at 2 s
    (the client hangs up; the drip server did not give up first), the error is the one-line
    timeout error, and the expert on the real server answered every question."""
    server = drip()
    qs = arithmetic_questions(3)
    pool = write_pool(tmp_path, [
        openai_expert("drip", server.base_url, timeout=2, max_retries=retries,
                      max_concurrency=1),
        openai_expert("live", proxy.base_url)])
    t0 = time.monotonic()
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(qs)
    wall = time.monotonic() - t0
    errors = [next(x for x in r.responses if x.expert == "drip").error for r in run.results]
    after = f"after {retries} {'retry' if retries == 1 else 'retries'}"
    first = f"timed out (2s) {after}: {server.base_url}"
    assert errors[0] == first and one_line(first)
    assert errors[1:] == [f"not sent, endpoint down: {first}"] * 2  # the circuit breaker
    assert run.stats.failures == {"drip": first}
    # the client ended every attempt (max_retries + 1 of them), not the drip server's limit
    assert [r.outcome for r in server.records] == ["client"] * (retries + 1)
    live = [next(x for x in r.responses if x.expert == "live") for r in run.results]
    assert all(x.error is None and x.text for x in live)
    assert wall < DRIP_LIMIT  # safety bound only; the figure is printed
    spans = [round(r.end - r.start, 2) for r in server.records]
    print(f"\ndrip, timeout 2s, max_retries {retries}: run wall time {wall:.2f}s; "
          f"drip attempts open (server side) {spans}s")


def test_timeout_bounds_a_dripping_stream(drip, tmp_path):
    """A streamed answer (what ``coe serve`` asks of an llm aggregator) is bounded too."""
    from coe.core.config import load_config
    from coe.text.prompts import build_request

    server = drip()
    cfg = load_config(write_pool(tmp_path, [openai_expert(
        "drip", server.base_url, prompt_format="chat", timeout=2, max_retries=0)]))
    with Orchestrator(cfg, cache=False) as orch:
        req = build_request(cfg.expert("drip"), arithmetic_questions(1)[0])
        gen = orch.executor.run([req], on_token=lambda i, text: None).generations[0]
    assert gen.error == f"timed out (2s) reading the streamed answer: {server.base_url}"
    assert [r.outcome for r in server.records] == ["client"]


def test_api_experts_do_not_wait_on_each_other(drip, proxy, tmp_path):
    """Two API experts; the slow one comes first in the plan and its answer is released only
    once the proxy in front of the real server has seen every request of the other expert
    *end*: that happens only if the two run at the same time. Both answer everything."""
    n = 3
    server = drip(release=lambda: sum(r.ended for r in proxy.requests) >= n)
    # and the first live request is answered only once the slow one is open: they overlap
    proxy.on_request(1, lambda: server.arrived.wait(DRIP_LIMIT))
    qs = arithmetic_questions(n)
    pool = write_pool(tmp_path, [
        openai_expert("slow", server.base_url, timeout=120, max_retries=0, max_concurrency=1),
        openai_expert("live", proxy.base_url, max_concurrency=1)])
    with Orchestrator.from_yaml(pool) as orch:
        run = orch.run(qs)
    assert run.stats.failures == {} and run.stats.generations == 2 * n
    for r in run.results:
        assert [x.expert for x in r.responses] == ["slow", "live"]
        assert all(x.error is None and x.text for x in r.responses)
    assert [r.text for r in run.results[0].responses[:1]] == [" 42"]
    # the first slow request was open while every live request was answered
    first = server.records[0]
    live = proxy.requests
    assert len(live) == n and first.outcome == "released"
    assert all(first.start < r.end < first.end for r in live)
