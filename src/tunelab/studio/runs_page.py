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
from tunelab.studio.train_page import valid_name

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


def compare_runs(runs_dir: Path, names: list[str]) -> dict[str, Any]:
    """``tunelab runs compare``'s content: recipe fields that differ, final metrics, overlaid loss curves."""
    import base64
    import tempfile

    from tunelab.runs.cli import final_metrics, recipe_differences
    from tunelab.runs.plots import compare_loss_curves
    from tunelab.runs.rundir import RunDir

    missing = [n for n in names if not valid_name(n) or not (runs_dir / n / "manifest.json").is_file()]
    if len(names) < 2 or missing:
        raise ValueError(
            f"no run {missing[0]!r} in {runs_dir}" if missing else "choose two or more runs to compare"
        )
    dirs = [RunDir(runs_dir / n) for n in names]
    recipes = [d.read_recipe() if d.recipe_path.is_file() else {} for d in dirs]
    metrics = [final_metrics(d) for d in dirs]
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    with tempfile.TemporaryDirectory() as tmp:  # the CLI's own plot, written then inlined
        written = compare_loss_curves([(d.name, d.read_metrics()) for d in dirs], Path(tmp) / "loss.png")
        png = base64.b64encode(written.read_bytes()).decode() if written else None
    return {
        "names": names,
        "differences": recipe_differences(recipes),
        "metrics": {k: [m.get(k) for m in metrics] for k in keys},
        "png": png,
    }


def register(app: FastAPI) -> None:
    """The Runs page's routes."""

    @app.get("/runs/compare")
    def runs_compare(request: Request):
        names = request.query_params.getlist("run")
        try:
            return page(
                "runs_compare.html", active="/runs", **compare_runs(request.app.state.runs_dir, names)
            )
        except ValueError as e:
            return page("error.html", active="/runs", status_code=400, message=str(e))

    @app.get("/runs")
    def runs(
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
