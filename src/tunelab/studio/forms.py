"""Reading the pages' form posts.

The forms post ``application/x-www-form-urlencoded`` (htmx's default). Starlette's own form parser
needs the python-multipart package, which tunelab does not depend on; the standard library parses
this encoding completely, so the studio does it here.
"""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import Request


async def form_fields(request: Request) -> dict[str, str]:
    """The posted fields, last value wins; blank fields are kept (as "") so a cleared field is seen."""
    body = (await request.body()).decode("utf-8", errors="replace")
    return dict(parse_qsl(body, keep_blank_values=True))
