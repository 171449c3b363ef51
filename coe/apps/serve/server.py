"""Running the app under uvicorn: 127.0.0.1 by default, one log line per request on stderr,
and a graceful stop on SIGTERM or Ctrl-C.

The port is bound (and listening) before anything else starts, so "ready" is said only of a
port that is ours; one already in use is one line naming it and exit code 1.

Connections are bounded two ways, so silent sockets cannot pile up until the process runs out
of file descriptors and every client hangs:

- ``idle_timeout``: a connection with no request in progress (before its first request,
  between two, or still sending its headers, however slowly) is closed after that many
  seconds. uvicorn's own keep-alive timer is armed only after a first response and is reset by
  every byte received, so a socket that never sends a request, or sends its headers a byte at
  a time, would stay open for ever: the protocol class below arms a timer of its own when a
  connection is made and again after each response, which only a new request disarms.
- ``max_connections``: a connection beyond it is closed as soon as it is made. (uvicorn's
  ``limit_concurrency`` is not used: it answers 503 only once a request arrives, so the
  connections beyond it that send nothing would each hold a descriptor until their idle
  timeout; the request queue has its own bound, ``--max-queue``, answered 429.)

On SIGTERM uvicorn stops accepting connections, lets every request in flight finish (their
batches run to the end, a queued request still gets its batch), then the app drains the
batcher, unloads the models and the process exits 0."""

from __future__ import annotations

import errno
import ipaddress
import logging
import signal
import socket
import sys

from coe.apps.serve.app import ServeOptions, create_app
from coe.core.config import PoolConfig
from coe.core.errors import CoeError

log = logging.getLogger("coe.serve")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_to_stderr() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening socket on ``host:port``, or a ``CoeError`` naming the port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise CoeError(f"--host {host}: cannot be resolved ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart's TIME_WAIT
        sock.bind(address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CoeError(f"port {port} on {host} is already in use (another server?): "
                           f"choose another with --port") from None
        raise CoeError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def bounded_protocol(idle_timeout: float, max_connections: int):
    """uvicorn's HTTP protocol with the idle timeout and the connection limit of the module
    doc."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class Bounded(AutoHTTPProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                transport.close()  # connection_lost removes it from the set
                return
            self._arm_idle()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_idle()

        def connection_lost(self, exc) -> None:
            timer = getattr(self, "_idle", None)
            if timer is not None:
                timer.cancel()
            super().connection_lost(exc)

        def _arm_idle(self) -> None:
            timer = getattr(self, "_idle", None)
            if timer is not None:
                timer.cancel()
            waiting_since = self.cycle  # a new request replaces it

            def expire() -> None:
                if self.cycle is waiting_since and not self.transport.is_closing():
                    if self.cycle is None or self.cycle.response_complete:
                        self.transport.close()

            self._idle = self.loop.call_later(idle_timeout, expire)

    return Bounded


def run_server(config: PoolConfig, options: ServeOptions) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    import uvicorn

    _log_to_stderr()
    sock = bind(options.host, options.port)  # before anything is loaded or said
    if not _loopback(options.host) and not options.api_key_env:
        log.warning("coe serve: listening on %s without --api-key-env: anyone who can reach "
                    "this port can use every expert", options.host)
    app = create_app(config, options)
    server = uvicorn.Server(uvicorn.Config(
        app, host=options.host, port=options.port, log_level="warning", access_log=False,
        lifespan="on", server_header=False, timeout_keep_alive=5,
        http=bounded_protocol(options.idle_timeout, options.max_connections)))
    # uvicorn handles SIGTERM/SIGINT itself (graceful stop), then re-raises the signal to the
    # handler it found: make that one a no-op so a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit(3)
