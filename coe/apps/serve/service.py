"""The service's state: the pool's compositions over one executor (built by
``coe.execution.build_executor``, models resident between batches), the batcher, the metrics,
the API key and the body limit."""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request

from coe.apps.serve.batcher import Batcher, BatchReport
from coe.apps.serve.compositions import DEFAULT, Compositions, UnknownModel
from coe.apps.serve.errors import ApiError
from coe.apps.serve.metrics import Metrics
from coe.core.config import PoolConfig
from coe.core.errors import ConfigError
from coe.core.types import Question
from coe.execution import Executor, build_executor
from coe.io.cache import open_cache

log = logging.getLogger("coe.serve")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    batch_window_ms: float = 20.0
    max_batch: int = 64
    max_queue: int = 256
    request_timeout: float = 600.0
    max_body_bytes: int = 1_000_000
    api_key_env: str | None = None
    log_prompts: bool = False
    max_resident_models: int | None = None  # default: the yaml's serve section
    memory_gb: float | None = None
    cache: bool | str | Path = True
    idle_timeout: float = 15.0  # seconds a connection may stay open with no request in progress
    max_connections: int = 512  # connections open at once (more: closed at once)


class Service:
    """The app's state: the pool's compositions over one executor, the batcher, metrics."""

    def __init__(self, config: PoolConfig, options: ServeOptions,
                 executor: Executor | None = None):
        self.config = config
        self.options = options
        self.metrics = Metrics()
        self.ready = False
        self.draining = False
        self._key = None
        if options.api_key_env:
            self._key = os.environ.get(options.api_key_env) or None
            if self._key is None:
                raise ConfigError(f"--api-key-env: environment variable {options.api_key_env} "
                                  "is not set")
        self._own_executor = executor is None
        self.cache = None
        if executor is None:
            self.cache = open_cache(config, options.cache)
            executor = build_executor(config, cache=self.cache, serving=True,
                                      max_resident=options.max_resident_models,
                                      memory_gb=options.memory_gb)
        self.executor = executor
        self.compositions = Compositions(config, executor)
        self.batcher = Batcher(executor, config, window=options.batch_window_ms / 1000,
                               max_batch=options.max_batch, max_queue=options.max_queue,
                               on_batch=self._count_batch, parallel=executor.parallel_runs)

    def _count_batch(self, report: BatchReport) -> None:
        m, s = self.metrics, report.stats
        m.batches.inc()
        m.batch_size.observe(report.size)
        m.batch_seconds.observe(report.seconds)
        m.loads.inc(s.loads)
        m.distinct_weights.inc(report.distinct_weights)
        m.generations.inc(s.generations)
        m.cache_hits.inc(s.cache_hits)
        for expert, n in report.failures.items():
            m.failures.labels(expert=expert).inc(n)

    def startup(self) -> None:
        """Get the executor ready (Ray: join or start the cluster), build every composition
        (one that cannot be built is left out of /v1/models), and route one question with the
        default one so its router's models are loaded."""
        self.executor.start()
        for name in self.compositions.names():
            try:
                self.compositions.get(name)
            except UnknownModel as e:
                log.info("%s", e)
        self.compositions.get(DEFAULT).flow.router.route(
            [Question(id="warm-up", question="What is 2 + 2?")])

    def shutdown(self) -> None:
        self.compositions.close()
        if self._own_executor:
            self.executor.close()
            if self.cache is not None:
                self.cache.close()

    def authorize(self, request: Request) -> None:
        if self._key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = hmac.compare_digest(given.strip().encode(), self._key.encode())
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)",
                           "invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.options.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {int(declared)} bytes exceeds the limit of "
                           f"{limit} bytes", "body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds the limit of {limit} bytes",
                               "body_too_large")
            chunks.append(chunk)
        return b"".join(chunks)
