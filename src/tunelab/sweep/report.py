"""What a sweep leaves behind: a table, results.csv/json, sweep.png, importances and best_recipe.yaml.

Written after every invocation (also after Ctrl-C), from the study alone, so the files always
describe every trial the study holds, including those of earlier, interrupted invocations.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from rich.console import Console
from rich.table import Table

from tunelab.console import styled
from tunelab.recipe import dump_yaml, parse_recipe
from tunelab.runs.atomic import atomic_write_json, atomic_write_text
from tunelab.runs.plots import pyplot, save_png
from tunelab.runs.summary import fmt
from tunelab.sweep.space import apply_values


@dataclass
class SweepReport:
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    importances: dict[str, float]
    importance_note: str | None = None
    files: dict[str, Path] = field(default_factory=dict)


def trial_rows(study: optuna.Study, metric: str, direction: str) -> list[dict[str, Any]]:
    """One row per trial in order; ``value`` is the final metric, or the last reported one if pruned."""
    rows, best = [], None
    for trial in study.trials:
        if trial.state == TrialState.WAITING:
            continue  # a queued grid point, not a trial yet
        value, step = trial.value, None
        if trial.state != TrialState.COMPLETE and trial.intermediate_values:
            step = max(trial.intermediate_values)  # where a pruned (or cut-off) trial stopped
            value = trial.intermediate_values[step]
        if trial.state == TrialState.COMPLETE and (best is None or _better(value, best, direction)):
            best = value
        rows.append(
            {
                "trial": trial.number,
                "state": trial_state(trial),
                "params": dict(trial.params),
                metric: value,
                "at_step": step,
                "best_so_far": best,
                "run_dir": trial.user_attrs.get("run_dir"),
                "error": trial.user_attrs.get("error"),
            }
        )
    return rows


def trial_state(trial: optuna.trial.FrozenTrial) -> str:
    """complete / pruned / failed (training raised) / interrupted (Ctrl-C or kill: not counted)."""
    if trial.state == TrialState.FAIL:
        return "failed" if "error" in trial.user_attrs else "interrupted"
    return trial.state.name.lower()


def _better(value: float, best: float, direction: str) -> bool:
    return value < best if direction == "minimize" else value > best


def param_importances(study: optuna.Study, seed: int) -> tuple[dict[str, float], str | None]:
    """fANOVA importances over completed trials, or an empty dict and the reason there are none."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, f"parameter importances need at least 2 completed trials (have {len(complete)})"
    if len({t.value for t in complete}) < 2:
        return {}, "parameter importances: every completed trial has the same metric value"
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    try:
        return dict(optuna.importance.get_param_importances(study, evaluator=evaluator)), None
    except (ValueError, RuntimeError) as err:
        return {}, f"parameter importances could not be computed: {err}"


def write_report(
    study: optuna.Study,
    space: dict[str, Any],
    base_raw: dict[str, Any],
    settings: Any,
    sweep_dir: Path,
    console: Console,
) -> SweepReport:
    rows = trial_rows(study, settings.metric, settings.direction)
    importances, note = param_importances(study, settings.seed)
    report = SweepReport(rows, _best_row(rows, study), importances, note)
    fields = list(space)
    report.files["results.csv"] = atomic_write_text(
        sweep_dir / "results.csv", _csv(rows, fields, settings.metric)
    )
    report.files["results.json"] = atomic_write_json(
        sweep_dir / "results.json",
        {
            "metric": settings.metric,
            "direction": settings.direction,
            "best": report.best,
            "importances": importances,
            "importance_note": note,
            "trials": rows,
        },
    )
    plot = plot_sweep(rows, settings.metric, sweep_dir / "sweep.png")
    if plot is not None:
        report.files["sweep.png"] = plot
    if report.best is not None:
        report.files["best_recipe.yaml"] = write_best_recipe(
            base_raw, report.best, sweep_dir, settings.metric
        )
    print_report(report, fields, settings.metric, console)
    return report


def _best_row(rows: list[dict[str, Any]], study: optuna.Study) -> dict[str, Any] | None:
    if not any(r["state"] == "complete" for r in rows):
        return None
    return next(r for r in rows if r["trial"] == study.best_trial.number)


def _csv(rows: list[dict[str, Any]], fields: list[str], metric: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "state", *fields, metric, "at_step", "best_so_far", "run_dir", "error"])
    for r in rows:
        params = [r["params"].get(f, "") for f in fields]
        writer.writerow(
            [
                r["trial"],
                r["state"],
                *params,
                r[metric],
                r["at_step"],
                r["best_so_far"],
                r["run_dir"],
                r["error"],
            ]
        )
    return buffer.getvalue()


def write_best_recipe(base_raw: dict[str, Any], best: dict[str, Any], sweep_dir: Path, metric: str) -> Path:
    """The best trial's resolved recipe, ready for `tunelab train`, under a name no trial uses."""
    raw = apply_values(base_raw, best["params"])
    raw["output"] = {**raw.get("output", {}), "name": f"{sweep_dir.name}-best"}
    recipe = parse_recipe(raw, source=f"best trial {best['trial']}")
    header = (
        f"# Best trial of sweep {sweep_dir.name}: trial {best['trial']} ({best['run_dir']}), "
        f"{metric} {best[metric]:.6g}.\n# Train it with: tunelab train {sweep_dir / 'best_recipe.yaml'}\n"
    )
    return atomic_write_text(sweep_dir / "best_recipe.yaml", header + dump_yaml(recipe))


def plot_sweep(rows: list[dict[str, Any]], metric: str, path: Path) -> Path | None:
    """Metric per trial (pruned trials at their last reported value) and the best so far."""
    points = [(r["trial"], r[metric], r["state"]) for r in rows if r[metric] is not None]
    if not points:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=110)
    for state, marker, colour in (("complete", "o", "tab:blue"), ("pruned", "x", "tab:gray")):
        chosen = [(t, v) for t, v, s in points if s == state]
        if chosen:
            ax.scatter(*zip(*chosen), marker=marker, color=colour, label=f"{state} trial", zorder=3)
    best = [(r["trial"], r["best_so_far"]) for r in rows if r["best_so_far"] is not None]
    if best:
        ax.step(*zip(*best), where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def print_report(report: SweepReport, fields: list[str], metric: str, console: Console) -> None:
    table = Table(title=f"sweep: {len(report.rows)} trial(s)")
    for column in ("trial", "state", *_headers(fields), metric):
        table.add_column(column, justify="left" if column == "state" else "right")
    best_trial = report.best["trial"] if report.best else None
    for r in report.rows:
        value = r[metric]
        shown = "" if value is None else f"{value:.4f}"
        if r["at_step"] is not None:
            shown += f" @{r['at_step']}"
        style = "bold green" if r["trial"] == best_trial else None
        params = [fmt(r["params"].get(f)) for f in fields]
        table.add_row(str(r["trial"]), r["state"], *params, shown, style=style)
    console.print(table)
    if report.best is not None:
        console.print(f"best: trial {report.best['trial']}, {metric} {report.best[metric]:.4f}")
    if report.importances:
        console.print(
            "importance: " + ", ".join(f"{k} {v:.2f}" for k, v in report.importances.items()),
            highlight=False,
        )
    elif report.importance_note:
        console.print(styled(report.importance_note, "dim"))
    for name, path in report.files.items():
        console.print(f"  {name}: {path}", highlight=False)


def _headers(fields: list[str]) -> list[str]:
    """Short column names (``learning_rate`` for ``training.learning_rate``) where they stay unique."""
    short = [f.split(".")[0] if f.endswith(".name") else f.rsplit(".", 1)[-1] for f in fields]
    return [s if short.count(s) == 1 else f for s, f in zip(short, fields)]
