"""The Train page: start, stop and resume runs as separate processes; watch them live.

Starting checks the recipe as ``tunelab train`` does (:func:`tunelab.recipe.load_recipe`), then runs
that very command in a new process (:mod:`tunelab.studio.jobs`); the page follows the run directory
through server-sent events (:mod:`tunelab.studio.live`).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from tunelab.recipe import RecipeError
from tunelab.runs.index import find_run_dirs
from tunelab.studio import jobs
from tunelab.studio.forms import form_fields
from tunelab.studio.live import run_events
from tunelab.studio.recipe_page import load_checked
from tunelab.studio.render import page
from tunelab.studio.roots import Roots


def valid_name(name: str) -> bool:
    """A run name as train writes them: no path separators, not hidden, no ``..`` (a URL cannot escape)."""
    return bool(name) and not name.startswith(".") and all(c.isalnum() or c in "-_." for c in name)


def saved_recipes(runs_dir: Path) -> list[str]:
    return [str(p) for p in sorted((runs_dir / "recipes").glob("*.yaml"))]


def known_runs(runs_dir: Path) -> list[str]:
    """Run directories and runs started here that have no directory yet, by name."""
    started = [p.stem for p in (runs_dir / jobs.STUDIO_DIR).glob("*.json")]
    return sorted({p.name for p in find_run_dirs(runs_dir)} | set(started))


def start_run(runs_dir: Path, processes: dict, recipe_path: str, name: str, roots: Roots) -> str:
    """Check the recipe, then start ``tunelab train`` on it; the run's name. RecipeError if it is bad
    (the recipe, or a file it names, outside the studio's roots included)."""
    recipe = load_checked(roots, recipe_path)  # the CLI's own check, so the same messages
    outside = roots.recipe_problems(recipe)
    if outside:
        raise RecipeError(outside, source=recipe_path)
    name = jobs.free_name(runs_dir, name or recipe.output.name or Path(recipe_path).stem)
    process = jobs.start(runs_dir, name, jobs.train_args(Path(recipe_path), runs_dir, name))
    processes[process.pid] = process
    return name


def register(app: FastAPI) -> None:
    """The Train page's routes."""
    app.state.processes = {}  # PID -> Popen of runs this studio started: polled so none is a zombie

    @app.get("/train")
    def train(request: Request):
        runs_dir = request.app.state.runs_dir
        return page("train.html", active="/train", recipes=saved_recipes(runs_dir), runs=known_runs(runs_dir))

    @app.post("/train/start")
    async def train_start(request: Request):
        fields = await form_fields(request)
        state = request.app.state
        recipe, name = fields.get("recipe", "").strip(), fields.get("name", "").strip()
        try:
            name = await run_in_threadpool(
                start_run, state.runs_dir, state.processes, recipe, name, state.roots
            )
        except RecipeError as e:
            return page("_recipe_check.html", problems=e.problems, source=e.source, yaml="")
        return HTMLResponse("", headers={"HX-Redirect": f"/train/{name}"})

    @app.get("/train/{name}")
    def train_run(request: Request, name: str):
        state = request.app.state
        if not valid_name(name) or (
            jobs.read_job(state.runs_dir, name) is None and not (state.runs_dir / name).is_dir()
        ):
            return page("error.html", status_code=404, message=f"no run named {name} in {state.runs_dir}")
        return page(
            "run_live.html",
            active="/train",
            name=name,
            state=jobs.run_state(state.runs_dir, name, state.processes),
        )

    @app.get("/train/{name}/events")
    async def train_events(request: Request, name: str):
        state = request.app.state
        if not valid_name(name):
            return page("_error.html", status_code=404, message=f"not a run name: {name}")
        events = run_events(
            state.runs_dir, name, lambda: jobs.run_state(state.runs_dir, name, state.processes)
        )
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    _register_controls(app)


def _register_controls(app: FastAPI) -> None:
    """Stop and resume: signals to, and new processes for, a run that exists."""

    @app.post("/train/{name}/resume")
    async def train_resume(request: Request, name: str):
        state = request.app.state
        run_state = jobs.run_state(state.runs_dir, name, state.processes) if valid_name(name) else None
        if run_state is None or run_state.status not in ("failed", "interrupted"):
            return page("_saved_note.html", note="only a failed or interrupted run can be resumed")
        args = ["train", "--resume", str(state.runs_dir / name)]
        process = jobs.start(state.runs_dir, name, args)
        state.processes[process.pid] = process
        return HTMLResponse("", headers={"HX-Redirect": f"/train/{name}"})

    @app.post("/train/{name}/stop")
    async def train_stop(request: Request, name: str):
        state = request.app.state
        # Only a live run is signalled: the PID of a finished one may belong to another process by now.
        live = valid_name(name) and not jobs.run_state(state.runs_dir, name, state.processes).finished
        stopped = live and jobs.stop(state.runs_dir, name)
        return page(
            "_saved_note.html",
            note="stop sent; the run saves and ends" if stopped else "the run is not running",
        )
