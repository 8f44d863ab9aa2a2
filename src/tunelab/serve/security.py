"""Bearer-token auth, the rule that a server reachable from other machines must have a key, and the
Host/Origin/content-type guard both local services (``serve`` and ``studio``) put in front of their routes."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from tunelab.serve.errors import APIError

API_KEY_ENV = "TUNELAB_API_KEY"


def api_key_from(option: str | None) -> str | None:
    """``--api-key`` wins over ``$TUNELAB_API_KEY``; empty means none."""
    key = option if option is not None else os.environ.get(API_KEY_ENV)
    return key or None


def is_loopback(host: str) -> bool:
    """True only when every address ``host`` names is a loopback one (``localhost``, 127.x, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose an unauthenticated model server to the network."""
    if api_key is None and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host} without an API key: anyone who can reach this address could use "
            f"the model. Pass --api-key KEY (or set {API_KEY_ENV}), or bind to 127.0.0.1."
        )


def check_bearer(authorization: str | None, api_key: str | None, *, admin: bool = False) -> None:
    """Raise a 401 unless the ``Authorization: Bearer <key>`` header matches; constant-time compare.

    Admin endpoints change what the server serves, so they need a key even on loopback.
    """
    if api_key is None:
        if admin:
            raise APIError(
                403,
                f"admin endpoints are disabled because the server has no API key; restart it with --api-key "
                f"(or {API_KEY_ENV}) and send 'Authorization: Bearer <key>'",
                type="permission_error",
                code="admin_disabled",
            )
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise APIError(
            401,
            "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )


# Local services and web pages -------------------------------------------------------------------
# Any page open in the user's browser can send requests to loopback, and with DNS rebinding read the
# answers. What stops it, as Jupyter does: a Host allow-list (a rebound name is not on it), a
# same-origin Origin on requests that change state, and JSON-only APIs (a cross-origin JSON request
# needs a CORS preflight that these servers never grant).

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def allowed_hosts(bind: str, extra: Sequence[str] = ()) -> frozenset[str]:
    """The Host names a server bound to ``bind`` answers: the loopback names, the bound address and
    ``extra`` (``--allow-host``). A server bound beyond loopback has a key (see :func:`check_bind`),
    which protects it; it answers any name it is reached by (``*``), as Jupyter's remote access does."""
    names = {*LOOPBACK_NAMES, *(host_name(e) for e in extra)}
    if bind and not is_loopback(bind):
        names.add(ANY_HOST)
    elif bind:
        names.add(host_name(bind))
    return frozenset(names)


def host_name(header: str) -> str:
    """The name of a ``Host`` header or origin authority: port, brackets and a final dot removed."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name = header.rsplit(":", 1)[0] if header.count(":") == 1 else header
    return name.rstrip(".")


def host_allowed(header: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request's ``Host`` header names this server (a rebound DNS name does not)."""
    return ANY_HOST in allowed or (header is not None and host_name(header) in allowed)


def request_origin(headers: Mapping[str, str]) -> str | None:
    """The page a request came from: its ``Origin``, else the origin of its ``Referer``; None if neither."""
    origin = headers.get("origin")
    if origin:
        return origin.strip().lower()
    referer = urlsplit(headers.get("referer", ""))
    return f"{referer.scheme}://{referer.netloc}".lower() if referer.scheme and referer.netloc else None


def same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether ``origin`` is this server as the browser addressed it (``scheme://Host``)."""
    return origin == f"{scheme}://{host}".lower()


def media_type(headers: Mapping[str, str]) -> str:
    """The request body's media type, parameters (charset) dropped, lower case; "" when none is sent."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def host_problem(headers: Mapping[str, str], allowed: frozenset[str], who: str = "this server") -> str | None:
    """Why the request's ``Host`` is refused (a DNS-rebound name), or None when ``allowed`` names it."""
    host = headers.get("host")
    if host_allowed(host, allowed):
        return None
    name = host_name(host or "")
    return (
        f"Host {name!r} is not one {who} answers (a page may be reaching it through DNS rebinding); "
        f"if you reach it by that name, restart it with --allow-host {name or 'NAME'}"
    )


def origin_problem(scope: Scope, headers: Mapping[str, str]) -> str | None:
    """Why a request that names the page it came from is refused (another site), or None."""
    origin = request_origin(headers)
    if origin is not None and not same_origin(origin, scope.get("scheme", "http"), headers.get("host") or ""):
        return f"cross-origin request from {origin} refused"
    return None


def guard_problem(
    scope: Scope, allowed: frozenset[str], *, json_only: bool = False
) -> tuple[int, str, str] | None:
    """Why a request must be refused before any route sees it, as (status, code, message); None if not.

    The Host must be allowed; a state-changing request that names the page it came from must come
    from this server's own origin; with ``json_only``, its body must be ``application/json``."""
    headers = Headers(scope=scope)
    refused_host = host_problem(headers, allowed)
    if refused_host is not None:
        return 403, "host_not_allowed", refused_host
    if scope["method"] not in UNSAFE_METHODS:
        return None
    refused_origin = origin_problem(scope, headers)
    if refused_origin is not None:
        return 403, "cross_origin", refused_origin
    # a request without a body (an admin POST such as .../restore, a DELETE) has no type to check;
    # any body at all must be JSON, so a page's text/plain or form "simple request" is never read
    has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
    if json_only and has_body and media_type(headers) != "application/json":
        return 415, "unsupported_media_type", "send the body as JSON with 'Content-Type: application/json'"
    return None


class LocalGuard:
    """ASGI middleware that refuses what :func:`guard_problem` refuses, with a JSON error body in the
    OpenAI shape (``{"error": {"message", "type", "code"}}``)."""

    def __init__(
        self, app: ASGIApp, allowed: frozenset[str] = frozenset(LOOPBACK_NAMES), json_only: bool = True
    ):
        self.app, self.allowed, self.json_only = app, allowed, json_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = guard_problem(scope, self.allowed, json_only=self.json_only)
            if problem is not None:
                status, code, message = problem
                error = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
                await JSONResponse(error, status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)
