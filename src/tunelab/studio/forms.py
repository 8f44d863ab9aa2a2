"""Reading the pages' form posts.

The forms post ``application/x-www-form-urlencoded`` (htmx's default). Starlette's own form parser
needs the python-multipart package, which tunelab does not depend on; the standard library parses
this encoding completely, so the studio does it here. Any other body type is refused with 415: the
studio never reads a ``text/plain`` body (what a cross-site form may send) as a form.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import HTTPException, Request

from tunelab.serve.security import media_type

FORM_TYPE = "application/x-www-form-urlencoded"


def require_type(request: Request, wanted: str) -> None:
    """A 415 unless the request's body is of type ``wanted``."""
    if media_type(request.headers) != wanted:
        raise HTTPException(415, f"send the body as {wanted}")


async def form_fields(request: Request) -> dict[str, str]:
    """The posted fields, last value wins; blank fields are kept (as "") so a cleared field is seen."""
    if media_type(request.headers) != "" or await request.body():  # a bodiless post is an empty form
        require_type(request, FORM_TYPE)
    body = (await request.body()).decode("utf-8", errors="replace")
    return dict(parse_qsl(body, keep_blank_values=True))
