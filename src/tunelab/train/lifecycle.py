"""One lifecycle for every run, offline (``engine``) or online (``rl``).

A run has two phases. *Setup* checks and prepares everything (data, pre-flight audit, model,
method, resume point); a new run whose setup fails leaves no directory behind, so the corrected
rerun needs no ``--overwrite`` (and a run it was to overwrite is put back). *Training* follows; whatever ends it, the manifest says how
(completed, failed with the error, interrupted) and the trackers are closed with that status, so
MLflow never shows a dead run as RUNNING. Only after success are the loss plot and the run report
written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from rich.console import Console

from tunelab.runs.plots import plot_loss_curves
from tunelab.runs.report import publish_run_report
from tunelab.runs.rundir import RunDir
from tunelab.train import distributed
from tunelab.train.tracking import Tracking, finish_open_trackers


@dataclass
class Outcome:
    """What a finished training phase reports to the manifest and to the caller."""

    steps: int
    losses: list[float]
    final_eval: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    data_summary: dict[str, Any] = field(default_factory=dict)


class Session(Protocol):
    """What the lifecycle needs of a set-up trainer (offline or online)."""

    tracking: Tracking
    console: Console


S = TypeVar("S", bound=Session)


def error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"[:2000]


def run_lifecycle(
    run: RunDir, *, setup: Callable[[], S], body: Callable[[S], Outcome], fresh: bool
) -> tuple[S, Outcome]:
    """Set up (``setup()``), train (``body(session)``), and record how it ended.

    ``fresh``: this call created ``run``, so a failed setup deletes it (nothing of value is in it
    yet); a resumed run's setup failure is recorded in its manifest instead.
    """
    run.set_status("running", world_size=distributed.world_size_from_env())
    try:
        session = setup()
    except BaseException as err:
        finish_open_trackers(run.path)  # trackers a failed setup may have started (never ./mlflow.db)
        if fresh:
            run.discard()  # and a run it was to --overwrite is put back
        else:
            _record_end(run, None, err)
        raise
    run.settle()  # only now is a run replaced with --overwrite deleted
    try:
        outcome = body(session)
    except BaseException as err:
        _record_end(run, session.tracking, err)
        raise
    writes = distributed.writes_files(run)
    if writes:
        plot_loss_curves(run.read_metrics(), run.path / "loss.png")
    run.set_status(
        "completed",
        steps=outcome.steps,
        data_summary=outcome.data_summary,
        final_eval=outcome.final_eval,
        stopped_early=outcome.stopped_early,
    )
    session.tracking.finish("completed")
    if writes:
        publish_run_report(run.path, session.console)
    return session, outcome


def _record_end(run: RunDir, tracking: Tracking | None, err: BaseException) -> None:
    """Manifest first (the record), then the trackers (views of it), as every metrics row is written."""
    if isinstance(err, KeyboardInterrupt):
        run.set_status("interrupted")
        status = "interrupted"
    else:
        run.set_status("failed", error=error_text(err))
        status = "failed"
    if tracking is not None:
        tracking.finish(status)
