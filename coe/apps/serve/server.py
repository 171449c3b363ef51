"""Running the app under uvicorn: 127.0.0.1 by default, one log line per request on stderr,
and a graceful stop on SIGTERM or Ctrl-C.

On SIGTERM uvicorn stops accepting connections, lets every request in flight finish (their
batches run to the end, a queued request still gets its batch), then the app drains the
batcher, unloads the models and the process exits 0."""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys

from coe.apps.serve.app import ServeOptions, create_app
from coe.core.config import PoolConfig

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


def run_server(config: PoolConfig, options: ServeOptions) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    import uvicorn

    _log_to_stderr()
    if not _loopback(options.host) and not options.api_key_env:
        log.warning("coe serve: listening on %s without --api-key-env: anyone who can reach "
                    "this port can use every expert", options.host)
    app = create_app(config, options)
    server = uvicorn.Server(uvicorn.Config(
        app, host=options.host, port=options.port, log_level="warning", access_log=False,
        lifespan="on", server_header=False, timeout_keep_alive=5))
    # uvicorn handles SIGTERM/SIGINT itself (graceful stop), then re-raises the signal to the
    # handler it found: make that one a no-op so a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if not server.started:
        raise SystemExit(3)
