"""The OpenAI-compatible HTTP app (FastAPI): ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

A response is the OpenAI object plus one field, ``coe``: the route, every expert's answer, the
votes and the aggregator, so a caller can see why. ``choices[0]`` holds the text behind the
final answer: the llm aggregator's response, else the response of the highest-weighted expert
that gave the final answer (a pass-through: its expert's), else the first expert that answered.

Errors are OpenAI-shaped, one line: ``{"error": {"message", "type", "param", "code"}}`` with
400 (not JSON), 401 (key), 404 (unknown model, naming the known ones), 413 (body too large),
422 (a field), 429 (queue full, with ``Retry-After``), 499 (client went away: logged only),
503 (starting or draining), 504 (no answer within the request timeout).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from coe.apps.api import open_cache
from coe.apps.serve.batcher import Batcher, BatchReport, Cancelled, Job, QueueFull
from coe.apps.serve.compositions import DEFAULT, Compositions, UnknownModel
from coe.apps.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from coe.apps.serve.schema import ChatRequest, CompletionRequest
from coe.core.config import PoolConfig
from coe.core.errors import ConfigError
from coe.core.registry import EXECUTORS
from coe.core.secrets import redact
from coe.core.types import Question, QuestionResult
from coe.execution import Executor

log = logging.getLogger("coe.apps.serve")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed",
               500: "server_error", 503: "server_error", 504: "timeout"}


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


def default_memory_gb() -> float:
    """Half of this machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / 2**30
    except (ValueError, OSError, AttributeError):
        return 8.0


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": None, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    pass


def _one_line_validation(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = len(e.errors()) - 1
    return f"{where}: {first['msg']}" + (f" (+{more} more)" if more else "")


# -- what a result becomes --------------------------------------------------------------------

def answer_text(result: QuestionResult) -> tuple[str, str]:
    """(content, finish_reason): the text behind the final answer (see the module doc)."""
    agg = result.aggregator_response
    if agg is not None and agg.error is None and agg.answer == result.final_answer and agg.text:
        return agg.text, agg.finish_reason or "stop"
    weight = {r.name: r.weight for r in result.route.experts}
    ok = [r for r in result.responses if r.error is None]
    ok.sort(key=lambda r: -weight.get(r.expert, 0.0))  # stable: route order among equals
    pick = next((r for r in ok if result.final_answer is not None
                 and r.answer == result.final_answer), None) or (ok[0] if ok else None)
    if pick is None:
        return result.final_answer or "", "stop"
    return pick.text, pick.finish_reason or "stop"


def usage(result: QuestionResult) -> dict[str, int]:
    resp = [*result.responses, *([result.aggregator_response] if result.aggregator_response
                                 else [])]
    p = sum(r.prompt_tokens for r in resp)
    c = sum(r.completion_tokens for r in resp)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def extension(result: QuestionResult, composition: str) -> dict[str, Any]:
    """The ``coe`` field: why this answer."""
    ext = result.model_dump(mode="json", exclude={"question", "gold", "correct"})
    ext["composition"] = composition
    ext["failed"] = dict(result.route.failed)
    return ext


# -- the app ----------------------------------------------------------------------------------

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
            max_resident = options.max_resident_models or config.serve.max_resident_models
            memory_gb = options.memory_gb or config.serve.memory_gb
            if memory_gb is None and max_resident is None:
                memory_gb = default_memory_gb()
            executor = EXECUTORS.get(config.executor.kind).from_config(
                config, cache=self.cache, keep_resident=True, max_resident=max_resident,
                memory_gb=memory_gb)
        self.executor = executor
        self.compositions = Compositions(config, executor)
        self.batcher = Batcher(executor, window=options.batch_window_ms / 1000,
                               max_batch=options.max_batch, max_queue=options.max_queue,
                               on_batch=self._count_batch)

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
        """Build every composition (one that cannot be built is left out of /v1/models), and
        route one question with the default one so its router's models are loaded."""
        for name in self.compositions.names():
            try:
                self.compositions.get(name)
            except UnknownModel as e:
                log.info("%s", e)
        self.compositions.get(DEFAULT).orchestrator.route(
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

    @app.get("/health")
    async def health() -> JSONResponse:
        if not svc.ready or svc.draining:
            state = "draining" if svc.draining else "starting"
            return JSONResponse({"status": state}, status_code=503)
        return JSONResponse({"status": "ok", "experts": len(config.experts),
                             "resident": svc.executor.resident
                             if hasattr(svc.executor, "resident") else [],
                             "queued": svc.batcher.depth})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        svc.authorize(request)
        svc.metrics.queued.set(svc.batcher.depth)
        svc.metrics.resident.set(len(getattr(svc.executor, "resident", [])))
        return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        svc.authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "coe"}
            for name in svc.compositions.available()]})

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _complete(svc, request, ChatRequest, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _complete(svc, request, CompletionRequest, chat=False)

    return app


# -- one completion ---------------------------------------------------------------------------

class _Call:
    """One request's bookkeeping: its id, what it asked, and its log line."""

    def __init__(self, svc: Service, chat: bool):
        self.svc = svc
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.t0 = time.perf_counter()
        self.model = "-"
        self.experts = "-"
        self.prompt: str | None = None
        self.accepted = False

    def finish(self, status: int) -> None:
        m = self.svc.metrics
        latency = time.perf_counter() - self.t0
        known = self.model if self.model in self.svc.compositions.available() else "-"
        m.requests.labels(model=known, status=str(status)).inc()
        if self.accepted:
            m.in_flight.dec()
            if status == 200:
                m.latency.labels(model=known).observe(latency)
        line = (f"{self.id} model={self.model} experts={self.experts} status={status} "
                f"latency={latency:.3f}s")
        if self.svc.options.log_prompts and self.prompt is not None:
            line += f" prompt={self.prompt[:500]!r}"
        log.info("%s", line)

    def chunk(self, piece: str | None = None, finish: str | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": ({"content": piece} if piece is not None else {}),
                      "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice]}

    def body(self, result: QuestionResult) -> dict:
        content, finish = answer_text(result)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": content},
                      "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish, "logprobs": None}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": usage(result), "coe": extension(result, self.model)}


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _complete(svc: Service, request: Request, model_cls, chat: bool) -> Response:
    call = _Call(svc, chat)
    status = 500
    streaming = False
    try:
        svc.authorize(request)
        raw = await svc.read_body(request)
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
        if not isinstance(data, dict):
            raise ApiError(400, "request body must be a JSON object", "invalid_json")
        if isinstance(data.get("model"), str):
            call.model = data["model"]
        try:
            req = model_cls.model_validate(data)
        except ValidationError as e:
            raise ApiError(422, _one_line_validation(e), "invalid_field") from None
        try:
            comp = svc.compositions.get(req.model)
        except UnknownModel as e:
            raise ApiError(404, str(e), "model_not_found") from None
        question = req.to_question(call.id)
        call.prompt = question.question
        if svc.draining or not svc.ready:
            raise ApiError(503, "the server is shutting down", "unavailable")
        try:
            job = svc.batcher.submit(comp, question, stream=req.stream)
        except QueueFull as e:
            raise ApiError(429, f"too many requests waiting ({svc.options.max_queue}); "
                           f"retry after {e.retry_after}s", "queue_full",
                           {"Retry-After": str(e.retry_after)}) from None
        call.accepted = True
        svc.metrics.in_flight.inc()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            streaming = True
            return StreamingResponse(_events(svc, call, job, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        result = await _wait(svc, request, job)
        call.experts = ",".join(result.route.names) or "-"
        status = 200
        return JSONResponse(call.body(result))
    except ApiError as e:
        status = e.status
        return e.response()
    except ClientGone:
        status = 499
        return Response(status_code=499)
    except Exception as e:  # a bug or a broken router: one line to the client, logged here
        log.warning("%s failed: %s: %s", call.id, type(e).__name__, e)
        status = 500
        return ApiError(500, redact(f"{type(e).__name__}: {e}"), "internal_error").response()
    finally:
        if not streaming:
            call.finish(status)


async def _wait(svc: Service, request: Request, job: Job) -> QuestionResult:
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({job.future, gone}, timeout=svc.options.request_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if job.future.done():
        try:
            return job.future.result()
        except Cancelled:
            raise ClientGone() from None
    job.cancel()
    if gone in done:
        raise ClientGone()
    raise ApiError(504, f"no answer within the request timeout "
                   f"({svc.options.request_timeout:g}s)", "timeout")


async def _events(svc: Service, call: _Call, job: Job, include_usage: bool
                  ) -> AsyncIterator[bytes]:
    """Server-sent events: the role, the aggregator's pieces as they are decoded, whatever of
    the answer was not streamed, a last chunk with ``finish_reason`` and ``coe``, the usage
    (when asked for), then ``[DONE]``. A failure after the headers went out is an ``error``
    event."""
    status = 500
    loop = asyncio.get_running_loop()
    deadline = loop.time() + svc.options.request_timeout
    sent = []
    get: asyncio.Future | None = None
    try:
        first = call.chunk("")
        if call.chat:
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        yield _sse(first)
        while not job.future.done():
            get = get or asyncio.ensure_future(job.tokens.get())
            left = deadline - loop.time()
            if left <= 0:
                job.cancel()
                raise ApiError(504, f"no answer within the request timeout "
                               f"({svc.options.request_timeout:g}s)", "timeout")
            done, _ = await asyncio.wait({get, job.future}, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                piece, get = get.result(), None
                sent.append(piece)
                yield _sse(call.chunk(piece))
        if get is not None:
            if get.done():
                sent.append(get.result())
                yield _sse(call.chunk(sent[-1]))
            else:
                get.cancel()
        while not job.tokens.empty():
            sent.append(job.tokens.get_nowait())
            yield _sse(call.chunk(sent[-1]))
        try:
            result = job.future.result()
        except Cancelled:
            status = 499
            return
        call.experts = ",".join(result.route.names) or "-"
        content, finish = answer_text(result)
        streamed = "".join(sent)
        if content.startswith(streamed) and len(content) > len(streamed):
            yield _sse(call.chunk(content[len(streamed):]))
        last = call.chunk(None, finish)
        last["coe"] = extension(result, call.model)
        yield _sse(last)
        if include_usage:
            tail = call.chunk(None)
            tail["choices"] = []
            tail["usage"] = usage(result)
            yield _sse(tail)
        yield _sse("[DONE]")
        status = 200
    except ApiError as e:
        status = e.status
        yield _sse(e.body())
    except asyncio.CancelledError:  # the client went away mid-stream
        job.cancel()
        status = 499
        raise
    except Exception as e:
        log.warning("%s failed: %s: %s", call.id, type(e).__name__, e)
        yield _sse(ApiError(500, redact(f"{type(e).__name__}: {e}"), "internal_error").body())
    finally:
        if get is not None and not get.done():
            get.cancel()
        call.finish(status)
