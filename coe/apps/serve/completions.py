"""One completion (``POST /v1/chat/completions``, ``POST /v1/completions``): the body read and
checked (what its composition cannot honour refused with 400: ``honour``), its requests
submitted to the batcher (a completion's prompts, each ``n`` times), the answer sent whole or
streamed (server-sent events) in the OpenAI shape plus the ``coe`` field (``shape``).

A result that is an error is one: every expert failed is 502 (504 when every failure was a
timeout) naming the experts and their one-line errors, never a 200 with empty content. A
streamed answer waits for its first piece before the headers go out, so such an error still
gets its status; one found after the first piece is an ``error`` event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from coe.apps.serve.batcher import Cancelled, Job, QueueFull
from coe.apps.serve.bodies import MAX_SHOWN, parse_body, shown
from coe.apps.serve.compositions import UnknownModel
from coe.apps.serve.errors import ApiError, ClientGone, invalid
from coe.apps.serve.honour import Refused, check_composition, check_pass_through
from coe.apps.serve.service import Service
from coe.apps.serve.shape import (
    answer_text,
    choice,
    content,
    dumps,
    extensions,
    failure,
    tool_calls,
    usage,
)
from coe.core import secrets
from coe.core.secrets import redact
from coe.core.types import Question, QuestionResult

log = logging.getLogger("coe.serve")

__all__ = ["answer_text", "complete"]



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
        self.questions: list[Question] = []  # one per row of the job

    def finish(self, status: int) -> None:
        m = self.svc.metrics
        latency = time.perf_counter() - self.t0
        known = self.model if self.model in self.svc.compositions.available() else "-"
        m.requests.labels(model=known, status=str(status)).inc()
        if self.accepted:
            m.in_flight.dec()
            if status == 200:
                m.latency.labels(model=known).observe(latency)
        line = (f"{self.id} model={shown(self.model)} experts={self.experts} status={status} "
                f"latency={latency:.3f}s")
        if self.svc.options.log_prompts and self.prompt is not None:
            line += f" prompt={self.prompt[:500]!r}"
        log.info("%s", line)

    def chunk(self, row: int = 0, piece: str | None = None, finish: str | None = None,
              **delta) -> dict:
        if self.chat:
            d = {"content": piece} if piece is not None else {}
            c = {"index": row, "delta": {**d, **delta}, "finish_reason": finish,
                 "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            c = {"index": row, "text": piece or "", "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": [c]}

    def check(self, results: list[QuestionResult]) -> None:
        """Raise the error a result is (``shape.failure``); note the experts for the log."""
        self.experts = ",".join(dict.fromkeys(n for r in results for n in r.route.names)) or "-"
        for result, q in zip(results, self.questions):
            error = failure(result, q)
            if error is not None:
                raise error

    def body(self, results: list[QuestionResult]) -> dict:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [choice(i, r, q, self.chat)
                            for i, (r, q) in enumerate(zip(results, self.questions))],
                "usage": usage(results), "coe": extensions(results, self.model)}


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else dumps(obj)}\n\n".encode()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _questions(svc: Service, req, comp, call: _Call) -> list[Question]:
    """The body's requests, checked against what its composition can honour."""
    try:
        qs = req.to_questions(call.id) if not call.chat else [req.to_question(call.id)]
    except ValidationError as e:
        raise invalid(e) from None
    try:
        for q in qs:
            if comp.expert is not None:
                check_pass_through(q, comp.expert, svc.config, svc.executor.capabilities)
            else:
                check_composition(q, comp.name)
    except Refused as e:
        raise ApiError(400, e.message, "unsupported_parameter", param=e.param) from None
    return qs


async def complete(svc: Service, request: Request, model_cls, chat: bool) -> Response:
    call = _Call(svc, chat)
    status = 500
    streaming = False
    try:
        svc.authorize(request)
        data = parse_body(await svc.read_body(request))
        if isinstance(data.get("model"), str):
            call.model = data["model"]
        try:
            req = model_cls.model_validate(data)
        except ValidationError as e:
            raise invalid(e) from None
        try:
            if len(req.model) > MAX_SHOWN:  # no composition or expert has such a name
                raise UnknownModel(f"unknown model '{shown(req.model)}' (known: "
                                   f"{', '.join(svc.compositions.available())})")
            comp = svc.compositions.get(req.model)
        except UnknownModel as e:
            raise ApiError(404, str(e), "model_not_found", param="model") from None
        qs = _questions(svc, req, comp, call)
        call.prompt = qs[0].question
        call.questions = [q for q in qs for _ in range(req.n)]
        if svc.draining or not svc.ready:
            raise ApiError(503, "the server is shutting down", "unavailable")
        try:
            job = svc.batcher.submit(comp, qs if not chat else qs[0], stream=req.stream,
                                     n=req.n)
        except QueueFull as e:
            raise ApiError(429, f"too many requests waiting ({svc.options.max_queue}); "
                           f"retry after {e.retry_after}s", "queue_full",
                           {"Retry-After": str(e.retry_after)}) from None
        # whoever stops waiting for it (a client gone, a timeout), its outcome is retrieved:
        # a job dropped before its batch, or a failed batch, would otherwise leave asyncio an
        # exception nobody retrieved, logged with a traceback
        job.future.add_done_callback(_retrieve)
        call.accepted = True
        svc.metrics.in_flight.inc()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            first = await _first(svc, request, job)  # an error still gets its status
            if first is None:
                call.check(_listed(job, job.future.result()))
            streaming = True
            return StreamingResponse(_events(svc, call, job, include_usage, first),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        results = _listed(job, await _wait(svc, request, job))
        call.check(results)
        status = 200
        return JSONResponse(call.body(results))
    except ApiError as e:
        status = e.status
        return e.response()
    except ClientGone:
        status = 499
        return Response(status_code=499)
    except Refused as e:  # decided once the route was known (batcher)
        status = 400
        return ApiError(400, e.message, "unsupported_parameter", param=e.param).response()
    except Exception as e:  # a bug or a broken router: one line to the client, logged here
        log.warning("%s failed: %s: %s", call.id, type(e).__name__, shown(str(e)))
        status = 500
        return ApiError(500, redact(f"{type(e).__name__}: {e}"), "internal_error").response()
    finally:
        if not streaming:
            call.finish(status)


def _listed(job: Job, got) -> list[QuestionResult]:
    return [got] if job.single else got


def _timeout(svc: Service) -> ApiError:
    return ApiError(504, f"no answer within the request timeout "
                    f"({svc.options.request_timeout:g}s)", "timeout")


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


async def _wait(svc: Service, request: Request, job: Job):
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
    raise _timeout(svc)


async def _first(svc: Service, request: Request, job: Job) -> tuple | None:
    """A streamed job's first piece (row, text), or None when it finished without one (then
    its result is checked here, before any header goes out)."""
    get = asyncio.ensure_future(job.tokens.get())
    gone = asyncio.create_task(_disconnected(request))
    try:
        done, _ = await asyncio.wait({get, job.future, gone},
                                     timeout=svc.options.request_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if get in done:
        return get.result()
    get.cancel()
    if job.future.done():
        try:
            job.future.result()
        except Cancelled:
            raise ClientGone() from None
        return None
    job.cancel()
    if gone in done:
        raise ClientGone()
    raise _timeout(svc)


async def _events(svc: Service, call: _Call, job: Job, include_usage: bool,
                  first: tuple | None) -> AsyncIterator[bytes]:
    """Server-sent events: the role, each row's pieces as they are decoded, whatever of each
    answer was not streamed (its tool calls included), a finish chunk per row (the last one
    with ``coe``), the usage (when asked for), then ``[DONE]``. A failure after the first
    piece went out is an ``error`` event."""
    status = 500
    loop = asyncio.get_running_loop()
    deadline = loop.time() + svc.options.request_timeout
    rows = len(job.questions)
    sent: dict[int, list[str]] = {}
    hidden: dict = {}  # per row: a secret cut across pieces goes out hidden
    get: asyncio.Future | None = None

    def piece(item: tuple) -> bytes:
        row, text = item
        text = hidden.setdefault(row, secrets.stream()).feed(text)
        if not text:
            return b""
        sent.setdefault(row, []).append(text)
        return _sse(call.chunk(row, text))

    try:
        for row in range(rows):
            head = call.chunk(row, "")
            if call.chat:
                head["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield _sse(head)
        if first is not None:
            yield piece(first)
        while not job.future.done():
            get = get or asyncio.ensure_future(job.tokens.get())
            left = deadline - loop.time()
            if left <= 0:
                job.cancel()
                raise _timeout(svc)
            done, _ = await asyncio.wait({get, job.future}, timeout=left,
                                         return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                item, get = get.result(), None
                yield piece(item)
        if get is not None:
            if get.done():
                yield piece(get.result())
            else:
                get.cancel()
        while not job.tokens.empty():
            yield piece(job.tokens.get_nowait())
        for row, redactor in hidden.items():
            rest = redactor.flush()
            if rest:
                sent.setdefault(row, []).append(rest)
                yield _sse(call.chunk(row, rest))
        try:
            results = _listed(job, job.future.result())
        except Cancelled:
            status = 499
            return
        call.check(results)
        for row, (result, q) in enumerate(zip(results, call.questions)):
            r, text, finish = content(result, q)
            streamed = "".join(sent.get(row, []))
            if text.startswith(streamed) and len(text) > len(streamed):
                yield _sse(call.chunk(row, text[len(streamed):]))
            calls = tool_calls(r)
            if calls and call.chat:
                yield _sse(call.chunk(row, tool_calls=[dict(c, index=i)
                                                       for i, c in enumerate(calls)]))
            last = call.chunk(row, None, finish)
            if r is not None and r.logprobs is not None:
                last["choices"][0]["logprobs"] = r.logprobs
            if row == rows - 1:
                last["coe"] = extensions(results, call.model)
            yield _sse(last)
        if include_usage:
            tail = call.chunk()
            tail["choices"] = []
            tail["usage"] = usage(results)
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
        log.warning("%s failed: %s: %s", call.id, type(e).__name__, shown(str(e)))
        yield _sse(ApiError(500, redact(f"{type(e).__name__}: {e}"), "internal_error").body())
    finally:
        if get is not None and not get.done():
            get.cancel()
        call.finish(status)
