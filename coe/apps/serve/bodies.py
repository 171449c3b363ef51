"""What a request body may be before it is read as a request: JSON, not nested too deep, no
number too long to read, no lone surrogate; and how a client's string may be logged or echoed."""

from __future__ import annotations

import json

from coe.apps.serve.errors import ApiError

MAX_DEPTH = 64  # nesting of a request body: a tool's JSON schema needs a handful
MAX_SHOWN = 100  # characters of a client's string in a log line or an error message


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
