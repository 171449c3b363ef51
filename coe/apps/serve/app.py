"""The OpenAI-compatible HTTP app (FastAPI): ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

A response is the OpenAI object plus one field, ``coe``: the route, every expert's answer, the
votes and the aggregator, so a caller can see why. Each choice holds the response behind its
final answer (``coe.apps.serve.shape``): a pass-through's is its expert's answer as the backend
gave it (tool calls, finish reason, logprobs).

Errors are OpenAI-shaped, one line: ``{"error": {"message", "type", "param", "code"}}`` with
400 (not JSON, a bad field, or a field the model asked cannot honour: ``param`` names it),
401 (key), 404 (unknown model, naming the known ones, or unknown path), 405 (method), 413
(body too large), 429 (queue full, with ``Retry-After``), 499 (client went away: logged only),
502 (every expert failed, naming them and their errors), 503 (starting or draining), 504 (no
answer within the request timeout, or every expert timed out).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from coe.apps.serve.completions import complete
from coe.apps.serve.errors import ApiError
from coe.apps.serve.metrics import CONTENT_TYPE_LATEST
from coe.apps.serve.schema import ChatRequest, CompletionRequest
from coe.apps.serve.service import ServeOptions, Service
from coe.core.config import PoolConfig
from coe.execution import Executor

log = logging.getLogger("coe.serve")

__all__ = ["ApiError", "ServeOptions", "Service", "create_app"]


def create_app(config: PoolConfig, options: ServeOptions | None = None,
               executor: Executor | None = None) -> FastAPI:
    options = options or ServeOptions()
    svc = Service(config, options, executor)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(svc.startup)
        svc.batcher.start()
        svc.ready = True
        log.info("coe serve: ready on http://%s:%s (%d experts; models: %s)", options.host,
                 options.port, len(config.experts), ", ".join(svc.compositions.available()))
        try:
            yield
        finally:
            svc.draining = True
            await svc.batcher.stop()
            await asyncio.to_thread(svc.shutdown)
            log.info("coe serve: stopped")

    app = FastAPI(title="coe", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """An unknown path (404) or method (405), in the OpenAI shape."""
        if e.status_code == 404:
            message = f"unknown path {request.url.path!r}"
        elif e.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path!r}"
        else:
            message = str(e.detail)
        return ApiError(e.status_code, message, "not_found" if e.status_code == 404 else None,
                        dict(e.headers or {})).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if not svc.ready or svc.draining:
            state = "draining" if svc.draining else "starting"
            return JSONResponse({"status": state}, status_code=503)
        return JSONResponse({"status": "ok", "experts": len(config.experts),
                             "resident": svc.executor.resident,
                             "residency": [
                                 {"model": r.label, "where": r.where, "node": r.node or "local",
                                  "pid": r.pid, "bytes": r.bytes, "in_use": r.in_use}
                                 for r in svc.executor.residents()],
                             "queued": svc.batcher.depth})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        svc.authorize(request)
        svc.metrics.queued.set(svc.batcher.depth)
        svc.metrics.show_residents(svc.executor.residents())
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        svc.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "coe"}
            for name in svc.compositions.available()]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await complete(svc, request, ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await complete(svc, request, CompletionRequest, chat=False)

    return app
