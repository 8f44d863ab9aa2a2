"""What one request may cost before the server does any work for it: its body's size and its nesting.

:class:`BodyLimit` is ASGI middleware: a declared ``Content-Length`` over the limit is answered 413
before the app sees the request, and a body sent without one (chunked) is counted as it arrives, so
no route ever holds more than the limit in memory or hands it to the JSON parser. :func:`parse_json`
is the parser the completion routes use: a body nested deeper than :data:`MAX_JSON_DEPTH` is a 400,
never a ``RecursionError`` somewhere later (the validator, a chat template, the proxy's encoder).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunelab.data.loaders import too_deep
from tunelab.serve.errors import APIError, error_body

DEFAULT_MAX_BODY_MB = 4.0
MAX_JSON_DEPTH = 64
"""Arrays and objects inside each other; real requests (tool schemas included) nest a handful deep."""


def body_bytes(megabytes: float) -> int:
    """``--max-body-mb`` in bytes (MiB: 1 MB = 1,048,576 bytes)."""
    return int(megabytes * 1024 * 1024)


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes the limit. FastAPI lets HTTP exceptions
    through its body parsing, so the app's handler answers it (with :meth:`response`)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over this server's limit of {limit / 1024 / 1024:g} MB")
        self.limit = limit

    def response(self) -> JSONResponse:
        message = f"{self.detail} (--max-body-mb); send a shorter prompt"
        return JSONResponse(error_body(message, code="body_too_large"), status_code=413)


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with a 413: by their ``Content-Length`` at once, or
    by counting the chunks of a body that declares none."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await BodyTooLarge(self.max_bytes).response()(scope, receive, send)
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, counted, send)


def parse_json(raw: bytes) -> Any:
    """The body as JSON: ``ValueError`` (with ``pos``) when it is not JSON, an :class:`APIError` 400
    when it nests deeper than :data:`MAX_JSON_DEPTH`. Run it off the event loop for large bodies."""
    try:
        data = json.loads(raw)
    except RecursionError:
        data = None
        deep = True
    else:
        deep = too_deep(data, MAX_JSON_DEPTH)
    if deep:
        raise APIError(
            400,
            f"the request body nests arrays or objects more than {MAX_JSON_DEPTH} levels deep; "
            "no parameter needs that, send a flatter body",
            code="body_too_deep",
        )
    return data
