"""A loopback fault injector in front of the real OpenAI-compatible test server.

``FaultProxy(upstream)`` listens on 127.0.0.1 (a free port) and forwards every request to
``upstream`` (the real ``llama_cpp.server``), except the ones a test tells it to break:

    p.inject(Fault.status(429, retry_after=2), Fault.status(429, retry_after=2))  # next two
    p.always = Fault.status(500)                                                   # every one

Faults: an HTTP status with a JSON error body (and ``Retry-After``), a delay before
forwarding (past the client's timeout), a truncated body (the real response cut in half with
its full ``Content-Length``), a non-JSON body, the connection closed without a response, and
an error that echoes the request headers back (to prove an API key is redacted). It records
every request (path, headers, body, arrival and end time, the fault applied) and the most
requests it ever had in flight at once. It is not a replacement for the server: a request
without a fault gets the real server's answer.
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "proxy-connection", "te", "trailer", "upgrade"}


@dataclass(frozen=True)
class Fault:
    kind: str  # status | delay | truncate | nonjson | close | echo_headers
    code: int = 200  # the HTTP status sent
    retry_after: str | None = None
    seconds: float = 0.0
    body: str = ""

    @classmethod
    def status(cls, code: int, retry_after: float | str | None = None, body: str = "") -> "Fault":
        ra = None if retry_after is None else str(retry_after)
        return cls("status", code=code, retry_after=ra, body=body)

    @classmethod
    def delay(cls, seconds: float) -> "Fault":
        return cls("delay", seconds=seconds)

    @classmethod
    def truncate(cls) -> "Fault":
        return cls("truncate")

    @classmethod
    def nonjson(cls, code: int = 200) -> "Fault":
        return cls("nonjson", code=code)

    @classmethod
    def close(cls) -> "Fault":
        return cls("close")

    @classmethod
    def echo_headers(cls, code: int = 401) -> "Fault":
        return cls("echo_headers", code=code)


NON_JSON_BODY = "<html>\n<head><title>502 Bad Gateway</title></head>\n<body>\n<h1>Bad Gateway</h1>\n</body>\n</html>\n"


@dataclass
class Record:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    start: float
    end: float = 0.0
    fault: str | None = None
    status: int | None = None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers.items() if k.lower() == name.lower()), None)

    def json(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            return {}


@dataclass
class _State:
    upstream: tuple[str, int]
    faults: deque = field(default_factory=deque)
    always: Fault | None = None
    records: list[Record] = field(default_factory=list)
    inflight: int = 0
    max_inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: the close ends the exchange
    server: "_Server"

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    # -- plumbing ---------------------------------------------------------------------------
    def _handle(self) -> None:
        st = self.server.state
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        rec = Record(self.command, self.path, dict(self.headers.items()), body, time.monotonic())
        with st.lock:
            fault = None
            if self.command == "POST":
                fault = st.faults.popleft() if st.faults else st.always
            rec.fault = fault.kind if fault else None
            st.records.append(rec)
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
        try:
            self._serve(rec, fault)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the client gave up (its timeout): nothing to answer
        finally:
            rec.end = time.monotonic()
            with st.lock:
                st.inflight -= 1

    def _serve(self, rec: Record, fault: Fault | None) -> None:
        if fault is None:
            return self._relay(rec, *self._forward(rec))
        kind = fault.kind
        if kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            body = fault.body or json.dumps({"error": {"message": f"injected {fault.code}",
                                                       "type": "injected"}})
            return self._send(rec, fault.code, body.encode(), "application/json", headers)
        if kind == "delay":
            if self.server.state.stopping.wait(fault.seconds) or self._client_gone():
                return None  # no point generating an answer nobody will read
            return self._relay(rec, *self._forward(rec))
        if kind == "truncate":
            status, headers, body = self._forward(rec)
            self.send_response(status)
            self.send_header("Content-Type", headers.get("content-type", "application/json"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            rec.status = status
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if kind == "nonjson":
            return self._send(rec, fault.code, NON_JSON_BODY.encode(), "text/html", {})
        if kind == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        if kind == "echo_headers":
            body = json.dumps({"error": {"message": "invalid api key; request headers were: "
                                         + json.dumps(rec.headers), "type": "auth"}})
            return self._send(rec, fault.code, body.encode(), "application/json", {})
        raise ValueError(f"unknown fault {kind!r}")

    def _client_gone(self) -> bool:
        r, _, _ = select.select([self.connection], [], [], 0)
        if not r:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _forward(self, rec: Record) -> tuple[int, dict[str, str], bytes]:
        host, port = self.server.state.upstream
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            headers = {k: v for k, v in rec.headers.items() if k.lower() not in HOP_HEADERS}
            conn.request(rec.method, rec.path, body=rec.body or None, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        except (ConnectionError, OSError, http.client.HTTPException) as e:
            body = json.dumps({"error": {"message": f"upstream unreachable: {e}"}}).encode()
            return 502, {"content-type": "application/json"}, body
        finally:
            conn.close()

    def _relay(self, rec: Record, status: int, headers: dict[str, str], body: bytes) -> None:
        extra = {k: v for k, v in headers.items()
                 if k not in HOP_HEADERS and k not in ("content-type", "date", "server")}
        self._send(rec, status, body, headers.get("content-type", "application/json"), extra)

    def _send(self, rec: Record, status: int, body: bytes, ctype: str,
              headers: dict[str, str]) -> None:
        rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class FaultProxy:
    def __init__(self, upstream: str):
        u = urlsplit(upstream)
        assert u.hostname == "127.0.0.1", "loopback only"
        self.state = _State(upstream=(u.hostname, u.port or 80))
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.state = self.state
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- control ----------------------------------------------------------------------------
    def inject(self, *faults: Fault) -> None:
        """Apply these faults, in order, to the next POST requests."""
        with self.state.lock:
            self.state.faults.extend(faults)

    @property
    def always(self) -> Fault | None:
        return self.state.always

    @always.setter
    def always(self, fault: Fault | None) -> None:
        with self.state.lock:
            self.state.always = fault

    # -- observation ------------------------------------------------------------------------
    @property
    def requests(self) -> list[Record]:
        """The POST requests seen so far (generation calls)."""
        with self.state.lock:
            return [r for r in self.state.records if r.method == "POST"]

    @property
    def count(self) -> int:
        return len(self.requests)

    @property
    def max_inflight(self) -> int:
        return self.state.max_inflight

    def close(self) -> None:
        self.state.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
