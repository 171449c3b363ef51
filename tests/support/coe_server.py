"""A real ``coe serve`` subprocess on 127.0.0.1 for the service's tests.

``CoeServer(config, tmp_path, *args).start()`` runs ``coe serve -c CONFIG --port P ARGS`` and
returns once ``/health`` answers 200 (the pool checked, every composition built); ``stop()``
sends SIGTERM and returns the exit code. Every wait has a deadline.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import yaml

from tests.support.openai_server import ServerProcess, free_port

START_TIMEOUT = 600.0  # the first start distils the static encoder: minutes on a busy machine


class CoeServer(ServerProcess):
    def __init__(self, config: Path, log_dir: Path, *args: str, env: dict | None = None):
        port = free_port()
        super().__init__(Path(log_dir) / f"coe-serve-{port}.log", port)
        self.config = Path(config)
        self.args = [str(a) for a in args]
        self.env = {**os.environ, **(env or {})}

    def start(self) -> "CoeServer":
        self.spawn([sys.executable, "-c", "from coe.apps.cli import main; main()", "serve",
                    "-c", str(self.config), "--port", str(self.port), *self.args], self.env)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"coe serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.root}/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        self.stop(kill=True)
        raise RuntimeError(f"coe serve not ready within {START_TIMEOUT:.0f}s:\n{self.log()}")

    def get(self, path: str, headers: dict | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(self.root + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def post(self, path: str, body: bytes | dict, headers: dict | None = None
             ) -> tuple[int, dict, dict]:
        """(status, JSON body, headers) of a raw POST: for requests the openai client would
        refuse to send (invalid JSON, oversized bodies)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.root + path, data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read()), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}"), dict(e.headers)

    def metric(self, name: str, labels: str = "", headers: dict | None = None) -> float:
        """The value of one series of /metrics (0 when absent)."""
        status, text = self.get("/metrics", headers)
        assert status == 200, text
        series = f"{name}{{{labels}}}" if labels else name
        for line in text.decode().splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_for(self, what, timeout: float = 60.0, message: str = "") -> None:
        """Poll ``what()`` (the server's own state) until true; bounded."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if what():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {message or what}:\n{self.log()}")

    def stop(self, kill: bool = False, timeout: float = 60.0) -> int | None:
        return super().stop(kill, timeout)

    def log(self, n: int = 40) -> str:
        return self.log_tail(n)


@contextmanager
def serving(folder: Path, pool: dict, shared_models: Path):
    """``coe serve`` over ``pool`` (written to ``folder/pool.yaml``), its cache in ``folder``
    with the session's distilled encoder linked in; stopped (exit 0 checked) at the end."""
    folder = Path(folder)
    (folder / "pool.yaml").write_text(yaml.safe_dump(pool))
    (folder / "cache").mkdir()
    (folder / "cache" / "models").symlink_to(shared_models, target_is_directory=True)
    s = CoeServer(folder / "pool.yaml", folder,
                  env={"COE_CACHE_DIR": str(folder / "cache")}).start()
    try:
        yield s
    finally:
        assert s.stop() == 0, s.log()
