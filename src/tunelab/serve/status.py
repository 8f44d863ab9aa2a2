"""``tunelab serve status``: a running server's aliases, splits and per-variant health as tables."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from tunelab.console import styled


def fetch_status(url: str, api_key: str | None, timeout_s: float = 10.0) -> dict[str, Any]:
    """The server's ``/health`` body; an unreachable server or a non-tunelab answer is a ValueError."""
    import httpx  # noqa: PLC0415

    url = url.rstrip("/").removesuffix("/v1")
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{url}/health", headers=headers, timeout=timeout_s)
    except httpx.HTTPError as err:
        raise ValueError(
            f"no tunelab server answered at {url} ({type(err).__name__}); start one with "
            "`tunelab serve` or pass --url"
        ) from None
    try:
        body = response.json()
        variants = body["variants"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f"{url}/health answered {response.status_code} without tunelab's variant list; is --url a "
            "tunelab serve address?"
        ) from None
    return {**body, "variants": variants, "aliases": body.get("aliases") or {}}


def not_ready(health: dict[str, Any]) -> str | None:
    """Why the server is not ready (as its ``/ready`` judges: every alias's baseline up; with no
    aliases, some variant up), or None."""
    variants = health["variants"]
    down = sorted(
        f"'{alias['baseline']}' (baseline of alias '{name}')"
        for name, alias in health["aliases"].items()
        if not variants.get(alias["baseline"], {}).get("up", False)
    )
    if down:
        return f"not ready: {', '.join(down)} is down; GET /health or the server log says why"
    if not health["aliases"] and not any(v.get("up") for v in variants.values()):
        return "not ready: every variant is down; the server log says why"
    return None


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _rate(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:.1%}"


def print_status(console: Console, health: dict[str, Any]) -> None:
    """Two tables: aliases (baseline and split) and variants (kind, state, window numbers)."""
    aliases = Table(title="aliases")
    for column in ("alias", "baseline", "split"):
        aliases.add_column(column)
    for name, alias in sorted(health["aliases"].items()):
        split = ", ".join(f"{variant} {share:.0%}" for variant, share in alias["shares"].items())
        aliases.add_row(name, alias["baseline"], split)
    variants = Table(title="variants")
    for column in ("variant", "kind", "state", "requests", "error rate", "p50 ms", "p95 ms"):
        variants.add_column(column, justify="right" if column[0] in "rep" and column != "error" else "left")
    for name, v in health["variants"].items():
        state = styled("up", "green") if v.get("up") else styled("down", "red")
        variants.add_row(
            name,
            v.get("kind", "?"),
            state,
            str(v.get("requests", 0)),
            _rate(v.get("error_rate")),
            _ms(v.get("p50_latency_s")),
            _ms(v.get("p95_latency_s")),
        )
    if health["aliases"]:
        console.print(aliases)
    else:
        console.print("no aliases")
    console.print(variants)
