"""The ``tunelab serve`` command: parse options (and ``--config``) into a :class:`ServeConfig` and run
the server; ``tunelab serve status`` reads a running server's state."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tunelab.console import fail, make_console

app = typer.Typer(
    invoke_without_command=True,
    help="Serve a base model, its adapters and OpenAI-compatible backends behind one API "
    "(chat, completions, streaming, A/B aliases); `tunelab serve status` reads a running server.",
)

# Ports a server can listen on. Options are checked before the model loads, so a typo is one line
# naming the option instead of an OverflowError traceback from the socket layer after the load.
PORT_RANGE = (1, 65535)


def _parse_adapter(text: str) -> tuple[str, str]:
    """``name=RUN`` or just ``RUN`` (named after its run directory)."""
    name, sep, path = text.partition("=")
    if sep and name and path:
        return name, path
    from tunelab.adapters import run_name  # noqa: PLC0415

    final = Path(text) / "final"
    return run_name(final if final.is_dir() else Path(text)), text


def check_numbers(
    *,
    port: int,
    queue_size: int,
    request_timeout: float,
    max_tokens_limit: int,
    rollout_every: int,
    min_samples: int,
    max_batch: int = 16,
    backend_failures: int = 3,
    watch_interval: float = 5.0,
    max_body_mb: float = 4.0,
) -> str | None:
    """The first out-of-range numeric option as an error message with the fix, or None."""
    low, high = PORT_RANGE
    if not low <= port <= high:
        return f"--port {port}: give a port from {low} to {high}"
    for option, value in (
        ("--queue-size", queue_size),
        ("--max-tokens-limit", max_tokens_limit),
        ("--rollout-every", rollout_every),
        ("--min-samples", min_samples),
        ("--max-batch", max_batch),
        ("--backend-failures", backend_failures),
    ):
        if value < 1:
            return f"{option} {value}: give a whole number of at least 1"
    for option, seconds in (("--request-timeout", request_timeout), ("--watch-interval", watch_interval)):
        if not seconds > 0:
            return f"{option} {seconds:g}: give a number of seconds above 0"
    if not max_body_mb > 0:
        return f"--max-body-mb {max_body_mb:g}: give a size in megabytes above 0, e.g. 4"
    return None


@app.callback()
def serve_cmd(
    ctx: typer.Context,
    base: Annotated[
        str | None, typer.Option("--base", help="base model (default: the adapters' own base_model)")
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="NAME=RUN_DIR (repeat); NAME is what clients ask for"),
    ] = None,
    alias: Annotated[
        list[str] | None,
        typer.Option(
            "--alias", help="ALIAS=A:0.9,B:0.1 A/B split of variants (repeat); the first is the baseline"
        ),
    ] = None,
    rollout: Annotated[
        list[str] | None,
        typer.Option("--rollout", help="ALIAS=0.05,0.25,1.0 gradual rollout of its candidate"),
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            "--backend",
            help="NAME=URL or NAME=MODEL@URL (repeat): an OpenAI-compatible upstream served as variant NAME",
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="serve YAML file; command-line options override it")
    ] = None,
    rollout_every: Annotated[int, typer.Option(help="healthy candidate requests per rollout step")] = 50,
    host: Annotated[str, typer.Option(help="address to bind; non-loopback needs --api-key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="bearer token clients must send (or $TUNELAB_API_KEY)")
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host", help="also answer requests for this Host name (repeat); loopback always"
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16")] = "auto",
    queue_size: Annotated[int, typer.Option(help="requests that may wait; more get 429")] = 64,
    request_timeout: Annotated[float, typer.Option(help="seconds a request may take in all")] = 60.0,
    max_tokens_limit: Annotated[int, typer.Option(help="largest max_tokens a request may ask for")] = 1024,
    min_samples: Annotated[
        int, typer.Option(help="requests each side needs before a rollback can happen")
    ] = 20,
    max_error_increase: Annotated[float, typer.Option(help="roll back past this error-rate gap")] = 0.05,
    max_latency_ratio: Annotated[float, typer.Option(help="roll back past this p95 latency ratio")] = 2.0,
    max_feedback_drop: Annotated[float, typer.Option(help="roll back past this mean-feedback drop")] = 0.5,
    max_batch: Annotated[int, typer.Option(help="most waiting requests decoded together")] = 16,
    backend_failures: Annotated[
        int, typer.Option(help="faults in a row (requests or probes) that mark a backend down")
    ] = 3,
    watch_interval: Annotated[
        float, typer.Option(help="seconds between backend health probes and watcher checks")
    ] = 5.0,
    log_dir: Annotated[
        Path | None,
        typer.Option(
            "--log-dir", help="write requests.jsonl and feedback.jsonl here (stores prompts and answers)"
        ),
    ] = None,
    max_body_mb: Annotated[
        float, typer.Option(help="largest request body in MB (MiB); larger ones get 413 unread")
    ] = 4.0,
) -> None:
    """Serve a base model, its adapters and OpenAI-compatible backends behind one API (chat,
    completions, streaming, A/B aliases); `tunelab serve status` reads a running server."""
    if ctx.invoked_subcommand is not None:
        return
    options = {k: v for k, v in locals().items() if k != "ctx"}
    _serve(ctx, options)


def _serve(ctx: typer.Context, options: dict[str, Any]) -> None:
    """Merge ``--config`` under the command line, check the numbers, build the config and serve."""
    from tunelab.serve.routing import check_share_sum  # noqa: PLC0415
    from tunelab.serve.security import api_key_from, check_bind  # noqa: PLC0415
    from tunelab.serve.server import serve  # noqa: PLC0415

    errors = make_console(stderr=True)
    try:
        merged = merge_config(ctx, options)
        for name, shares in merged["aliases"].items():  # before the model loads: a typo costs no wait
            check_share_sum(name, shares)
    except ValueError as e:
        fail(errors, str(e))
    numbers = ("port", "queue_size", "request_timeout", "max_tokens_limit", "rollout_every", "min_samples")
    problem = check_numbers(
        **{k: merged[k] for k in (*numbers, "max_batch", "backend_failures", "watch_interval", "max_body_mb")}
    )
    if problem:
        fail(errors, problem)
    try:
        key = api_key_from(merged["api_key"])
        check_bind(merged["host"], key)
        serve(serve_config(merged, key))
    except (OSError, ValueError) as e:
        fail(errors, str(e))


def merge_config(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The command line over the ``--config`` file: a scalar from the file counts where its option
    was left at its default; named entries (adapters, backends, aliases, rollouts) are merged, the
    command line's winning on the same name."""
    from tunelab.serve.backends import parse_backend  # noqa: PLC0415
    from tunelab.serve.config import load_config  # noqa: PLC0415
    from tunelab.serve.routing import parse_alias, parse_rollout  # noqa: PLC0415

    merged = dict(options)
    named = {
        "adapters": dict(_parse_adapter(a) for a in options["adapter"] or []),
        "backends": {spec.name: spec for spec in (parse_backend(b) for b in options["backend"] or [])},
        "aliases": dict(parse_alias(a) for a in options["alias"] or []),
        "rollouts": dict(parse_rollout(r) for r in options["rollout"] or []),
    }
    file = load_config(options["config"]) if options["config"] is not None else {}
    for key, value in file.items():
        if key in named:
            named[key] = {**value, **named[key]}
        elif _defaulted(ctx, key):
            merged[key] = value
    return {**merged, **named}


def _defaulted(ctx: typer.Context, option: str) -> bool:
    """Whether ``option`` was left at its default (by name: typer may bring its own click)."""
    source = ctx.get_parameter_source(option)
    return source is None or source.name in ("DEFAULT", "DEFAULT_MAP")


def serve_config(merged: dict[str, Any], key: str | None) -> Any:
    """The :class:`ServeConfig` of merged options."""
    from tunelab.serve.routing import WatchPolicy  # noqa: PLC0415
    from tunelab.serve.server import ServeConfig  # noqa: PLC0415

    policy = WatchPolicy(
        **{
            k: merged[k]
            for k in ("max_error_increase", "max_latency_ratio", "max_feedback_drop", "min_samples")
        }
    )
    log_dir = merged["log_dir"]
    return ServeConfig(
        base=merged["base"],
        adapters=merged["adapters"],
        aliases=merged["aliases"],
        rollouts=merged["rollouts"],
        rollout_every=merged["rollout_every"],
        policy=policy,
        host=merged["host"],
        port=merged["port"],
        api_key=key,
        device=merged["device"],
        dtype=merged["dtype"],
        queue_size=merged["queue_size"],
        request_timeout_s=merged["request_timeout"],
        max_tokens_limit=merged["max_tokens_limit"],
        max_batch=merged["max_batch"],
        backends=merged["backends"],
        backend_failures=merged["backend_failures"],
        watch_interval_s=merged["watch_interval"],
        log_dir=Path(log_dir) if log_dir is not None else None,
        max_body_mb=merged["max_body_mb"],
        allow_hosts=list(merged["allow_host"] or []),
    )


@app.command("status")
def status_cmd(
    url: Annotated[str, typer.Option(help="the running server's address")] = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="bearer token (or $TUNELAB_API_KEY)")
    ] = None,
) -> None:
    """Print a running server's aliases, their splits, and each variant's state, error rate and
    latency; exit 1 when an alias's baseline is down (as /ready answers 503)."""
    from tunelab.serve.security import api_key_from  # noqa: PLC0415
    from tunelab.serve.status import fetch_status, not_ready, print_status  # noqa: PLC0415

    errors = make_console(stderr=True)
    try:
        health = fetch_status(url, api_key_from(api_key))
    except ValueError as e:
        fail(errors, str(e))
    print_status(make_console(), health)
    if problem := not_ready(health):
        fail(errors, problem, code=1)  # 1, as a failed health check (2 is for bad input)
