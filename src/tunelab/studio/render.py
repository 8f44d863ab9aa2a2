"""The Jinja2 environment the pages render with: autoescaped, templates and assets packaged with tunelab."""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any

from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

# Autoescape on: every value a user supplied (paths, data rows, recipe values) is shown as written,
# never read as HTML. StrictUndefined: a template naming a value the view did not pass is a bug, not "".
ENV = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

# The studio's CSRF token, set per request by :class:`tunelab.studio.guard.StudioGuard`: every page
# sends it back with each htmx request (``hx-headers`` on ``<body>``).
CSRF: ContextVar[str] = ContextVar("tunelab_studio_csrf", default="")

# The pages in the nav, in lifecycle order: (path, label).
NAV = [
    ("/", "Home"),
    ("/data", "Data"),
    ("/recipe", "Recipe"),
    ("/train", "Train"),
    ("/runs", "Runs"),
    ("/eval", "Evaluate"),
    ("/chat", "Chat"),
    ("/export", "Export"),
]


def page(template: str, *, active: str = "", status_code: int = 200, **context: Any) -> HTMLResponse:
    """A full page or an htmx fragment (templates starting with ``_``) as an HTML response."""
    html = ENV.get_template(template).render(nav=NAV, active=active, csrf=CSRF.get(), **context)
    return HTMLResponse(html, status_code=status_code)
