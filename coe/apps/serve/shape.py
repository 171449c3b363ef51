"""What results become in the OpenAI shape: the choices (one per request and sample), the
usage, the ``coe`` field, and the errors a result is (every expert failed: 502, or 504 when
every failure was a timeout; JSON asked for and none given: 502).

Each choice holds the response behind its final answer: the llm aggregator's response, else
the response of the highest-weighted expert that gave the final answer, or whose whole text it
is (free text) (a pass-through: its expert's, as the backend returned it: text, tool calls,
finish reason, logprobs), else the first expert that answered. A request that asked for JSON gets that response's text when it
is JSON as it stands, else the canonical JSON of the final answer.
"""

from __future__ import annotations

import json
from typing import Any

from coe.apps.serve.errors import ApiError
from coe.core.types import ExpertResponse, Question, QuestionResult
from coe.text.answers import parse_json

#: how a backend's error for an attempt that ran out of time begins (the OpenAI backend's)
TIMED_OUT = "timed out"


def pick(result: QuestionResult) -> ExpertResponse | None:
    """The response behind the final answer (see the module doc)."""
    agg = result.aggregator_response
    if agg is not None and agg.error is None and agg.answer == result.final_answer and agg.text:
        return agg
    weight = {r.name: r.weight for r in result.route.experts}
    ok = [r for r in result.responses if r.error is None]
    ok.sort(key=lambda r: -weight.get(r.expert, 0.0))  # stable: route order among equals
    final = result.final_answer
    # free text: the final answer is the whole text of the response it came from
    return next((r for r in ok if final is not None
                 and (r.answer == final or r.text.strip() == final)), None) \
        or (ok[0] if ok else None)


def _wants_json(q: Question) -> bool:
    return q.response_format is not None and q.response_format.wants_json


def content(result: QuestionResult, q: Question) -> tuple[ExpertResponse | None, str, str]:
    """(the response picked, the content, the finish reason)."""
    r = pick(result)
    if r is None:
        return None, result.final_answer or "", "stop"
    text = r.text
    if _wants_json(q) and result.final_answer is not None:
        try:
            parse_json(text)
            if text.strip().startswith("```"):
                raise ValueError("fenced")
        except ValueError:
            text = result.final_answer
    finish = r.finish_reason or "stop"
    if r.tool_calls and finish == "stop":
        finish = "tool_calls"
    return r, text, finish


def answer_text(result: QuestionResult) -> tuple[str, str]:
    """(content, finish_reason) of a result (a request that asked nothing but text)."""
    r = pick(result)
    if r is None:
        return result.final_answer or "", "stop"
    return r.text, r.finish_reason or "stop"


def failure(result: QuestionResult, q: Question) -> ApiError | None:
    """The error a result is, if it is one: every expert (and the aggregator) failed, or a
    request for JSON that no expert answered with valid JSON."""
    agg = result.aggregator_response
    ok = [r for r in result.responses if r.error is None]
    if not ok and (agg is None or agg.error is not None):
        errors = {r.expert: r.error for r in result.responses if r.error}
        if agg is not None and agg.error:
            errors[f"aggregator {agg.expert}"] = agg.error
        if not errors:
            return ApiError(502, "no expert was asked: the route recruited none",
                            "no_experts")
        status = 504 if all(TIMED_OUT in e for e in errors.values()) else 502
        return ApiError(status, "every expert failed: " + "; ".join(
            f"{name}: {e}" for name, e in errors.items()), "experts_failed")
    if _wants_json(q) and result.final_answer is None and not any(r.tool_calls for r in ok):
        what = ("JSON that validates against the schema" if q.response_format.type ==
                "json_schema" else "a JSON object")
        bad = [f"{r.expert}: {r.error}" if r.error else f"{r.expert}: not {what}"
               for r in result.responses]
        return ApiError(502, f"no expert answered with {what}: " + "; ".join(bad),
                        "invalid_json_answer", param="response_format")
    return None


def usage(results: list[QuestionResult]) -> dict[str, int]:
    p = c = 0
    for result in results:
        for r in [*result.responses, *([result.aggregator_response]
                                       if result.aggregator_response else [])]:
            p += r.prompt_tokens
            c += r.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def extension(result: QuestionResult, composition: str) -> dict[str, Any]:
    """The ``coe`` field of one result: why this answer."""
    ext = result.model_dump(mode="json", exclude={"question", "gold", "correct"})
    ext["composition"] = composition
    ext["failed"] = dict(result.route.failed)
    return ext


def extensions(results: list[QuestionResult], composition: str) -> dict[str, Any]:
    """The ``coe`` field of a response: its first choice's, with every choice's in
    ``each_choice`` when there are several."""
    ext = extension(results[0], composition)
    if len(results) > 1:
        ext["each_choice"] = [extension(r, composition) for r in results]
    return ext


def tool_calls(r: ExpertResponse | None) -> list[dict] | None:
    return [c.model_dump() for c in r.tool_calls] if r is not None and r.tool_calls else None


def choice(index: int, result: QuestionResult, q: Question, chat: bool) -> dict[str, Any]:
    """One choice of a non-streamed response."""
    r, text, finish = content(result, q)
    logprobs = r.logprobs if r is not None else None
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        calls = tool_calls(r)
        if calls:
            message["tool_calls"] = calls
            message["content"] = text or None
        return {"index": index, "message": message, "finish_reason": finish,
                "logprobs": logprobs}
    return {"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
