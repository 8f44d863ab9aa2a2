"""Forward a completion request to a backend and its answer back, as it arrives.

The request body is the client's JSON with only ``model`` rewritten; the answer keeps the upstream's
status and body and gains the ``x-tunelab-adapter``/``x-tunelab-alias`` headers. Streams are relayed
chunk by chunk (bytes as they come off the socket) while a tap reads the SSE events on the side for
the response id, the assembled text and the usage, which feedback, the request log and the metrics
need. Faults of the upstream are counted against the backend: no connection, a timeout, a 5xx (its
body goes to the log, the client gets a reference to it: it can hold paths and internals), or a 2xx
that is not an answer (not an OpenAI JSON completion, or not an event stream when one was asked for:
a 502). A 4xx is the client's: passed through as sent and never counted against the backend.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tunelab.serve.backends import Backends, UpstreamFault
from tunelab.serve.errors import APIError

log = logging.getLogger("tunelab.serve")
# Upstream response headers worth keeping; hop-by-hop and length headers are the server's to set.
KEPT_HEADERS = ("content-type", "retry-after")
LOGGED_BODY = 64 * 1024  # what the log keeps of an upstream's error body


@dataclass
class Answer:
    """What the request log and feedback need from an upstream answer."""

    id: str | None = None
    text: str = ""
    finish_reason: str | None = None
    tokens: tuple[int, int] = (0, 0)


class Host(Protocol):
    """The app state the proxy reports to (see ``app._AppState``)."""

    backends: Backends

    def record(
        self,
        route: Any,
        started: float,
        error_status: int | None,
        tokens: tuple[int, int] = ...,
        token_times: list[float] | None = ...,
    ) -> None: ...
    def upstream_fault(self, name: str, fault: UpstreamFault) -> None: ...
    def upstream_ok(self, name: str) -> None: ...
    def completed(self, route: Any, answer: Answer, data: dict[str, Any], user: str | None) -> None: ...


class Unanswered(APIError):
    """The upstream gave no answer at all (connect or timeout); ``unsent`` when the request never
    reached it (a refused connection), so another variant may safely take it."""

    def __init__(self, error: APIError, fault: UpstreamFault) -> None:
        super().__init__(error.status, error.message, type=error.type, code=error.code, headers=error.headers)
        self.unsent = fault.unsent


def upstream_error(variant: str, fault: UpstreamFault) -> APIError:
    """The client's error for an upstream that did not answer: 504 for a timeout, else 502."""
    if fault.reason == "timeout":
        return APIError(504, f"{fault.detail}; retry later", type="timeout_error", code="upstream_timeout")
    return APIError(
        502, f"{fault.detail}; variant '{variant}' is not answering, retry later", type="server_error",
        code="upstream_unavailable",
    )  # fmt: skip


async def forward(host: Host, route: Any, data: dict[str, Any], path: str, user: str | None) -> Response:
    """Send one request to ``route.served``'s backend and answer with the upstream's response."""
    started, name = time.monotonic(), route.served
    stream = bool(data.get("stream"))
    try:
        response = await host.backends.send(name, path, data, stream=stream)
    except UpstreamFault as fault:
        # Counted as the upstream's fault here; the client's outcome is the caller's to record (the
        # baseline may still answer it).
        host.upstream_fault(name, fault)
        error = upstream_error(name, fault)
        error.headers.update(route.headers)
        raise Unanswered(error, fault) from None
    headers = {**route.headers, **{k: v for k in KEPT_HEADERS if (v := response.headers.get(k))}}
    kind = response.headers.get("content-type", "")
    if stream and response.is_success and not kind.startswith("text/event-stream"):
        await response.aclose()
        return _not_an_answer(host, route, started, f"content-type {kind!r} instead of an event stream", b"")
    if not stream or not response.is_success:
        body = await response.aread() if stream else response.content
        if stream:
            await response.aclose()
        return _whole(host, route, response, body, headers, data, user, started)
    relay = _relay(host, route, response, data, user, started)
    return StreamingResponse(relay, status_code=response.status_code, headers=headers)


def _whole(
    host: Host,
    route: Any,
    response: httpx.Response,
    body: bytes,
    headers: dict[str, str],
    data: dict[str, Any],
    user: str | None,
    started: float,
) -> Response:
    """A complete upstream answer: counted (5xx as a fault), remembered and logged when it succeeded."""
    status = response.status_code
    if status >= 500:
        return _upstream_error(host, route, started, status, body, headers)
    if status >= 400:
        host.upstream_ok(route.served)  # it answered: the request, not the upstream, was at fault
        host.record(route, started, status)
        if status in (401, 403):  # the client passed tunelab's auth: the upstream's key is what is wrong
            log.warning("backend '%s' answered %d: check its api_key_env", route.served, status)
        return Response(content=body, status_code=status, headers=headers)
    parsed = _parse_whole(body)
    if parsed is None:
        return _not_an_answer(host, route, started, "a body that is not an OpenAI JSON completion", body)
    answer, payload = parsed
    host.upstream_ok(route.served)
    host.record(route, started, None, answer.tokens)
    host.completed(route, answer, data, user)
    if "model" in payload:  # the upstream's name for its model can be a file path: say the variant's
        body = json.dumps({**payload, "model": route.served}, ensure_ascii=False).encode()
    return Response(content=body, status_code=status, headers=headers)


def _parse_whole(body: bytes) -> tuple[Answer, dict[str, Any]] | None:
    """What an OpenAI JSON completion says, and the completion; None when the body is not one
    (HTML, plain text, an object without choices)."""
    try:
        payload = json.loads(body)
        choice = payload["choices"][0]
        usage = payload.get("usage") or {}
        message = choice.get("message") or {}
        text = message.get("content") if "message" in choice else choice.get("text")
        tokens = (int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
        return Answer(payload.get("id"), text or "", choice.get("finish_reason"), tokens), payload
    except (ValueError, AttributeError, TypeError, KeyError, IndexError, RecursionError):
        return None


def _upstream_error(
    host: Host, route: Any, started: float, status: int, body: bytes, headers: dict[str, str]
) -> Response:
    """An upstream 5xx: a fault of the backend; its body goes to the log, the client gets a reference."""
    ref = uuid.uuid4().hex[:12]
    log.error(
        "backend '%s' answered %d (ref %s): %s",
        route.served, status, ref, body[:LOGGED_BODY].decode("utf-8", "replace"),
    )  # fmt: skip
    host.upstream_fault(
        route.served, UpstreamFault("http_5xx", f"backend '{route.served}' answered {status}")
    )
    host.record(route, started, status)
    error = APIError(status, f"upstream error, see log ref {ref}", type="server_error", code="upstream_error")
    kept = {k: v for k, v in headers.items() if k != "content-type"}  # the body is ours now: JSON
    return JSONResponse(error.body(), status_code=status, headers=kept)


def _not_an_answer(host: Host, route: Any, started: float, what: str, body: bytes) -> Response:
    """A 2xx that is no completion: the upstream's fault (a 502), so the watcher sees a broken backend."""
    fault = UpstreamFault("bad_response", f"backend '{route.served}' answered with {what}")
    log.warning("%s; it began %r", fault.detail, body[:200])
    host.upstream_fault(route.served, fault)
    host.record(route, started, 502)
    error = APIError(
        502,
        f"variant '{route.served}' answered with something that is not a completion; retry later",
        type="server_error",
        code="upstream_bad_response",
    )
    return JSONResponse(error.body(), status_code=502, headers=route.headers)


async def _relay(
    host: Host, route: Any, response: httpx.Response, data: dict[str, Any], user: str | None, started: float
) -> AsyncIterator[bytes]:
    """The upstream's events as they arrive, a whole line at a time (``model`` renamed). The answer
    is complete once ``[DONE]`` arrives: counted and logged before the client gets that line, since
    clients (the openai SDK) close the connection right after it and may post feedback at once."""
    tap, status = SSETap(route.served), 0  # 0 until the answer is complete or failed: the client left
    try:
        async for chunk in response.aiter_raw():
            out = tap.feed(chunk)
            if tap.done:
                _streamed(host, route, tap, data, user, started)
                status = None
            if out:
                yield out
            if status is None:
                break
        else:
            if rest := tap.rest():
                yield rest
            _streamed(host, route, tap, data, user, started)  # it ended without [DONE]
            status = None
    except httpx.TransportError as err:  # the upstream died or stalled mid-stream
        if status is None:
            return  # after [DONE]: nothing was lost
        reason = "timeout" if isinstance(err, httpx.TimeoutException) else "disconnect"
        fault = UpstreamFault(reason, f"backend '{route.served}' broke off the stream ({type(err).__name__})")
        host.upstream_fault(route.served, fault)
        status = 504 if reason == "timeout" else 502
        yield f"data: {json.dumps(upstream_error(route.served, fault).body())}\n\n".encode()
    finally:
        with anyio.CancelScope(shield=True):  # the client may have gone: still close the upstream
            await response.aclose()
        if status is not None:
            host.record(route, started, status or 499)  # 0: the client went away before [DONE]


def _streamed(
    host: Host, route: Any, tap: SSETap, data: dict[str, Any], user: str | None, started: float
) -> None:
    """A relayed stream is complete: counted, remembered for feedback and logged."""
    answer = tap.finish()
    host.upstream_ok(route.served)
    host.record(route, started, None, answer.tokens, tap.token_times)
    host.completed(route, answer, data, user)


@dataclass
class SSETap:
    """Reads OpenAI server-sent events from raw bytes (any chunking, ``\\n`` or ``\\r\\n`` lines) and
    passes them on a whole line at a time, each event's ``model`` renamed to ``model`` (an
    upstream's name can be a file path); notes ``[DONE]`` and when each token arrived."""

    model: str | None = None
    answer: Answer = field(default_factory=Answer)
    done: bool = False
    token_times: list[float] = field(default_factory=list)
    _buffer: bytes = b""
    _parts: list[str] = field(default_factory=list)

    def feed(self, chunk: bytes) -> bytes:
        """Take bytes off the socket; return the complete lines among them, ready to relay."""
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return b"".join(self._line(line) + b"\n" for line in lines)

    def rest(self) -> bytes:
        """What is left once the upstream has closed: a last line without its newline."""
        rest, self._buffer = self._buffer, b""
        return self._line(rest) if rest else b""

    def _line(self, line: bytes) -> bytes:
        end = b"\r" if line.endswith(b"\r") else b""
        if not line.startswith(b"data:"):
            return line
        event = self._event(line[5:].strip(b" \r"))
        if self.model is None or not isinstance(event, dict) or "model" not in event:
            return line
        return b"data: " + json.dumps({**event, "model": self.model}, ensure_ascii=False).encode() + end

    def _event(self, payload: bytes) -> Any:
        if payload == b"[DONE]":
            self.done = True
            return None
        try:
            event = json.loads(payload)
            self.answer.id = self.answer.id or event.get("id")
            if usage := event.get("usage"):
                self.answer.tokens = (
                    int(usage.get("prompt_tokens") or 0),
                    int(usage.get("completion_tokens") or 0),
                )
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                text = (delta.get("content") if "delta" in choice else choice.get("text")) or ""
                if text:
                    self.token_times.append(time.monotonic())
                self._parts.append(text)
                self.answer.finish_reason = choice.get("finish_reason") or self.answer.finish_reason
        except (ValueError, AttributeError, TypeError, RecursionError):
            return None  # not an OpenAI chunk: relayed, not read
        return event

    def finish(self) -> Answer:
        """The answer once the stream has ended: its id, the text of every delta joined, usage."""
        self.answer.text = "".join(self._parts)
        return self.answer
