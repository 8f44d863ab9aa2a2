"""The Data page: a file's audit findings with the offending rows, and its loss-mask preview.

Both call what the CLI calls: :func:`tunelab.data.audit.audit` (``data audit``) and
:func:`tunelab.data.show.preview_examples` (``data show``), so the page shows exactly what the commands
print. Input problems are shown on the page as the one-line message the CLI would print.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tunelab.data.formats import FormatError
from tunelab.data.loaders import DataError, iter_records
from tunelab.studio.forms import form_fields, require_type
from tunelab.studio.prepare import clean_file, split_file
from tunelab.studio.render import page
from tunelab.studio.uploads import UPLOAD_TYPE, UploadError, store

ROWS_SHOWN = 5  # offending rows shown per finding (the count says how many there are)
INPUT_ERRORS = (DataError, FormatError, ValueError, OSError)


@dataclass
class Finding:
    """One audit check that hit: its name, how many rows, and the first offending row numbers."""

    name: str
    count: int
    rows: list[int]
    shown: dict[int, str] = field(default_factory=dict)  # row number -> the row as written


def _row_numbers(node: dict) -> list[int]:
    """The row numbers a report section names (``row_numbers``, or the rows in its ``examples``)."""
    found: list[int] = []

    def walk(value: Any) -> None:
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            found.append(value)
        elif isinstance(value, list):
            for item in value:
                walk(item)
        elif isinstance(value, dict) and "row" in value:
            walk(value["row"])

    walk(node.get("row_numbers") or node.get("examples") or [])
    return list(dict.fromkeys(found))


def audit_findings(report: dict) -> list[Finding]:
    """Every section of an audit report that counts rows and found some, as a flat list."""
    findings: list[Finding] = []

    def walk(node: dict, path: list[str]) -> None:
        rows = node.get("rows")
        if path and isinstance(rows, int) and not isinstance(rows, bool) and rows > 0:
            findings.append(Finding(" ".join(path).replace("_", " "), rows, _row_numbers(node)))
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, [*path, key])

    walk({k: v for k, v in report.items() if k != "settings"}, [])
    lengths = report.get("lengths") or {}
    if lengths.get("over_max_length"):
        rows = _row_numbers({"examples": lengths.get("over_examples", [])})
        findings.append(Finding("longer than max length", lengths["over_max_length"], rows))
    return findings


def attach_rows(path: str, findings: list[Finding]) -> None:
    """Read the first offending rows of each finding from the file, as written."""
    wanted = {r for f in findings for r in f.rows[:ROWS_SHOWN]}
    raw: dict[int, str] = {}
    for row, record in iter_records(path, skip_bad=True):
        if row in wanted:
            raw[row] = json.dumps(record, ensure_ascii=False)
        if len(raw) == len(wanted):
            break
    for finding in findings:
        finding.shown = {r: raw[r] for r in finding.rows[:ROWS_SHOWN] if r in raw}


def run_audit(path: str) -> dict[str, Any]:
    """The page's view of ``tunelab data audit PATH``: the report, its findings and blocking problems."""
    from tunelab.data.audit import audit, blocking_problems

    report = audit(path, skip_bad=True)
    findings = audit_findings(report)
    attach_rows(path, findings)
    return {"report": report, "findings": findings, "blocking": blocking_problems(report)}


def run_preview(path: str, model: str, n: int) -> dict[str, Any]:
    """The page's view of ``tunelab data show PATH --model MODEL -n N``: one token list per sequence."""
    from tunelab.data.show import first_examples, preview_examples
    from tunelab.models.load import tokenizer_for

    rows = first_examples(path, n, "auto", None)  # bad input fails before a tokenizer is loaded
    previews, notes = preview_examples(path, tokenizer_for(model), n=n, rows=rows)
    return {"previews": previews, "notes": notes}


def _one_line(error: Exception) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return " ".join(str(error).split())


def register(app: FastAPI) -> None:
    """The Data page's routes. The work runs in a worker thread: a long audit never holds up other pages."""

    @app.get("/data")
    def data_form(path: str = ""):
        return page("data.html", active="/data", path=path, model="tiny:llama")

    @app.put("/data/upload")
    async def data_upload(request: Request, name: str = ""):
        require_type(request, UPLOAD_TYPE)
        try:
            path = await store(request.app.state.runs_dir, name, request.stream())
        except UploadError as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        return {"path": str(path)}

    @app.post("/data/audit")
    async def data_audit(request: Request):
        path = (await form_fields(request)).get("path", "").strip()
        roots = request.app.state.roots
        return await run_in_threadpool(
            _view, "_audit.html", lambda: {"path": path, **run_audit(roots.check(path or "(no file given)"))}
        )

    @app.post("/data/clean")
    async def data_clean(request: Request):
        fields = await form_fields(request)
        path, runs_dir = fields.get("path", "").strip() or "(no file given)", request.app.state.runs_dir
        roots = request.app.state.roots
        if fields.get("action") == "split":
            return await run_in_threadpool(
                _view,
                "_split.html",
                lambda: split_file(runs_dir, roots.check(path), fields.get("ratios", "")),
            )
        return await run_in_threadpool(_view, "_clean.html", lambda: clean_file(runs_dir, roots.check(path)))

    @app.post("/data/preview")
    async def data_preview(request: Request):
        fields = await form_fields(request)
        path, model = fields.get("path", "").strip(), fields.get("model", "").strip() or "tiny:llama"
        roots = request.app.state.roots

        def view() -> dict[str, Any]:
            n = int(fields.get("n") or 3)
            if n < 1:
                raise ValueError(f"examples must be 1 or more, got {n}")
            return {"path": path, **run_preview(roots.check(path or "(no file given)"), model, n)}

        return await run_in_threadpool(_view, "_preview.html", view)


def _view(template: str, build: Callable[[], dict[str, Any]]):
    """``template`` rendered with what ``build`` returns, or the one-line error of bad input."""
    try:
        return page(template, **build())
    except INPUT_ERRORS as e:
        return page("_error.html", message=_one_line(e))
