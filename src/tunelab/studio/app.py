"""The studio's FastAPI app: pages, static assets and the guard in front of them; state lives in the runs dir."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from tunelab.serve.security import LOOPBACK_NAMES
from tunelab.studio import chat_page, data_page, eval_page, export_page, recipe_page, runs_page, train_page
from tunelab.studio.guard import StudioGuard, new_token
from tunelab.studio.render import STATIC, page
from tunelab.studio.roots import Roots


def create_app(
    runs_dir: str | Path = "runs",
    *,
    api_key: str | None = None,
    roots: Iterable[str | Path] | None = None,
    allowed_hosts: Iterable[str] = LOOPBACK_NAMES,
) -> FastAPI:
    """The studio over ``runs_dir`` (created if missing), behind :class:`~tunelab.studio.guard.StudioGuard`.

    Its token is ``api_key`` when given, else a new random one (``app.state.token``); it answers the
    ``allowed_hosts`` and reads and writes files only under ``runs_dir`` and ``roots`` (default: the
    current directory), see :mod:`tunelab.studio.roots`."""
    app = FastAPI(title="tunelab studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.runs_dir = Path(runs_dir)
    app.state.runs_dir.mkdir(parents=True, exist_ok=True)
    app.state.roots = Roots(app.state.runs_dir, roots)
    app.state.token = api_key or new_token()
    app.state.csrf = secrets.token_urlsafe(32)
    app.add_middleware(
        StudioGuard, token=app.state.token, csrf=app.state.csrf, allowed=frozenset(allowed_hosts)
    )
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/")
    def home(request: Request):
        return page("home.html", active="/", runs_dir=str(request.app.state.runs_dir))

    data_page.register(app)
    recipe_page.register(app)
    train_page.register(app)
    runs_page.register(app)
    eval_page.register(app)
    chat_page.register(app)
    export_page.register(app)
    return app
