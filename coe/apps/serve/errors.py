"""The service's errors, OpenAI-shaped and one line: ``{"error": {"message", "type", "param",
"code"}}``, ``param`` naming the request field at fault when there is one. The status tells
the ``openai`` client which exception to raise: 400 ``BadRequestError``, 401
``AuthenticationError``, 404 ``NotFoundError``, 429 ``RateLimitError``, 5xx
``InternalServerError``."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "invalid_request_error", 405: "invalid_request_error",
               413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 499: "client_closed", 500: "server_error",
               502: "server_error", 503: "server_error", 504: "timeout"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ClientGone(Exception):
    pass


def validation_param(e: ValidationError) -> str | None:
    """The field of the first error, as the OpenAI API names it (``messages.0.content``)."""
    loc = [str(p) for p in e.errors()[0]["loc"]]
    return ".".join(loc) or None


def one_line_validation(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = len(e.errors()) - 1
    return f"{where}: {first['msg']}" + (f" (+{more} more)" if more else "")


def invalid(e: ValidationError) -> ApiError:
    """A body that does not validate: 400 naming the field."""
    return ApiError(400, one_line_validation(e), "invalid_value", param=validation_param(e))
