"""Who may use the studio: a token, a Host allow-list, same-origin Origin and a CSRF token (Jupyter's model).

Any page open in the user's browser can send requests to a loopback port, so the studio trusts none
it did not hand a secret to:

- a **token**, generated at start (or the ``--api-key`` given), printed in the start URL
  ``http://127.0.0.1:PORT/?token=TOKEN``; opening that URL exchanges it for an HttpOnly,
  SameSite=Strict cookie. Programs send ``Authorization: Bearer TOKEN`` instead. Without either,
  every request (static files included) gets 401;
- a **Host allow-list** (:func:`tunelab.serve.security.allowed_hosts`): a DNS-rebound name gets 403, so
  no other site can read the studio's answers;
- for every request that changes state (POST, PUT, DELETE), a same-origin ``Origin`` (or ``Referer``)
  and the ``X-CSRF-Token`` header the pages send (``hx-headers`` on ``<body>``; the upload script reads
  it from ``<meta name="csrf-token">``). A request with the Bearer header needs neither: a browser
  never adds that header across origins without a CORS preflight, which the studio never grants.
"""

from __future__ import annotations

import secrets
from urllib.parse import urlencode

from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from tunelab.serve.security import UNSAFE_METHODS, host_problem, origin_problem, request_origin
from tunelab.studio.render import CSRF

CSRF_HEADER = "x-csrf-token"
LOGIN_PARAMS = ("token", "key")  # ?key= is the name the studio's first key login used


def new_token() -> str:
    """A token for one studio session: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def cookie_name(scope: Scope) -> str:
    """One cookie per port: cookies ignore ports, and two studios on one machine must not share one."""
    server = scope.get("server") or ("", 0)
    return f"tunelab_studio_{server[1] or 0}"


def _matches(given: str | None, secret: str) -> bool:
    return bool(given) and secrets.compare_digest(given.encode(), secret.encode())


class StudioGuard:
    """ASGI middleware: refuses what the module docstring says, and makes the CSRF token known to pages."""

    def __init__(self, app: ASGIApp, *, token: str, csrf: str, allowed: frozenset[str]):
        self.app, self.token, self.csrf, self.allowed = app, token, csrf, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        CSRF.set(self.csrf)  # this request's task renders pages with it
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> Response | None:
        """The response that ends this request here, or None when it may go on to the page."""
        headers = Headers(scope=scope)
        refused_host = host_problem(headers, self.allowed, who="the studio")
        if refused_host is not None:
            return PlainTextResponse(refused_host, status_code=403)
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        by_header = scheme.lower() == "bearer" and _matches(bearer.strip(), self.token)
        cookies = cookie_parser(headers.get("cookie", ""))
        if not by_header and not _matches(cookies.get(cookie_name(scope)), self.token):
            return self.login(scope)
        if scope["method"] not in UNSAFE_METHODS:
            return None
        refused_origin = origin_problem(scope, headers)
        if refused_origin is not None:
            return PlainTextResponse(refused_origin, status_code=403)
        origin = request_origin(headers)
        if not by_header and (origin is None or not _matches(headers.get(CSRF_HEADER), self.csrf)):
            return PlainTextResponse(
                "missing or wrong CSRF token: reload the page and try again", status_code=403
            )
        return None

    def login(self, scope: Scope) -> Response:
        """``?token=TOKEN`` sets the cookie and redirects to the same page without it; anything else is 401."""
        query = QueryParams(scope.get("query_string", b"").decode("latin-1"))
        if scope["method"] == "GET" and any(_matches(query.get(p), self.token) for p in LOGIN_PARAMS):
            rest = urlencode([(k, v) for k, v in query.multi_items() if k not in LOGIN_PARAMS])
            response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), status_code=303)
            response.set_cookie(cookie_name(scope), self.token, httponly=True, samesite="strict")
            return response
        return PlainTextResponse(
            "the studio needs its token: open the URL `tunelab studio` printed (http://HOST:PORT/?token=...), "
            "or send 'Authorization: Bearer TOKEN'",
            status_code=401,
            headers={"www-authenticate": "Bearer"},
        )
