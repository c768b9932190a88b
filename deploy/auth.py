"""API keys: when CONSORT_API_KEYS is set, every /v1/* (and /models/{model}/v1/*) request needs `Authorization: Bearer <key>`.

A plain ASGI middleware, so it runs before body parsing (an unauthenticated
request gets 401, not a 400 about its body) and adds nothing to a stream's
chunks. The keys are read from the environment of the process that serves the
request (the Serve replica: a Kubernetes Secret mapped to an env var on the pod,
or a Serve runtime_env), on its first request. Keys never enter a log line,
an error message or a metric label.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from consort.deploy.errors import Unauthorized, error_body

ENV_VAR = "CONSORT_API_KEYS"
PROTECTED_PREFIX = "/v1/"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def configured_keys(environ: MutableMapping[str, str] | None = None) -> tuple[bytes, ...]:
    """The accepted keys (empty: authentication is off)."""
    raw = (environ if environ is not None else os.environ).get(ENV_VAR, "")
    return tuple(k.strip().encode() for k in raw.split(",") if k.strip())


def key_accepted(header: bytes | None, keys: tuple[bytes, ...]) -> bool:
    if header is None:
        return False
    scheme, _, token = header.partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return False
    token = token.strip()
    # Compare against every key, without stopping early, so timing does not tell which prefix matched.
    matches = [hmac.compare_digest(token, key) for key in keys]
    return any(matches)


def _route_path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _protected(path: str) -> bool:
    """/v1/*, and the same routes scoped to one model id (/models/{model}/v1/*)."""
    if path.startswith(PROTECTED_PREFIX):
        return True
    parts = path.split("/", 3)  # "", "models", "{model}", "v1/..."
    return len(parts) == 4 and parts[1] == "models" and parts[3].startswith(PROTECTED_PREFIX[1:])


class ApiKeyMiddleware:
    """Rejects /v1/* (and /models/{model}/v1/*) requests without a valid bearer key when keys are configured."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._keys: tuple[bytes, ...] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _protected(_route_path(scope)):
            await self.app(scope, receive, send)
            return
        if self._keys is None:
            self._keys = configured_keys()
        if self._keys:
            header = next((v for k, v in scope.get("headers", []) if k.lower() == b"authorization"), None)
            if not key_accepted(header, self._keys):
                await _reject(send, "missing" if header is None else "invalid")
                return
        await self.app(scope, receive, send)


async def _reject(send: Send, why: str) -> None:
    message = (
        "no API key given: send 'Authorization: Bearer <key>'"
        if why == "missing"
        else "invalid API key: send 'Authorization: Bearer <key>' with one of the server's keys"
    )
    body = error_body(Unauthorized(message)).model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b"Bearer"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
