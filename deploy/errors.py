"""Every failure leaves as an OpenAI-shaped JSON body with the right status, never FastAPI's own shapes.

Consort's errors carry their HTTP status (runtime/errors.py); this module adds
the OpenAI `code`, the Retry-After header of 429/503, and maps FastAPI's
validation errors (422 by default) and malformed JSON to 400.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from consort.deploy.openai_api import ErrorDetail, ErrorResponse
from consort.runtime.errors import ConsortError, MemberLost, ModelNotFound, Overloaded, PromptTooLong

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1  # the queue drains at token speed: a second is a sensible first back-off


class Unauthorized(ConsortError):
    """A /v1 request without a valid API key."""

    http_status = 401
    error_type = "invalid_request_error"


class Unavailable(ConsortError):
    """The ensemble does not answer (members restarting or gone)."""

    http_status = 503
    error_type = "service_unavailable"


class Unsupported(ConsortError):
    """A request field Consort recognises but cannot honour."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


_CODES: list[tuple[type[ConsortError], str]] = [
    (Unauthorized, "invalid_api_key"),
    (PromptTooLong, "context_length_exceeded"),
    (ModelNotFound, "model_not_found"),
    (Overloaded, "rate_limit_exceeded"),
    (MemberLost, "member_lost"),
    (Unsupported, "unsupported_parameter"),
]


def error_body(error: ConsortError) -> ErrorResponse:
    code = next((c for kind, c in _CODES if isinstance(error, kind)), None)
    return ErrorResponse(
        error=ErrorDetail(
            message=str(error), type=error.error_type, param=getattr(error, "param", None), code=code
        )
    )


def error_headers(error: ConsortError) -> dict[str, str]:
    if isinstance(error, Overloaded | MemberLost):
        return {"Retry-After": str(RETRY_AFTER_S)}
    return {}


def error_response(error: ConsortError) -> JSONResponse:
    return JSONResponse(
        error_body(error).model_dump(), status_code=error.http_status, headers=error_headers(error)
    )


def sse_error(error: ConsortError) -> str:
    """An error event inside a stream that has already answered 200 (the official client raises on it)."""
    return f"data: {json.dumps(error_body(error).model_dump())}\n\n"


def _plain(
    status: int, message: str, kind: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _describe_validation(error: RequestValidationError) -> tuple[str, str | None]:
    problems: list[str] = []
    param: str | None = None
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if p != "body"]
        if item.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {item.get('msg', '')}", None
        field = ".".join(loc)
        param = param or (field or None)
        problems.append(f"{field or 'body'}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(problems), param


def install(app: FastAPI) -> None:
    """Register the handlers on an app."""

    async def consort_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ConsortError)
        if error.http_status >= 500:
            log.warning("request failed: %s", error)
        return error_response(error)

    async def validation_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        message, param = _describe_validation(error)
        return _plain(400, message, "invalid_request_error", param=param)

    async def http_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return _plain(error.status_code, str(error.detail), kind)

    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request", exc_info=error)
        return _plain(500, f"internal error: {type(error).__name__}", "internal_error")

    handlers: dict[Any, Any] = {
        ConsortError: consort_error,
        RequestValidationError: validation_error,
        StarletteHTTPException: http_error,
        Exception: internal_error,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
