"""Errors on the HTTP API: lmxd's error tree as OpenAI-shaped bodies and status codes.

Every error is ``{"error": {"message", "type", "code", "param"}}`` with the status the
`openai` SDK turns into its own exception types (400 BadRequestError, 401
AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError, 413, 429 RateLimitError,
500/503 InternalServerError). A 429 or 503 carries ``Retry-After``.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

from lmxd.errors import (
    Busy,
    Cancelled,
    EngineError,
    Forbidden,
    InvalidInput,
    LedgerDenied,
    LmxdError,
    ModelFileError,
    ParkBudgetExceeded,
    PromptTooLong,
    ShuttingDown,
    UnknownAgent,
    UnknownModel,
)

RETRY_AFTER_S = 1  # a full queue or a full card frees up within a reply or two


class HttpError(Exception):
    """An error of the HTTP layer itself (authentication, body size, routes): not one of
    lmxd's error codes, which the other fronts share."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


def _shape(exc: LmxdError | HttpError) -> tuple[int, str, str]:
    """(status, OpenAI error type, code) of an error."""
    if isinstance(exc, HttpError):
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        return exc.status, kind, exc.code
    if isinstance(exc, UnknownModel | UnknownAgent):
        return 404, "invalid_request_error", "model_not_found"
    if isinstance(exc, PromptTooLong):
        return 400, "invalid_request_error", "context_length_exceeded"
    if isinstance(exc, InvalidInput):
        return 400, "invalid_request_error", exc.code
    if isinstance(exc, ModelFileError):
        return 400, "invalid_request_error", exc.code
    if isinstance(exc, Busy):
        return 429, "rate_limit_error", "rate_limit_exceeded"
    if isinstance(exc, Forbidden):
        return 403, "permission_error", exc.code
    if isinstance(exc, LedgerDenied | ParkBudgetExceeded | ShuttingDown | Cancelled):
        return 503, "server_error", exc.code
    if isinstance(exc, EngineError):
        return 500, "server_error", exc.code
    return 500, "server_error", exc.code


def error_body(exc: LmxdError | HttpError) -> dict[str, object]:
    _, kind, code = _shape(exc)
    if isinstance(exc, HttpError):
        param = exc.param
    elif isinstance(exc, UnknownModel | UnknownAgent):
        param = "model"
    else:
        param = exc.details.get("param")
    return {"error": {"message": exc.message, "type": kind, "code": code, "param": param}}


def error_response(exc: LmxdError | HttpError) -> JSONResponse:
    status = _shape(exc)[0]
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    return JSONResponse(error_body(exc), status_code=status, headers=headers)
