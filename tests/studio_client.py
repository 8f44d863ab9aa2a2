"""A TestClient for the studio that behaves as the user's browser on the studio's own page.

It logs in with the start URL's token (the cookie), addresses the studio as ``127.0.0.1`` (a Host the
studio answers) and sends what the pages send with every request that changes state: the studio's own
``Origin`` and the CSRF token. Tests that check a refusal build a plain client and leave one out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tunelab.studio.app import create_app

BASE = "http://127.0.0.1:7860"
EXAMPLES = Path(__file__).parents[1] / "recipes" / "data"  # the repository's example data, used by recipes


def studio_client(runs: str | Path, *, roots: list[Path] | None = None, **kwargs: Any) -> TestClient:
    """The studio over ``runs``; its files: ``runs``' parent (the test's tmp dir) and the example data,
    unless ``roots``."""
    follow = kwargs.pop("follow_redirects", True)
    app = create_app(runs, roots=roots if roots is not None else [Path(runs).parent, EXAMPLES], **kwargs)
    return logged_in(app, follow_redirects=follow)


def logged_in(app: Any, **kwargs: Any) -> TestClient:
    client = TestClient(app, base_url=BASE, **kwargs)
    assert client.get(f"/?token={app.state.token}", follow_redirects=False).status_code == 303
    client.headers.update({"Origin": BASE, "X-CSRF-Token": app.state.csrf})
    return client
