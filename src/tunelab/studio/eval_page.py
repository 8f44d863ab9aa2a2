"""Before/after evaluation of a finished run, from its run page.

*Evaluate* runs ``python -m tunelab eval --compare BASE RUN --data FILE`` as its own process (the
command itself, so the numbers are the CLI's); the result is the payload it writes to
``RUN/eval/report.json`` (what ``tunelab runs show`` reads), shown as the before/after table with the
main metric's paired-bootstrap CI and any confusion matrices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from tunelab.runs.report import EVAL_DIR
from tunelab.studio import jobs
from tunelab.studio.forms import form_fields
from tunelab.studio.render import page
from tunelab.studio.train_page import valid_name


def eval_job(name: str) -> str:
    return f"eval/{name}"  # under .studio/eval/: never listed as a run


def eval_defaults(run_path: Path) -> dict[str, str]:
    """The base model and eval data the run's recipe names (the form's defaults)."""
    import yaml

    try:
        recipe = yaml.safe_load((run_path / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    data = recipe.get("data") or {}
    return {"base": (recipe.get("model") or {}).get("name_or_path") or "", "data": data.get("eval") or ""}


def eval_result(runs_dir: Path, name: str, processes: dict) -> dict[str, Any]:
    """``running``, the payload of the last eval, or the failure's last log line (or nothing yet)."""
    job = jobs.read_job(runs_dir, eval_job(name))
    report = runs_dir / name / EVAL_DIR / "report.json"
    if job is not None and jobs.alive(int(job["pid"]), processes):
        return {"state": "running"}
    if report.is_file():
        started = jobs.job_started(runs_dir, eval_job(name))
        if started is None or report.stat().st_mtime >= started:
            return {"state": "done", "payload": json.loads(report.read_text(encoding="utf-8"))}
    if job is not None:
        tail = [line for line in jobs.log_tail(runs_dir, eval_job(name)) if line.strip()]
        return {"state": "failed", "reason": tail[-1] if tail else "the eval process exited without a report"}
    return {"state": "none"}


def register(app: FastAPI) -> None:
    """The before/after evaluation routes of a run."""

    @app.post("/train/{name}/eval")
    async def eval_start(request: Request, name: str):
        state = request.app.state
        if not valid_name(name) or not (state.runs_dir / name / "final").is_dir():
            return page("_error.html", message=f"{name}: only a finished run (with final/) can be evaluated")
        fields = await form_fields(request)
        base, data = fields.get("base", "").strip(), fields.get("data", "").strip()
        if not base or not data:
            return page("_error.html", message="give the base model and an eval data file")
        args = ["eval", "--compare", base, str(state.runs_dir / name), "--data", data]
        process = jobs.start(state.runs_dir, eval_job(name), args)
        state.processes[process.pid] = process
        return page("_eval.html", name=name, result={"state": "running"})

    @app.get("/train/{name}/eval")
    async def eval_status(request: Request, name: str, part: str = "result"):
        state = request.app.state
        if not valid_name(name):
            return page("_error.html", status_code=404, message=f"not a run name: {name}")
        result = eval_result(state.runs_dir, name, state.processes)
        if part != "form":
            return page("_eval.html", name=name, result=result)
        if not (state.runs_dir / name / "final").is_dir():
            return page("_saved_note.html", note="")  # no model yet: nothing to evaluate
        return page("_eval_form.html", name=name, result=result, **eval_defaults(state.runs_dir / name))
