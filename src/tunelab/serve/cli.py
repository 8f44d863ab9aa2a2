"""The ``tunelab serve`` command: parse options into a :class:`ServeConfig` and run the server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunelab.console import fail, make_console

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
    ):
        if value < 1:
            return f"{option} {value}: give a whole number of at least 1"
    if not request_timeout > 0:
        return f"--request-timeout {request_timeout:g}: give a number of seconds above 0"
    return None


def serve_cmd(
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
            "--alias", help="ALIAS=A:0.9,B:0.1 A/B split (repeat); the first adapter is the baseline"
        ),
    ] = None,
    rollout: Annotated[
        list[str] | None,
        typer.Option("--rollout", help="ALIAS=0.05,0.25,1.0 gradual rollout of its candidate"),
    ] = None,
    rollout_every: Annotated[int, typer.Option(help="healthy candidate requests per rollout step")] = 50,
    host: Annotated[str, typer.Option(help="address to bind; non-loopback needs --api-key")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="bearer token clients must send (or $TUNELAB_API_KEY)")
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
) -> None:
    """Serve a base model and its adapters behind an OpenAI-compatible API (chat, completions, streaming)."""
    from tunelab.serve.routing import WatchPolicy, parse_alias, parse_rollout  # noqa: PLC0415
    from tunelab.serve.security import api_key_from, check_bind  # noqa: PLC0415
    from tunelab.serve.server import ServeConfig, serve  # noqa: PLC0415

    errors = make_console(stderr=True)
    problem = check_numbers(
        port=port,
        queue_size=queue_size,
        request_timeout=request_timeout,
        max_tokens_limit=max_tokens_limit,
        rollout_every=rollout_every,
        min_samples=min_samples,
    )
    if problem:
        fail(errors, problem)
    try:
        key = api_key_from(api_key)
        check_bind(host, key)
        config = ServeConfig(
            base=base,
            adapters=dict(_parse_adapter(a) for a in adapter or []),
            aliases=dict(parse_alias(a) for a in alias or []),
            rollouts=dict(parse_rollout(r) for r in rollout or []),
            rollout_every=rollout_every,
            policy=WatchPolicy(
                max_error_increase=max_error_increase,
                max_latency_ratio=max_latency_ratio,
                max_feedback_drop=max_feedback_drop,
                min_samples=min_samples,
            ),
            host=host,
            port=port,
            api_key=key,
            device=device,
            dtype=dtype,
            queue_size=queue_size,
            request_timeout_s=request_timeout,
            max_tokens_limit=max_tokens_limit,
        )
        serve(config)
    except (OSError, ValueError) as e:
        fail(errors, str(e))
