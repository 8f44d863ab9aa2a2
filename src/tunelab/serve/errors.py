"""Errors in OpenAI's shape, so every client library shows the message instead of a parse failure."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error a handler raises; the app turns it into ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002  (OpenAI's field name)
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def variant_fault(status: int) -> bool:
    """Whether an error status is the variant's (or its upstream's) own fault: a 5xx. A 4xx (the
    client's bad request, 429 included: the queue is the server's, not a variant's) and 499 (the
    client went away) never count against a variant, so no client can roll a healthy one back."""
    return status >= 500


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:  # noqa: A002
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def not_found(model: str, known: list[str]) -> APIError:
    return APIError(
        404,
        f"The model '{model}' does not exist here; served models: {', '.join(known)} (see GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def variant_down(variant: str, alias: str | None) -> APIError:
    """The variant (or, through an alias, its baseline) is marked down: 503 naming it."""
    via = f" (the baseline of alias '{alias}')" if alias else ""
    return APIError(
        503,
        f"Variant '{variant}'{via} is down: its backend failed its recent requests or health probes. "
        "Retry shortly; GET /health shows each variant's state.",
        type="server_error",
        code="variant_down",
        headers={
            "retry-after": "5",
            "x-tunelab-adapter": variant,
            **({"x-tunelab-alias": alias} if alias else {}),
        },
    )


def queue_full(size: int) -> APIError:
    return APIError(
        429,
        f"The server is busy: all {size} queue slots are taken. Retry shortly.",
        type="rate_limit_error",
        code="queue_full",
        headers={"retry-after": "1"},
    )


def timed_out(seconds: float) -> APIError:
    return APIError(
        504,
        f"Generation did not finish within the {seconds:g} s request timeout; ask for fewer max_tokens "
        "or retry when the server is less busy",
        type="timeout_error",
        code="timeout",
    )


def internal_error(ref: str) -> APIError:
    """A fault of the server's own: a reference to its log entry, never the exception's text."""
    return APIError(
        500,
        f"The server had an internal error while processing the request (reference {ref}; the "
        "server log has the details). Retry, or report it with the reference.",
        type="server_error",
        code="internal_error",
    )
