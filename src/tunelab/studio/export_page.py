"""The Export page: ``tunelab export`` on a finished run, as its own process, then the parity gate's table.

*Export* runs ``python -m tunelab export RUN --out OUT --merge|--adapter|--gguf TYPE`` (the command
itself) like the eval job: log and PID under ``RUNS/.studio/export/``. The output folder defaults to
``RUNS/exports/NAME-KIND`` and an existing one is refused (the studio never passes ``--overwrite``).
When the process has ended, the page shows the verdict export wrote into ``OUT/tunelab_export.json``
(``verification``, see :mod:`tunelab.export.gate`), or the failure's last log line.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool

from tunelab.export.run import EXPORT_META, GGUF_TYPES, check_out_path
from tunelab.studio import jobs
from tunelab.studio.chat_models import finished_runs
from tunelab.studio.forms import form_fields
from tunelab.studio.render import page
from tunelab.studio.roots import Roots
from tunelab.studio.train_page import valid_name

EXPORTS_DIR = "exports"


def kinds() -> list[tuple[str, str]]:
    """(form value, label) of what can be exported here; GGUF only where llama.cpp's binding imports."""
    offered = [("merged", "merged model (Hugging Face folder)"), ("adapter", "adapter alone (PEFT)")]
    if importlib.util.find_spec("llama_cpp") is not None:
        offered += [(f"gguf:{t}", f"GGUF {t} (llama.cpp)") for t in GGUF_TYPES]
    return offered


def kind_args(kind: str) -> list[str]:
    """The command's option for a form value; ValueError for one the form does not offer."""
    if kind == "merged":
        return ["--merge"]
    if kind == "adapter":
        return ["--adapter"]
    if kind.startswith("gguf:") and kind[5:] in GGUF_TYPES:
        return ["--gguf", kind[5:]]
    raise ValueError(f"kind: {kind} is not one of merged, adapter, gguf:TYPE ({', '.join(GGUF_TYPES)})")


def default_out(runs_dir: Path, run: str, kind: str) -> Path:
    return runs_dir / EXPORTS_DIR / f"{run}-{kind.replace(':', '-')}"


def export_job(stem: str) -> str:
    return f"export/{stem}"  # under .studio/export/: never listed as a run


def free_job(runs_dir: Path, stem: str) -> str:
    """A job name not taken by an earlier export (its log and record are kept)."""
    name, k = stem, 1
    while jobs.read_job(runs_dir, export_job(name)) is not None:
        k += 1
        name = f"{stem}-{k}"
    return name


def start_export(runs_dir: Path, processes: dict, fields: dict[str, str], roots: Roots) -> str:
    """Check the form and start the export process; its job name. ValueError says what to fix (an
    output folder outside the studio's roots included)."""
    run, kind = fields.get("run", "").strip(), fields.get("kind", "").strip()
    if not valid_name(run) or not (runs_dir / run / "final").is_dir():
        raise ValueError(f"run: {run} is not a finished run in {runs_dir} (no final/)")
    args = kind_args(kind)
    out = Path(fields.get("out", "").strip() or default_out(runs_dir, run, kind)).expanduser()
    check_out_path(out)  # `--help` as the folder would be read as an option by the export command
    roots.check(out, "out")
    if out.exists():
        raise ValueError(f"out: {out} already exists; choose a new folder (an export never replaces one)")
    command = ["export", str(runs_dir / run), "--out", str(out), *args]
    if fields.get("no_verify"):
        command.append("--no-verify")
    name = free_job(runs_dir, out.name)
    process = jobs.start(runs_dir, export_job(name), command)
    processes[process.pid] = process
    return name


def export_result(runs_dir: Path, name: str, processes: dict) -> dict[str, Any]:
    """``running``, ``done`` with the export's provenance (its gate verdict), or ``failed`` with the reason."""
    job = jobs.read_job(runs_dir, export_job(name))
    if job is None:
        return {"state": "none"}
    command = job["command"]
    out = Path(command[command.index("--out") + 1])
    base = {"name": name, "out": str(out), "run": Path(command[command.index("export") + 1]).name}
    if jobs.alive(int(job["pid"]), processes):
        return base | {"state": "running"}
    tail = [line for line in jobs.log_tail(runs_dir, export_job(name)) if line.strip()]
    try:
        meta = json.loads((out / EXPORT_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        reason = tail[-1] if tail else "the export process exited without writing its files"
        return base | {"state": "failed", "reason": reason}
    verification = meta.get("verification")
    gate = gate_rows(verification) if verification and "checks" in verification else []
    failed = bool(verification) and verification.get("passed") is False
    return base | {
        "state": "gate-failed" if failed else "done",
        "kind": meta.get("gguf_type") or meta.get("kind"),
        "verification": verification,
        "gate": gate,
        "reason": tail[-1] if failed and tail else "",
    }


def gate_rows(verification: dict[str, Any]) -> list[dict[str, Any]]:
    """The parity gate's table as ``export`` prints it: main metric with the CI, then each other check."""
    run, export = verification["run"], verification["export"]
    main = verification["main_metric"]
    lo, hi = verification["comparison"]["ci95"]
    rows = []
    for check in verification["checks"]:
        name = check["name"]
        a = None if name.endswith("_agreement") else run.get(name)
        b = export.get(name)
        rows.append({
            "check": name, "run": a, "export": b,
            "delta": None if a is None or b is None else b - a,
            "ci": f"[{lo:+.4f}, {hi:+.4f}]" if name == main else "",
            "limit": limit_text(name, check["limit"]), "passed": check["passed"], "message": check.get("message", ""),
        })  # fmt: skip
    return rows


LIMIT_FORMS = {"perplexity": "ratio ≤ {:.3f}", "stop_share": "drop ≤ {:.2f}"}


def limit_text(name: str, limit: Any) -> str:
    """The limit as ``export`` prints it: a minimum agreement, a maximum ratio or drop, or its own words."""
    if isinstance(limit, str):
        return limit
    if limit is None:
        return "—"
    if name.endswith("_agreement"):
        return f"≥ {limit:.2f}"
    return LIMIT_FORMS.get(name, "drop ≤ {:.3f}").format(abs(limit))


def register(app: FastAPI) -> None:
    """The Export page's routes."""

    @app.get("/export")
    def export(request: Request, run: str = "", job: str = ""):
        state = request.app.state
        runs = [r.name for r in finished_runs(state.runs_dir)]
        result = export_result(state.runs_dir, job, state.processes) if valid_name(job) else {"state": "none"}
        done = sorted(p.stem for p in (state.runs_dir / jobs.STUDIO_DIR / "export").glob("*.json"))
        return page(
            "export.html", active="/export", runs=runs, chosen=run or (runs[-1] if runs else ""),
            kinds=kinds(), exports_dir=str(state.runs_dir / EXPORTS_DIR), result=result, jobs=done,
        )  # fmt: skip

    @app.post("/export/start")
    async def export_start(request: Request):
        state = request.app.state
        try:
            fields = await form_fields(request)
            name = await run_in_threadpool(start_export, state.runs_dir, state.processes, fields, state.roots)
        except ValueError as e:  # shown in the result section, which stays the form's target
            return page("_export.html", result={"state": "refused", "reason": str(e)})
        return page("_export.html", result=export_result(state.runs_dir, name, state.processes))

    @app.get("/export/job/{name}")
    def export_status(request: Request, name: str):
        state = request.app.state
        if not valid_name(name):
            return page("_error.html", status_code=404, message=f"not an export name: {name}")
        return page("_export.html", result=export_result(state.runs_dir, name, state.processes))

    @app.get("/export/link")
    def export_link(request: Request, run: str = ""):
        """The run page's Export button, once the run has a final model to export."""
        finished = valid_name(run) and (request.app.state.runs_dir / run / "final").is_dir()
        return page("_export_link.html", run=run if finished else "")
