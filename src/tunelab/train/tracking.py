"""Experiment trackers (``training.report_to``): TensorBoard, MLflow and W&B through accelerate.

Everything stays inside the run directory and offline: TensorBoard events under ``<run>/tb/``, an
MLflow file store at ``<run>/mlruns``, and W&B in offline mode under ``<run>/wandb/`` (sync it later
with ``wandb sync``). ``metrics.jsonl`` remains the record; trackers are views for people who live
in those tools.

Trackers are accelerate's own classes, handed to the ``Accelerator`` as ``log_with``. They are
started and called one by one (rather than through ``init_trackers``/``log``, which stop at the
first error) so that one broken tracker is switched off with a warning naming it while training
and the other trackers carry on. Environment variables a tracker reads (``MLFLOW_TRACKING_URI``,
``WANDB_MODE``) are set only around each call to it and restored after, so nothing leaks into the
rest of the process.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.console import labelled, make_console
from tunelab.runs.report import flatten, is_number

TRACKERS = ("tensorboard", "mlflow", "wandb")
PROJECT = "tunelab"
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}
_INSTALL_HINT = "pip install 'tunelab[track]'"
# How a run that did not complete ends in MLflow (accelerate's finish() always says FINISHED).
_MLFLOW_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def tracker_env(name: str, run_path: Path) -> dict[str, str]:
    """Environment a tracker needs while it runs: where MLflow stores, W&B offline."""
    if name == "mlflow":
        # MLflow 3 keeps the file store working but opt-in; it needs no server or database package.
        return {
            "MLFLOW_TRACKING_URI": f"file:{(run_path / 'mlruns').resolve()}",
            "MLFLOW_ALLOW_FILE_STORE": "true",
        }
    if name == "wandb":
        return {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return {}


@contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of a block, then restore them exactly."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def _make_tracker(name: str, run_path: Path) -> Any:
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker  # noqa: PLC0415

    if name == "tensorboard":
        return TensorBoardTracker(PROJECT, run_path / "tb")
    if name == "mlflow":
        return MLflowTracker(experiment_name=PROJECT, run_name=run_path.name)
    return WandBTracker(PROJECT, name=run_path.name, dir=str(run_path), mode="offline")


def build_trackers(report_to: list[str], run_path: Path | None, console: Console | None = None) -> list[Any]:
    """accelerate tracker objects for ``training.report_to`` (not started); missing packages are
    skipped with a warning that says what to install."""
    if not report_to or run_path is None:
        return []
    console = console or make_console(stderr=True)
    trackers = []
    for name in dict.fromkeys(report_to):
        if find_spec(_PACKAGES[name]) is None:
            console.print(
                labelled(
                    "warning",
                    f"training.report_to: {name} is not installed, so this run does not report to it. "
                    f"Install it with `{_INSTALL_HINT}` (or drop {name!r}).",
                )
            )
            continue
        trackers.append(_make_tracker(name, run_path))
    return trackers


def accelerator_options(report_to: list[str], run_path: Path | None, console: Console | None = None) -> dict:
    """Keyword arguments for ``Accelerator(...)``: the trackers and a project dir in the run directory."""
    trackers = build_trackers(report_to, run_path, console)
    if not trackers:
        return {}
    from accelerate.utils import ProjectConfiguration  # noqa: PLC0415

    return {
        "log_with": trackers,
        "project_config": ProjectConfiguration(project_dir=str(run_path), logging_dir=str(run_path)),
    }


# Runs whose trackers were started and not yet finished, by run directory. A run that fails before
# (or while) its trainer exists must still close them: MLflow's own exit hook would otherwise end the
# open run with the default tracking URI and create ./mlflow.db in whatever directory tunelab ran in.
_OPEN: dict[Path, Tracking] = {}


def finish_open_trackers(run_path: Path | None = None) -> None:
    """Finish the still-open trackers of one run (or of every run, at interpreter exit)."""
    for path in [p for p in _OPEN if run_path is None or p == Path(run_path)]:
        _OPEN[path].finish()


class Tracking:
    """The started trackers of one run; every call is isolated, so a tracker failure never stops training."""

    def __init__(self, accelerator: Any, run_path: Path, console: Console | None = None) -> None:
        self.accelerator = accelerator
        self.run_path = run_path
        self.console = console or make_console(stderr=True)

    @classmethod
    def start(
        cls, accelerator: Any, run_path: Path, config: dict[str, Any], console: Console | None = None
    ) -> Tracking:
        """Start each tracker handed to the accelerator (main process only) and store the recipe."""
        tracking = cls(accelerator, Path(run_path), console)
        if not accelerator.is_main_process:
            return tracking
        params = tracker_params(config)
        for tracker in getattr(accelerator, "log_with", None) or []:
            if not hasattr(tracker, "start"):
                continue
            started = tracking._call(tracker, "start", tracker.start) and tracking._call(
                tracker, "store the recipe", lambda t=tracker: t.store_init_configuration(params)
            )
            if started:
                accelerator.trackers.append(tracker)
        if tracking.active:
            _OPEN[tracking.run_path] = tracking
            # Registered after the trackers imported their packages, so it runs before their own exit
            # hooks (atexit is last in, first out); registering the same function again is harmless.
            atexit.unregister(finish_open_trackers)
            atexit.register(finish_open_trackers)
        return tracking

    @property
    def active(self) -> list[Any]:
        return list(self.accelerator.trackers)

    def log(self, row: dict[str, Any]) -> None:
        """Send one metrics row (numbers only) at its step to every live tracker."""
        if not self.accelerator.trackers:
            return
        values = {k: v for k, v in row.items() if is_number(v) and k != "step"}
        step = row.get("step")
        for tracker in self.active:
            self._call(tracker, "log", lambda t=tracker: t.log(values, step=step))

    def finish(self, status: str = "completed") -> None:
        """Flush and close every tracker with the run's final ``status`` (completed, failed or
        interrupted, as in the manifest); safe to call twice."""
        for tracker in self.active:
            self._call(tracker, "finish", lambda t=tracker: _finish(t, status))
        self.accelerator.trackers.clear()
        if _OPEN.get(self.run_path) is self:
            del _OPEN[self.run_path]

    def _call(self, tracker: Any, what: str, call: Callable[[], Any]) -> bool:
        """Run one tracker call in its environment; on error warn naming it and switch it off."""
        try:
            with scoped_env(tracker_env(tracker.name, self.run_path)):
                call()
        except Exception as err:  # noqa: BLE001  (any tracker bug must not end the run)
            self.console.print(
                labelled(
                    "warning",
                    f"tracker {tracker.name!r} failed to {what} ({type(err).__name__}: {err}); "
                    "training continues without it, metrics.jsonl is complete.",
                )
            )
            if tracker in self.accelerator.trackers:
                self.accelerator.trackers.remove(tracker)
            return False
        return True


def _finish(tracker: Any, status: str) -> None:
    """accelerate's ``finish()``, except that MLflow and W&B learn that a run did not complete."""
    if status != "completed" and tracker.name == "mlflow":
        import mlflow  # noqa: PLC0415  (only when the tracker exists, so it is installed)

        mlflow.end_run(status=_MLFLOW_STATUS[status])
        return
    if status != "completed" and tracker.name == "wandb":
        tracker.run.finish(exit_code=1)
        return
    tracker.finish()


def tracker_params(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe as flat hyperparameters every tracker accepts (scalars; lists and None as text)."""
    flat = flatten(config)
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}
