"""``tunelab runs ls / show / compare``: find, inspect and compare run directories.

Thin: listing goes through the SQLite index (:mod:`tunelab.runs.index`), numbers are printed with the
report's :func:`~tunelab.runs.report.fmt`, so the terminal and ``report.html`` show the same digits.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tunelab.console import fail, make_console
from tunelab.runs.index import RunRow, refresh_index
from tunelab.runs.report import EVAL_DIR, REPORT_HTML
from tunelab.runs.rundir import RunDir
from tunelab.runs.summary import flatten, fmt, split_metric_rows

app = typer.Typer(help="List, show and compare training runs.", no_args_is_help=True)

RootOption = Annotated[Path, typer.Option("--root", help="folder of run directories")]


def _out() -> Console:
    return make_console()


def _fail(message: str) -> None:
    fail(make_console(stderr=True), message)


def resolve_run(name_or_path: str, root: Path) -> RunDir:
    """A run given as a directory path, or as a name under ``root``; fails naming both places tried."""
    for candidate in (Path(name_or_path), root / name_or_path):
        if (candidate / "manifest.json").is_file():
            return RunDir(candidate)
    _fail(
        f"no run {name_or_path!r}: neither {name_or_path} nor {root / name_or_path} holds a manifest.json. "
        f"`tunelab runs ls {root}` lists the runs there; pass --root for another folder."
    )
    raise AssertionError  # unreachable: _fail exits


def runs_table(rows: list[RunRow]) -> Table:
    table = Table(title=f"{len(rows)} run(s)")
    for column in ("name", "status", "method", "objective", "key metric", "duration (s)"):
        table.add_column(column, justify="right" if column.startswith("duration") else "left")
    for row in rows:
        metric = f"{row.key_metric} {fmt(row.key_value)}" if row.key_metric else fmt(None)
        table.add_row(
            row.name, fmt(row.status), fmt(row.method), fmt(row.objective), metric, fmt(row.duration_s)
        )
    return table


@app.command("ls")
def ls_cmd(
    root: Annotated[Path, typer.Argument(help="folder of run directories")] = Path("runs"),
    json_: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """List the runs under ROOT, newest first (served from ROOT/.tunelab-index.sqlite, kept fresh)."""
    if not root.is_dir():
        _fail(f"{root} is not a directory; give the folder your runs are in (recipe output.dir).")
    rows = refresh_index(root)
    if json_:
        typer.echo(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        _out().print(runs_table(rows))


def _key_values_table(title: str, mapping: dict[str, Any], header: tuple[str, str]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(header[0])
    table.add_column(header[1], overflow="fold")
    for key, value in flatten(mapping).items():
        table.add_row(key, ", ".join(map(fmt, value)) if isinstance(value, list) else fmt(value))
    return table


@app.command("show")
def show_cmd(
    run: Annotated[str, typer.Argument(help="run name (under --root) or run directory")],
    root: RootOption = Path("runs"),
) -> None:
    """Manifest summary, final metrics and where the report and plots are."""
    from tunelab.runs.report import build_run_report  # noqa: PLC0415

    run_dir = resolve_run(run, root)
    report = build_run_report(run_dir.path)
    console = _out()
    summary = {k: v for k, v in report["run"].items() if v is not None}
    console.print(_key_values_table(f"run {report['title']}", summary, ("field", "value")))
    metrics = {**report["final_eval"], **{f"last train {k}": v for k, v in report["final_train"].items()}}
    console.print(_key_values_table("final metrics", metrics, ("metric", "value")))
    evaluation = latest_eval(run_dir.path)
    if evaluation is not None:
        console.print(_eval_table(evaluation))
    for label, path in (("report", run_dir.path / REPORT_HTML), ("loss plot", run_dir.path / "loss.png")):
        where = str(path) if path.is_file() else f"{path} (missing)"
        console.print(f"{label}: {where}", highlight=False, soft_wrap=True)
    if evaluation is not None:
        console.print(
            f"eval report: {run_dir.path / EVAL_DIR / REPORT_HTML}", highlight=False, soft_wrap=True
        )


def latest_eval(run_path: Path) -> dict[str, Any] | None:
    """The payload ``tunelab eval`` (or the demo) last wrote for this run, if any."""
    path = run_path / EVAL_DIR / "report.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def _eval_table(payload: dict[str, Any]) -> Table:
    """The main metric per evaluated model, and the change with its CI when base and tuned were compared."""
    main = payload.get("main_metric")
    table = Table(title=f"last eval: {payload.get('title', '')}")
    table.add_column("model")
    table.add_column(str(main), justify="right")
    for model in payload.get("models") or []:
        table.add_row(f"{model['name']} ({model['role']})", fmt((model.get("metrics") or {}).get(main)))
    comp = payload.get("comparison")
    if comp:
        lo, hi = comp["ci95"]
        table.add_row(f"Δ (95% CI {fmt(lo)} … {fmt(hi)}, n={comp['n']})", fmt(comp["delta"]))
    return table


def recipe_differences(recipes: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Dotted recipe keys whose values are not the same in every recipe (absent counts as None)."""
    flats = [flatten(r) for r in recipes]
    keys = list(dict.fromkeys(k for flat in flats for k in flat))
    return {
        key: [flat.get(key) for flat in flats]
        for key in keys
        if any(flat.get(key) != flats[0].get(key) for flat in flats)
    }


def final_metrics(run: RunDir) -> dict[str, Any]:
    """Final evaluation metrics and the last training loss of a run."""
    metrics = dict(run.read_manifest().get("final_eval") or {})
    train_rows = split_metric_rows(run.read_metrics())[0]
    if train_rows and "loss" in train_rows[-1]:
        metrics["last train loss"] = train_rows[-1]["loss"]
    return metrics


def _side_by_side(title: str, names: list[str], rows: dict[str, list[Any]]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("field")
    for name in names:
        table.add_column(name, overflow="fold")
    for key, values in rows.items():
        table.add_row(key, *(fmt(v) for v in values))
    return table


@app.command("compare")
def compare_cmd(
    runs: Annotated[list[str], typer.Argument(help="two or more run names or directories")],
    root: RootOption = Path("runs"),
    out: Annotated[Path, typer.Option("--out", help="PNG of the runs' loss curves")] = Path(
        "runs_compare.png"
    ),
) -> None:
    """Recipe fields that differ, final metrics side by side, and one plot of all loss curves."""
    from tunelab.runs.plots import compare_loss_curves  # noqa: PLC0415  (matplotlib only here)

    if len(runs) < 2:
        _fail("compare needs two or more runs, e.g. `tunelab runs compare runs/a runs/b`.")
    dirs = [resolve_run(r, root) for r in runs]
    names = [d.name for d in dirs]
    console = _out()
    recipes = [d.read_recipe() if d.recipe_path.is_file() else {} for d in dirs]
    differences = recipe_differences(recipes)
    if differences:
        console.print(_side_by_side("recipe fields that differ", names, differences))
    else:
        console.print("recipes: identical")
    metrics = [final_metrics(d) for d in dirs]
    keys = list(dict.fromkeys(k for m in metrics for k in m))
    console.print(_side_by_side("final metrics", names, {k: [m.get(k) for m in metrics] for k in keys}))
    written = compare_loss_curves([(d.name, d.read_metrics()) for d in dirs], out)
    console.print(f"loss curves: {written}" if written else "loss curves: none logged", highlight=False)
