"""Every failure leaves as an OpenAI-shaped JSON body with the right status, never FastAPI's own shapes.

Consort's errors carry their HTTP status (runtime/errors.py); this module adds
the OpenAI `code`, the Retry-After header of 429/503, keeps Starlette's headers
(a 405's Allow), and maps FastAPI's validation errors (422 by default) and
malformed JSON to 400.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from consort.deploy.openai_api import UNSUPPORTED, ErrorDetail, ErrorResponse
from consort.runtime.errors import (
    ConflictingOptions,
    ConsortError,
    InvalidRequest,
    MemberLost,
    ModelNotFound,
    Overloaded,
    PromptTooLong,
    UnparsableContent,
)

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


class QueueCapacityExceeded(InvalidRequest):
    """One request needs more sequences than the admission queue holds (400: split it, retrying cannot help)."""


_CODES: list[tuple[type[ConsortError], str]] = [
    (Unauthorized, "invalid_api_key"),
    (PromptTooLong, "context_length_exceeded"),
    (ModelNotFound, "model_not_found"),
    (Overloaded, "rate_limit_exceeded"),
    (MemberLost, "member_lost"),
    (QueueCapacityExceeded, "queue_capacity_exceeded"),
    (UnparsableContent, "unparsable_content"),
    (ConflictingOptions, "conflicting_options"),
]


def error_body(error: ConsortError) -> ErrorResponse:
    code = next((c for kind, c in _CODES if isinstance(error, kind)), None)
    return ErrorResponse(
        error=ErrorDetail(
            message=str(error), type=error.error_type, param=getattr(error, "param", None), code=code
        )
    )


def error_headers(error: ConsortError) -> dict[str, str]:
    """Retry-After on every 429 and 503: both say "not now", and clients back off by it."""
    if error.http_status in (429, 503):
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
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# The steps pydantic adds to an error's location inside a union (`str`, `list[str]`, `constrained-str`,
# `function-after[...]`, a model's class name): they name a type tried, not a field of the request.
_UNION_STEP = re.compile(r"^(str|int|float|bool|none|[a-z]+\[.*\]|constrained-\w+|function-\w+\[.*\]|[A-Z]\w*)$")


def describe_validation(error: RequestValidationError) -> tuple[str, str | None, str | None]:
    """(message, param, code) of a request that failed validation; the first field at fault is the param."""
    problems: dict[str, str] = {}  # one problem a field: a union's other branches only repeat it
    for item in error.errors():
        loc = [str(p) for p in item.get("loc", ()) if p != "body" and not _UNION_STEP.match(str(p))]
        if item.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {item.get('msg', '')}", None, None
        field = ".".join(loc)
        if loc and loc[0] in UNSUPPORTED:
            # A field Consort knows but cannot honour: say so, rather than which values the schema allows.
            return f"{loc[0]} is not supported ({UNSUPPORTED[loc[0]]})", loc[0], "unsupported_parameter"
        problems.setdefault(field or "body", str(item.get("msg", "invalid")).removeprefix("Value error, "))
    # A problem inside a field explains one about the field as a whole (a list of parts is not a string).
    deepest = {f: m for f, m in problems.items() if not any(g.startswith(f"{f}.") for g in problems)}
    param = next((f for f in deepest if f != "body"), None)
    return "invalid request: " + "; ".join(f"{f}: {m}" for f, m in deepest.items()), param, None


def install(app: FastAPI) -> None:
    """Register the handlers on an app."""

    async def consort_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ConsortError)
        if error.http_status >= 500:
            log.warning("request failed: %s", error)
        return error_response(error)

    async def validation_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        message, param, code = describe_validation(error)
        return _plain(400, message, "invalid_request_error", param=param, code=code)

    async def http_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        # Starlette's own headers stay: a 405 carries Allow (RFC 9110), a 401 WWW-Authenticate.
        return _plain(error.status_code, str(error.detail), kind, headers=error.headers)

    async def internal_error(_: Request, error: Exception) -> JSONResponse:
        # The exception and its text go to the log only; the client learns that it was not its fault.
        log.exception("unexpected error while serving a request", exc_info=error)
        return _plain(500, "internal error; the request was not completed", "internal_error")

    handlers: dict[Any, Any] = {
        ConsortError: consort_error,
        RequestValidationError: validation_error,
        StarletteHTTPException: http_error,
        Exception: internal_error,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)
