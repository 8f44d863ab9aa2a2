"""Before/after evaluation: the Evaluate page (``/eval``) and the section of a finished run's page.

An eval is ``python -m tunelab eval --compare BASE TUNED --data FILE --predictions P [options]`` run
as its own process (the command itself, so the numbers are the CLI's). Everything about it is on
disk under ``RUNS/.studio/eval/``: the job record and log (:mod:`tunelab.studio.jobs`), the request
(``JOB.request.json``: models, data, options, where the report goes) and the per-example predictions
(``JOB.predictions.jsonl``, see :mod:`tunelab.evaluate.predictions`). A run page's eval writes its
report where the CLI does, ``RUN/eval/report.json`` (what ``tunelab runs show`` reads); an eval
started on the Evaluate page writes it into its own folder, ``.studio/eval/compare/ID/``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from tunelab.evaluate.predictions import disagrees, read_prediction_rows
from tunelab.runs.index import find_run_dirs
from tunelab.runs.report import EVAL_DIR
from tunelab.studio import jobs
from tunelab.studio.forms import form_fields
from tunelab.studio.render import page
from tunelab.studio.roots import Roots
from tunelab.studio.train_page import valid_name

PAGE_JOBS = "eval/compare"  # evals started on the Evaluate page: .studio/eval/compare/ID.*
ROWS_SHOWN = 500  # predictions listed on the page (the file has them all)
LOG_LINES = 12


@dataclass
class EvalRequest:
    """What the form asks for: the options of ``tunelab eval`` the studio offers."""

    base: str
    tuned: str
    data: str
    max_examples: int | None = None
    forgetting: bool = False
    forgetting_data: str = ""
    forgetting_n: int | None = None
    robustness: bool = False

    def args(self, out: Path | None, predictions: Path) -> list[str]:
        """The ``tunelab eval`` arguments, as the CLI would be typed."""
        args = ["eval", "--compare", self.base, self.tuned, "--data", self.data]
        if self.max_examples:
            args += ["--max-examples", str(self.max_examples)]
        if self.forgetting and not self.forgetting_data:
            args.append("--forgetting")
        if self.forgetting_data:
            args += ["--forgetting-data", self.forgetting_data]
        if self.forgetting_n and (self.forgetting or self.forgetting_data):
            args += ["--forgetting-n", str(self.forgetting_n)]
        if self.robustness:
            args.append("--robustness")
        if out is not None:
            args += ["--out", str(out)]
        return [*args, "--predictions", str(predictions)]


def _count(fields: dict[str, str], key: str, label: str) -> int | None:
    text = fields.get(key, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{label}: {text!r} is not a whole number of 1 or more; leave it blank for all")
    return int(text)


def parse_request(fields: dict[str, str], tuned: str | None = None) -> EvalRequest:
    """The form's fields as a request; ValueError names the field to fix."""
    base, data = fields.get("base", "").strip(), fields.get("data", "").strip()
    tuned = tuned if tuned is not None else fields.get("tuned", "").strip()
    if not base or not tuned or not data:
        raise ValueError("give the base model, the tuned model and an eval data file")
    for label, value in (("base model", base), ("tuned model", tuned), ("eval data", data)):
        if value.startswith("-"):  # it would reach `tunelab eval` as an option, not a value
            raise ValueError(f"{label}: {value!r} starts with '-'; give a model spec or path (./{value})")
    return EvalRequest(
        base,
        tuned,
        data,
        max_examples=_count(fields, "max_examples", "max examples"),
        forgetting=fields.get("forgetting") == "on",
        forgetting_data=fields.get("forgetting_data", "").strip(),
        forgetting_n=_count(fields, "forgetting_n", "general texts"),
        robustness=fields.get("robustness") == "on",
    )


def checked_request(roots: Roots, fields: dict[str, str], tuned: str | None = None) -> EvalRequest:
    """:func:`parse_request`, with every local model and data file under the studio's roots."""
    wanted = parse_request(fields, tuned)
    for label, value in (
        ("base model", wanted.base),
        ("tuned model", wanted.tuned),
        ("eval data", wanted.data),
    ):
        roots.check_local(value, label)
    roots.check_local(wanted.forgetting_data, "general texts")
    return wanted


def request_path(runs_dir: Path, job: str) -> Path:
    return jobs.log_path(runs_dir, job).with_suffix(".request.json")


def predictions_path(runs_dir: Path, job: str) -> Path:
    return jobs.log_path(runs_dir, job).with_suffix(".predictions.jsonl")


def start_eval(runs_dir: Path, processes: dict, job: str, request: EvalRequest, out: Path | None) -> None:
    """Record the request, then start ``tunelab eval`` on it (a stale predictions file is removed)."""
    predictions = predictions_path(runs_dir, job)
    predictions.parent.mkdir(parents=True, exist_ok=True)
    predictions.unlink(missing_ok=True)
    report = out if out is not None else Path(request.tuned) / EVAL_DIR
    record = {"request": asdict(request), "report": str(report), "predictions": str(predictions)}
    record["started"] = time.time()
    request_path(runs_dir, job).write_text(json.dumps(record), encoding="utf-8")
    process = jobs.start(runs_dir, job, request.args(out, predictions))
    processes[process.pid] = process


def read_request(runs_dir: Path, job: str) -> dict[str, Any] | None:
    try:
        return json.loads(request_path(runs_dir, job).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def eval_result(runs_dir: Path, job: str, processes: dict, report_dir: Path | None = None) -> dict[str, Any]:
    """``running`` (with the log's tail), the payload and predictions of the last eval, its failure's
    last log line, or ``none``. ``report_dir``: where the report is when no request was recorded."""
    record = read_request(runs_dir, job) or {}
    report = Path(record["report"]) / "report.json" if record else (report_dir or Path()) / "report.json"
    started = jobs.job_started(runs_dir, job)
    process = jobs.read_job(runs_dir, job)
    if process is not None and jobs.alive(int(process["pid"]), processes):
        return {"state": "running", "tail": jobs.log_tail(runs_dir, job, LOG_LINES)}
    if report.is_file() and (started is None or report.stat().st_mtime >= started):
        payload = json.loads(report.read_text(encoding="utf-8"))
        predictions = Path(record.get("predictions", "")) if record else None
        rows = read_prediction_rows(predictions) if predictions and predictions.is_file() else []
        return {"state": "done", "payload": payload, "rows": rows, "request": record.get("request")}
    if process is not None:
        tail = [line for line in jobs.log_tail(runs_dir, job) if line.strip()]
        return {"state": "failed", "reason": tail[-1] if tail else "the eval process exited without a report"}
    return {"state": "none"}


def prediction_view(rows: list[dict[str, Any]], only_disagreements: bool) -> dict[str, Any]:
    """The rows the table lists (all, or where base and tuned disagree), capped at ROWS_SHOWN."""
    rows = [r | {"disagrees": disagrees(r)} for r in rows]
    chosen = [r for r in rows if r["disagrees"]] if only_disagreements else rows
    return {
        "rows": chosen[:ROWS_SHOWN],
        "matching": len(chosen),
        "total": len(rows),
        "disagreements": sum(r["disagrees"] for r in rows),
        "only": only_disagreements,
    }


def model_choices(runs_dir: Path) -> dict[str, list[str]]:
    """Finished runs (by path) and the base models they name, for the model fields' suggestions."""
    runs, bases = [], {"tiny:llama"}
    for run in find_run_dirs(runs_dir):
        if (run / "final").is_dir():
            runs.append(str(run))
            base = eval_defaults(run)["base"]
            if base:
                bases.add(base)
    return {"runs": sorted(runs), "bases": sorted(bases)}


def eval_defaults(run_path: Path) -> dict[str, str]:
    """The base model and eval data the run's recipe names (the form's defaults)."""
    import yaml

    try:
        recipe = yaml.safe_load((run_path / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        recipe = {}
    data = recipe.get("data") or {}
    return {"base": (recipe.get("model") or {}).get("name_or_path") or "", "data": data.get("eval") or ""}


def page_job_id(runs_dir: Path, request: EvalRequest) -> str:
    """A free id for an Evaluate-page eval: ``TUNED-vs-BASE``, numbered when taken."""

    def stem(spec: str) -> str:
        return Path(spec.rstrip("/")).name or spec

    raw = f"{stem(request.tuned)}-vs-{stem(request.base)}"
    base = "".join(c if c.isalnum() or c in "-_." else "-" for c in raw).strip(".-")[:80] or "eval"
    name, k = base, 1
    while request_path(runs_dir, f"{PAGE_JOBS}/{name}").exists():
        k += 1
        name = f"{base}-{k}"
    return name


def past_evals(runs_dir: Path) -> list[dict[str, Any]]:
    """Evals started on the Evaluate page, newest first: id, models and data."""
    found = []
    for path in (runs_dir / jobs.STUDIO_DIR / PAGE_JOBS).glob("*.request.json"):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found.append({"id": path.name.removesuffix(".request.json"), **record})
    return sorted(found, key=lambda r: r.get("started", 0), reverse=True)


def _fragment(result: dict[str, Any], url: str, only: bool = False):
    view = prediction_view(result.get("rows", []), only)
    return page("_eval.html", result=result, url=url, view=view)


def register(app: FastAPI) -> None:
    """The Evaluate page and the before/after routes of a run."""
    register_page(app)
    register_run_section(app)


def register_page(app: FastAPI) -> None:
    @app.get("/eval")
    def eval_home(request: Request):
        runs_dir, query = request.app.state.runs_dir, request.query_params
        tuned = query.get("tuned", "")
        readable = tuned and request.app.state.roots.contains(tuned)
        defaults = eval_defaults(Path(tuned)) if readable else {"base": "", "data": ""}
        values = {"base": query.get("base", defaults["base"]), "tuned": tuned}
        values["data"] = query.get("data", defaults["data"])
        context = {"values": values, "choices": model_choices(runs_dir), "past": past_evals(runs_dir)}
        return page("eval.html", active="/eval", **context)

    @app.post("/eval")
    async def eval_start(request: Request):
        state = request.app.state
        try:
            wanted = checked_request(state.roots, await form_fields(request))
        except ValueError as e:  # shown in the result's place, nothing started
            return _fragment({"state": "refused", "reason": str(e)}, "/eval")
        job_id = page_job_id(state.runs_dir, wanted)
        out = state.runs_dir / jobs.STUDIO_DIR / PAGE_JOBS / job_id
        await run_in_threadpool(
            start_eval, state.runs_dir, state.processes, f"{PAGE_JOBS}/{job_id}", wanted, out
        )
        return _fragment({"state": "running", "tail": [], "id": job_id}, f"/eval/{job_id}/result")

    @app.get("/eval/{job_id}")
    def eval_view(request: Request, job_id: str):
        if (
            not valid_name(job_id)
            or read_request(request.app.state.runs_dir, f"{PAGE_JOBS}/{job_id}") is None
        ):
            return page("error.html", status_code=404, message=f"no eval named {job_id}")
        return page("eval_view.html", active="/eval", job_id=job_id)

    @app.get("/eval/{job_id}/result")
    def eval_page_result(request: Request, job_id: str, only: str = ""):
        state = request.app.state
        if not valid_name(job_id):
            return page("_error.html", status_code=404, message=f"no eval named {job_id}")
        result = eval_result(state.runs_dir, f"{PAGE_JOBS}/{job_id}", state.processes)
        return _fragment(result | {"id": job_id}, f"/eval/{job_id}/result", only == "disagreements")


def register_run_section(app: FastAPI) -> None:
    @app.post("/train/{name}/eval")
    async def run_eval_start(request: Request, name: str):
        state = request.app.state
        if not valid_name(name) or not (state.runs_dir / name / "final").is_dir():
            reason = f"{name}: only a finished run (with final/) can be evaluated"
            return _fragment({"state": "refused", "reason": reason}, f"/train/{name}/eval")
        try:
            wanted = checked_request(
                state.roots, await form_fields(request), tuned=str(state.runs_dir / name)
            )
        except ValueError as e:
            return _fragment({"state": "refused", "reason": str(e)}, f"/train/{name}/eval")
        await run_in_threadpool(start_eval, state.runs_dir, state.processes, f"eval/{name}", wanted, None)
        return _fragment({"state": "running", "tail": []}, f"/train/{name}/eval")

    @app.get("/train/{name}/eval")
    def run_eval_status(request: Request, name: str, part: str = "result", only: str = ""):
        state = request.app.state
        if not valid_name(name):
            return page("_error.html", status_code=404, message=f"not a run name: {name}")
        report_dir = state.runs_dir / name / EVAL_DIR
        result = eval_result(state.runs_dir, f"eval/{name}", state.processes, report_dir)
        if part != "form":
            return _fragment(result, f"/train/{name}/eval", only == "disagreements")
        if not (state.runs_dir / name / "final").is_dir():
            return page("_saved_note.html", note="")  # no model yet: nothing to evaluate
        defaults = eval_defaults(state.runs_dir / name)
        view = prediction_view(result.get("rows", []), False)
        url = f"/train/{name}/eval"
        context = {"name": name, "result": result, "url": url, "view": view, "runs_dir": str(state.runs_dir)}
        return page("_eval_form.html", **context, **defaults)
