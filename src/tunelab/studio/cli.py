"""`tunelab studio`: a thin shell over :func:`tunelab.studio.app.create_app`, bound like `serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab.console import fail, make_console, styled
from tunelab.serve.security import allowed_hosts, api_key_from, check_bind

err = make_console(stderr=True)


def studio_cmd(
    runs: Annotated[Path, typer.Option("--runs", help="Runs directory the studio reads and writes.")] = Path(
        "runs"
    ),
    host: Annotated[
        str, typer.Option(help="Address to bind; other than loopback needs --api-key.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 7860,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", help="Token every request must carry (or $TUNELAB_API_KEY); default: a new one."
        ),
    ] = None,
    data_root: Annotated[
        list[Path] | None,
        typer.Option(
            "--data-root",
            help="Folder whose files the studio may read and write, besides --runs (repeat); "
            "default: the current directory.",
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host", help="Also answer requests for this Host name (repeat); loopback always."
        ),
    ] = None,
) -> None:
    """Start the studio: audit data, preview masks and build recipes in the browser."""
    key = api_key_from(api_key)
    try:
        check_bind(host, key)
    except ValueError as e:
        fail(err, str(e).replace("serve on", "run the studio on").replace("use the model", "use the studio"))
    if runs.exists() and not runs.is_dir():
        fail(err, f"--runs {runs}: is a file; give a directory for the studio's runs")
    for root in data_root or []:
        if not root.is_dir():
            fail(err, f"--data-root {root}: not a folder; give a folder the studio may read and write")
    import uvicorn

    from tunelab.studio.app import create_app

    app = create_app(runs, api_key=key, roots=data_root, allowed_hosts=allowed_hosts(host, allow_host or []))
    url = f"http://{host}:{port}/"
    login = url if key else f"{url}?token={app.state.token}"  # a key the user chose is not printed
    err.print(styled("studio", "green") + f" {login}  (runs: {runs}; files under: {app.state.roots})")
    uvicorn.run(app, host=host, port=port, log_level="warning")
