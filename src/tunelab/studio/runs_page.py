"""The Runs page: ``tunelab runs ls``'s index (:func:`tunelab.runs.index.refresh_index`), filtered
and sorted. A run the index lists as running whose trainer is gone is shown as failed, as the Train
page shows it (the manifest of a killed run still says running)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from tunelab.runs.index import refresh_index
from tunelab.studio import jobs
from tunelab.studio.render import page

SORTABLE = ("name", "status", "method", "objective", "model", "key_value", "started", "duration_s")


def run_rows(runs_dir: Path) -> list[dict[str, Any]]:
    """Every run under ``runs_dir``, newest first, with its live status."""
    rows = [asdict(row) for row in refresh_index(runs_dir)]
    for row in rows:
        if row["status"] == "running":
            row["status"] = jobs.run_state(runs_dir, row["name"]).status
    return rows


def filtered(rows: list[dict[str, Any]], status: str, method: str, text: str) -> list[dict[str, Any]]:
    """Rows with that status and method (blank: any) whose name or model contains ``text``."""
    text = text.lower()
    return [
        r
        for r in rows
        if (not status or r["status"] == status)
        and (not method or r["method"] == method)
        and (not text or text in r["name"].lower() or text in (r["model"] or "").lower())
    ]


def sorted_rows(rows: list[dict[str, Any]], key: str, descending: bool) -> list[dict[str, Any]]:
    """Sorted by ``key`` (unknown keys: as given); blanks last either way."""
    if key not in SORTABLE:
        return rows
    present = [r for r in rows if r[key] is not None]
    blank = [r for r in rows if r[key] is None]
    return sorted(present, key=lambda r: r[key], reverse=descending) + blank


def register(app: FastAPI) -> None:
    """The Runs page's route."""

    @app.get("/runs")
    async def runs(
        request: Request, status: str = "", method: str = "", q: str = "", sort: str = "", desc: int = 0
    ):
        rows = run_rows(request.app.state.runs_dir)
        shown = sorted_rows(filtered(rows, status, method, q), sort, bool(desc))
        return page(
            "runs.html",
            active="/runs",
            rows=shown,
            total=len(rows),
            statuses=sorted({r["status"] for r in rows if r["status"]}),
            methods=sorted({r["method"] for r in rows if r["method"]}),
            query={"status": status, "method": method, "q": q, "sort": sort, "desc": desc},
        )
