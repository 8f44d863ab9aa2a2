"""The studio's FastAPI app: pages, static assets and the key check; state lives in the runs dir."""

from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from tunelab.studio import chat_page, data_page, eval_page, export_page, recipe_page, runs_page, train_page
from tunelab.studio.render import STATIC, page

KEY_COOKIE = "tunelab_studio_key"


def create_app(runs_dir: str | Path = "runs", *, api_key: str | None = None) -> FastAPI:
    """The studio over ``runs_dir`` (created if missing). With ``api_key`` every request needs it: the
    ``Authorization: Bearer`` header, or the cookie that opening ``/?key=KEY`` once sets."""
    app = FastAPI(title="tunelab studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runs_dir = Path(runs_dir)
    app.state.runs_dir.mkdir(parents=True, exist_ok=True)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if api_key is not None:
        _require_key(app, api_key)

    @app.get("/")
    async def home(request: Request):
        return page("home.html", active="/", runs_dir=str(request.app.state.runs_dir))

    data_page.register(app)
    recipe_page.register(app)
    train_page.register(app)
    runs_page.register(app)
    eval_page.register(app)
    chat_page.register(app)
    export_page.register(app)
    return app


def _require_key(app: FastAPI, api_key: str) -> None:
    """Every request but the key's own redirect must carry the key (header or cookie)."""

    def matches(given: str | None) -> bool:
        return given is not None and secrets.compare_digest(given.encode(), api_key.encode())

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if (scheme.lower() == "bearer" and matches(token.strip())) or matches(
            request.cookies.get(KEY_COOKIE)
        ):
            return await call_next(request)
        if matches(request.query_params.get("key")):
            response = RedirectResponse(request.url.path, status_code=303)
            response.set_cookie(KEY_COOKIE, api_key, httponly=True, samesite="strict")
            return response
        return PlainTextResponse(
            "missing or wrong API key: open /?key=KEY once, or send 'Authorization: Bearer KEY'",
            status_code=401,
            headers={"www-authenticate": "Bearer"},
        )
