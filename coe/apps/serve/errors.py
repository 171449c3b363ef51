"""The service's errors, OpenAI-shaped and one line: ``{"error": {"message", "type", "param",
"code"}}``."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               404: "invalid_request_error", 413: "invalid_request_error",
               422: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed",
               500: "server_error", 503: "server_error", 504: "timeout"}


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


def one_line_validation(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    more = len(e.errors()) - 1
    return f"{where}: {first['msg']}" + (f" (+{more} more)" if more else "")
