"""One completion (``POST /v1/chat/completions``, ``POST /v1/completions``): the body read and
checked, its request submitted to the batcher, the answer sent whole or streamed (server-sent
events), and what a result becomes in the OpenAI shape plus the ``coe`` field.

``choices[0]`` holds the text behind the final answer: the llm aggregator's response, else the
response of the highest-weighted expert that gave the final answer (a pass-through: its
expert's), else the first expert that answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from coe.apps.serve.batcher import Cancelled, Job, QueueFull
from coe.apps.serve.compositions import UnknownModel
from coe.apps.serve.errors import ApiError, ClientGone, one_line_validation
from coe.apps.serve.service import Service
from coe.core import secrets
from coe.core.secrets import redact
from coe.core.types import QuestionResult

log = logging.getLogger("coe.serve")

MAX_DEPTH = 64  # nesting of a request body: a tool's JSON schema needs a handful
MAX_SHOWN = 100  # characters of a client's string in a log line or an error message


# -- what a request body may be ---------------------------------------------------------------

def shown(text: str) -> str:
    """A client's string as it may be logged or echoed: control characters (a newline, an
    ANSI escape) and lone surrogates escaped, at most ``MAX_SHOWN`` characters of it."""
    cut = text if len(text) <= MAX_SHOWN else f"{text[:MAX_SHOWN]}... ({len(text):,} characters)"
    return cut if cut.isprintable() else repr(cut)[1:-1]


def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it: not JSON,
    nested deeper than ``MAX_DEPTH``, a number too long to read, a string holding a lone
    surrogate (half of a UTF-16 pair: no text can be encoded with it)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from None
    except RecursionError:
        data = None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise ApiError(400, f"request body is not valid JSON: {str(e).split(';')[0]}",
                       "invalid_json") from None
    if not isinstance(data, dict):
        if data is None:
            raise ApiError(400, f"request body is nested more than {MAX_DEPTH} levels deep",
                           "invalid_json")
        raise ApiError(400, "request body must be a JSON object", "invalid_json")
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ApiError(400, f"request body is nested more than {MAX_DEPTH} levels deep",
                               "invalid_json")
            items = [*value, *value.values()] if isinstance(value, dict) else value
            stack += [(v, depth + 1) for v in items]
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(400, f"request body holds a lone surrogate "
                               f"({value[e.start]!r}): not valid Unicode text",
                               "invalid_json") from None
    return data


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
        line = (f"{self.id} model={shown(self.model)} experts={self.experts} status={status} "
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
            raise ApiError(422, one_line_validation(e), "invalid_field") from None
        try:
            if len(req.model) > MAX_SHOWN:  # no composition or expert has such a name
                raise UnknownModel(f"unknown model '{shown(req.model)}' (known: "
                                   f"{', '.join(svc.compositions.available())})")
            comp = svc.compositions.get(req.model)
        except UnknownModel as e:
            raise ApiError(404, str(e), "model_not_found") from None
        try:
            question = req.to_question(call.id)
        except ValidationError as e:
            raise ApiError(422, one_line_validation(e), "invalid_field") from None
        call.prompt = question.question
        if svc.draining or not svc.ready:
            raise ApiError(503, "the server is shutting down", "unavailable")
        try:
            job = svc.batcher.submit(comp, question, stream=req.stream)
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
        log.warning("%s failed: %s: %s", call.id, type(e).__name__, shown(str(e)))
        status = 500
        return ApiError(500, redact(f"{type(e).__name__}: {e}"), "internal_error").response()
    finally:
        if not streaming:
            call.finish(status)


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


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
    hidden = secrets.stream()  # a secret cut across pieces goes out hidden (any backend's)
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
                piece, get = hidden.feed(get.result()), None
                if piece:
                    sent.append(piece)
                    yield _sse(call.chunk(piece))
        pieces = []
        if get is not None:
            if get.done():
                pieces.append(get.result())
            else:
                get.cancel()
        while not job.tokens.empty():
            pieces.append(job.tokens.get_nowait())
        for piece in [*map(hidden.feed, pieces), hidden.flush()]:
            if piece:
                sent.append(piece)
                yield _sse(call.chunk(piece))
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
        log.warning("%s failed: %s: %s", call.id, type(e).__name__, shown(str(e)))
        yield _sse(ApiError(500, redact(f"{type(e).__name__}: {e}"), "internal_error").body())
    finally:
        if get is not None and not get.done():
            get.cancel()
        call.finish(status)
