"""A loopback fault injector in front of the real OpenAI-compatible test server.

``FaultProxy(upstream)`` listens on 127.0.0.1 (a free port, or ``port=``) and forwards every
request to ``upstream`` (the real ``llama_cpp.server``), except the ones a test tells it to
break:

    p.inject(Fault.status(429, retry_after=2), Fault.status(429, retry_after=2))  # next two
    p.always = Fault.status(500)                                                   # every one
    p.on_request(3, server.stop, then=Fault.down())    # on the 3rd POST: act, then go down

Faults: an HTTP status with a JSON error body (and ``Retry-After``), a request held without an
answer until the client gives up (``hang``), an answer kept alive until another request has
arrived or ended (``hold``), a truncated body (the real response cut in half with its full
``Content-Length``), a non-JSON body, the connection closed without a response, the proxy
going down (connections refused from then on, like a stopped server), and an error that
echoes the request headers back (to prove an API key is redacted).

Every fault is decided by *events*, never by a clock: the N-th POST's arrival
(``on_request``), another request's arrival or end (``hold``), the client closing its
connection (``hang``). Nothing here sleeps to decide an outcome; the only waits are for those
events, each bounded by a generous safety limit.

It records every request (path, headers, body, arrival, when its answer started going out,
end, the fault applied) and the most requests it ever had in flight at once. It is not a
replacement for the server: a request without a fault gets the real server's answer.
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
from typing import Callable
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host",
               "proxy-connection", "te", "trailer", "upgrade"}

# Safety limits only (a test that goes wrong must still end); no outcome depends on them.
HANG_LIMIT = 600.0  # seconds a hung request waits for its client to give up
HOLD_LIMIT = 600.0  # seconds a held answer waits for its event
KEEPALIVE = 0.2  # a held answer sends one byte of JSON whitespace this often


@dataclass(frozen=True)
class Fault:
    kind: str  # status | hang | hold | truncate | nonjson | close | down | echo_headers
    code: int = 200  # the HTTP status sent
    retry_after: str | None = None
    body: str = ""
    until: tuple[str, int] | None = None  # hold: ("arrived" | "ended", POST number)
    content_type: str = "application/json"  # status: of the body sent

    @classmethod
    def status(cls, code: int, retry_after: float | str | None = None, body: str = "",
               content_type: str = "application/json") -> "Fault":
        ra = None if retry_after is None else str(retry_after)
        return cls("status", code=code, retry_after=ra, body=body, content_type=content_type)

    @classmethod
    def hang(cls) -> "Fault":
        """Never answer: hold the request until the client gives up (its timeout closes the
        connection, or its process dies) or the proxy closes. Only the client can end it."""
        return cls("hang")

    @classmethod
    def hold(cls, *, until_arrived: int | None = None, until_ended: int | None = None) -> "Fault":
        """Forward at once, then keep the real answer in the proxy until POST number N has
        arrived (``until_arrived``) or ended (``until_ended``): the response head goes out
        at once and a space (JSON whitespace) every ``KEEPALIVE`` s, so the client's read
        timeout never fires; the body follows when the event happens (the connection's close
        ends it)."""
        if (until_arrived is None) == (until_ended is None):
            raise ValueError("hold: give exactly one of until_arrived, until_ended")
        until = ("arrived", until_arrived) if until_arrived is not None else ("ended", until_ended)
        return cls("hold", until=until)

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
    def down(cls) -> "Fault":
        """The proxy stops listening (every later connection is refused, as by a server that
        is no longer there) and closes this request's connection without an answer.
        ``FaultProxy.reset`` brings it back at the same address."""
        return cls("down")

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
    start: float  # arrival (the whole request read)
    number: int = 0  # POST number (1-based, since the proxy started); 0 for other methods
    sent: float = 0.0  # when the answer's first byte was about to go out (0: no answer)
    end: float = 0.0
    ended: bool = False
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
class _Trigger:
    action: Callable[[], object] | None
    then: Fault | None
    fired: threading.Event = field(default_factory=threading.Event)


@dataclass
class _State:
    upstream: tuple[str, int]
    faults: deque = field(default_factory=deque)
    always: Fault | None = None
    triggers: dict[int, _Trigger] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    posts: int = 0
    inflight: int = 0
    max_inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = None  # type: ignore[assignment]  # on ``lock``
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def post(self, n: int) -> Record | None:
        return next((r for r in self.records if r.number == n), None)


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
        trigger = None
        with st.lock:
            fault = None
            if self.command == "POST":
                st.posts += 1
                rec.number = st.posts
                trigger = st.triggers.pop(rec.number, None)
                if trigger is not None and trigger.then is not None:
                    st.always = trigger.then  # this request and every later one
                    st.faults.clear()
                fault = st.faults.popleft() if st.faults else st.always
            rec.fault = fault.kind if fault else None
            st.records.append(rec)
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
            st.changed.notify_all()
        try:
            if trigger is not None:
                try:
                    if trigger.action is not None:
                        trigger.action()
                finally:
                    trigger.fired.set()
            self._serve(rec, fault)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # the client gave up (its timeout, or its process died): nothing to answer
        finally:
            with st.lock:
                rec.end = time.monotonic()
                rec.ended = True
                st.inflight -= 1
                st.changed.notify_all()

    def _serve(self, rec: Record, fault: Fault | None) -> None:
        if fault is None:
            return self._relay(rec, *self._forward(rec))
        kind = fault.kind
        if kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            body = fault.body or json.dumps({"error": {"message": f"injected {fault.code}",
                                                       "type": "injected"}})
            return self._send(rec, fault.code, body.encode(), fault.content_type, headers)
        if kind == "hang":
            return self._hang()
        if kind == "hold":
            return self._hold(rec, fault.until)
        if kind == "truncate":
            status, headers, body = self._forward(rec)
            rec.sent = time.monotonic()
            self.send_response(status)
            self.send_header("Content-Type", headers.get("content-type", "application/json"))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            rec.status = status
            return self._hang_up()
        if kind == "nonjson":
            return self._send(rec, fault.code, NON_JSON_BODY.encode(), "text/html", {})
        if kind == "close":
            return self._hang_up()
        if kind == "down":
            self.server.go_down()  # refuse every later connection first...
            return self._hang_up()  # ...then drop this one, as a stopped server would
        if kind == "echo_headers":
            body = json.dumps({"error": {"message": "invalid api key; request headers were: "
                                         + json.dumps(rec.headers), "type": "auth"}})
            return self._send(rec, fault.code, body.encode(), "application/json", {})
        raise ValueError(f"unknown fault {kind!r}")

    def _hang_up(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _client_gone(self, wait: float = 0.0) -> bool:
        """Whether the client closed its end, waiting up to ``wait`` s for it to happen."""
        r, _, _ = select.select([self.connection], [], [], wait)
        if not r:
            return False
        try:
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _hang(self) -> None:
        """Answer nothing until the client closes the connection (or the proxy stops)."""
        stopping = self.server.state.stopping
        deadline = time.monotonic() + HANG_LIMIT
        while not stopping.is_set() and time.monotonic() < deadline:
            if self._client_gone(wait=0.1):
                return

    def _hold(self, rec: Record, until: tuple[str, int]) -> None:
        st = self.server.state
        what, n = until

        def happened() -> bool:
            if what == "arrived":
                return st.posts >= n
            other = st.post(n)
            return other is not None and other.ended

        status, headers, body = self._forward(rec)
        rec.sent = time.monotonic()
        rec.status = status
        # the head now, without a Content-Length: the body ends when the connection closes
        self.send_response(status)
        self.send_header("Content-Type", headers.get("content-type", "application/json"))
        self.end_headers()
        deadline = time.monotonic() + HOLD_LIMIT
        while True:
            with st.lock:
                if happened() or st.stopping.is_set() or time.monotonic() >= deadline:
                    break
                if st.changed.wait(KEEPALIVE) and happened():
                    break
            self.wfile.write(b" ")  # leading whitespace: still the same JSON
        self.wfile.write(body)
        self.wfile.flush()
        self._hang_up()

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
        rec.sent = time.monotonic()  # before the first byte: the client cannot have it earlier
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
    go_down: Callable[[], None]


class FaultProxy:
    def __init__(self, upstream: str, port: int | None = None):
        u = urlsplit(upstream)
        assert u.hostname == "127.0.0.1", "loopback only"
        self.state = _State(upstream=(u.hostname, u.port or 80))
        self._lock = threading.Lock()  # listening / not listening
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = port or 0
        self._listen()

    def _listen(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            server = _Server(("127.0.0.1", self.port), _Handler)
            server.state = self.state
            server.go_down = self._stop_listening
            self.port = server.server_address[1]
            self._server = server
            self._thread = threading.Thread(target=server.serve_forever,
                                            kwargs={"poll_interval": 0.05}, daemon=True)
            self._thread.start()

    def _stop_listening(self) -> None:
        """Close the listening socket (later connections are refused); requests already in
        flight go on. Safe from a handler thread."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=30)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def listening(self) -> bool:
        return self._server is not None

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

    def on_request(self, n: int, action: Callable[[], object] | None = None,
                   then: Fault | None = None) -> threading.Event:
        """When POST number ``n`` (counted from the proxy's start, as ``count``) *arrives*:
        from it on every POST gets ``then`` (when given: it replaces ``always`` and any
        injected faults still queued), ``action()`` runs (in that request's thread, before it
        is served: stop or kill the upstream server, signal the client's process...), and the
        request is served. Returns an event set once the action has run."""
        with self.state.lock:
            assert n > self.state.posts, f"POST {n} has already arrived"
            trigger = self.state.triggers[n] = _Trigger(action, then)
        return trigger.fired

    def reset(self) -> None:
        """Forget every queued fault, ``always`` and pending ``on_request`` (not the records),
        and listen again if the proxy went down: same address, everything forwarded."""
        with self.state.lock:
            self.state.faults.clear()
            self.state.always = None
            self.state.triggers.clear()
        self._listen()

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
        with self.state.lock:
            self.state.changed.notify_all()
        self._stop_listening()
