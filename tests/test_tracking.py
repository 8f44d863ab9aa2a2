"""Experiment trackers: what TensorBoard, MLflow and W&B receive is exactly what metrics.jsonl holds,
everything stays in the run directory, and a broken tracker never stops training."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.tracking import GeneralTracker
from rich.console import Console

import tunelab.train.tracking as tracking_module
from tunelab.recipe import RecipeError, parse_recipe
from tunelab.train.tracking import Tracking, build_trackers, scoped_env


def _recipe(root: Path, name: str, report_to: list[str]):
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(6)]
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(data), "eval": str(data), "max_length": 64},
            "method": {"name": "lora"},
            "training": {
                "max_steps": 4,
                "batch_size": 3,
                "learning_rate": 1e-2,
                "warmup_steps": 0,
                "eval_every": 2,
                "report_to": report_to,
            },
            "output": {"dir": str(root / "runs"), "name": name},
        }
    )


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run reporting to TensorBoard and MLflow (shared: the assertions only read it)."""
    from tunelab.train.run import train

    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE")}
    run = train(_recipe(tmp_path_factory.mktemp("tracked"), "tracked", ["tensorboard", "mlflow"])).run_dir
    assert {k: os.environ.get(k) for k in before} == before, "tracker environment leaked"
    return run


def test_tensorboard_holds_exactly_the_logged_metrics(tracked_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracked_run / "tb" / "tunelab"))
    events.Reload()
    rows = _metrics(tracked_run)
    for key in ("loss", "lr", "eval_loss"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        expected = _series(rows, key)
        assert [s for s, _ in logged] == [s for s, _ in expected], key
        assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6), key
    assert len(_series(rows, "eval_loss")) == 2


def test_mlflow_holds_exactly_the_logged_metrics(tracked_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{tracked_run / 'mlruns'}")
    experiment = client.get_experiment_by_name("tunelab")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    assert float(run.data.params["training.learning_rate"]) == 1e-2
    rows = _metrics(tracked_run)
    for key in ("loss", "grad_norm", "eval_loss"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == _series(rows, key), key  # MLflow stores doubles: exact
    assert not Path("mlruns").exists(), "MLflow wrote outside the run directory"


def test_a_failed_run_closes_its_trackers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow would otherwise keep showing the run as RUNNING forever; the manifest says it failed."""
    from mlflow.tracking import MlflowClient

    from tunelab.train.run import train

    def stop(step: int, metrics: dict, last: bool) -> None:
        raise RuntimeError("stop here")

    recipe = _recipe(tmp_path, "failing", ["mlflow"])
    with pytest.raises(RuntimeError, match="stop here"):
        train(recipe, on_eval=stop)
    run_dir = tmp_path / "runs" / "failing"
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{run_dir / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.status == "FAILED"  # not RUNNING forever, and not FINISHED as if it had completed
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]


@pytest.mark.slow
def test_wandb_offline_run_is_written_in_the_run_dir(tmp_path: Path) -> None:
    from tunelab.train.run import train

    started = time.perf_counter()
    run = train(_recipe(tmp_path, "wb", ["wandb"])).run_dir
    print(f"wandb run took {time.perf_counter() - started:.1f}s")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("run-*.wandb")), "the offline run file is missing"
    assert os.environ.get("WANDB_MODE") is None or os.environ.get("WANDB_MODE") != "offline"


class RecordingTracker(GeneralTracker):
    name = "recorder"
    requires_logging_directory = False

    def __init__(self, fail_on: str | None = None) -> None:
        super().__init__()
        self.fail_on = fail_on
        self.rows: list[tuple[int | None, dict]] = []
        self.finished = False

    @property
    def tracker(self) -> object:
        return self

    def start(self) -> None:
        if self.fail_on == "start":
            raise ConnectionError("no route to host")

    def store_init_configuration(self, values: dict) -> None:
        self.config = values

    def log(self, values: dict, step: int | None = None, **kwargs: object) -> None:
        if self.fail_on == "log":
            raise OSError("quota exceeded")
        self.rows.append((step, values))

    def finish(self) -> None:
        self.finished = True


class BrokenTracker(RecordingTracker):
    name = "broken"


def test_a_failing_tracker_is_switched_off_with_a_warning_and_the_others_continue() -> None:
    good, bad_log, bad_start = RecordingTracker(), BrokenTracker("log"), BrokenTracker("start")
    # Tracking needs only these three attributes of an Accelerator; a real one would pin accelerate's
    # process-wide state (device, mixed precision) for the training tests that run after this one.
    accelerator = SimpleNamespace(is_main_process=True, log_with=[bad_start, bad_log, good], trackers=[])
    log = io.StringIO()
    tracking = Tracking.start(
        accelerator, Path("."), {"training": {"lr": 0.1, "targets": ["q"]}}, Console(file=log, width=300)
    )
    assert accelerator.trackers == [bad_log, good]
    assert good.config == {"training.lr": 0.1, "training.targets": "['q']"}
    tracking.log({"step": 1, "loss": 2.0, "note": "text is not a metric"})
    tracking.log({"step": 2, "loss": 1.5, "eval_loss": 1.7})
    tracking.finish()
    assert good.rows == [(1, {"loss": 2.0}), (2, {"loss": 1.5, "eval_loss": 1.7})]
    assert good.finished and not bad_log.finished
    warnings = log.getvalue()
    assert "tracker 'broken' failed to start (ConnectionError: no route to host)" in warnings
    assert "tracker 'broken' failed to log (OSError: quota exceeded)" in warnings
    assert warnings.count("tracker 'broken' failed to log") == 1, "a failed tracker is dropped, not retried"


def test_missing_tracker_package_is_a_named_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tracking_module, "find_spec", lambda name: None if name == "wandb" else object())
    log = io.StringIO()
    trackers = build_trackers(["tensorboard", "wandb"], tmp_path, Console(file=log, width=300))
    assert [t.name for t in trackers] == ["tensorboard"]
    assert "training.report_to: wandb is not installed" in log.getvalue()
    assert "tunelab[track]" in log.getvalue()


def test_scoped_env_restores_set_and_unset_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELAB_T_SET", "old")
    monkeypatch.delenv("TUNELAB_T_UNSET", raising=False)
    with scoped_env({"TUNELAB_T_SET": "new", "TUNELAB_T_UNSET": "x"}):
        assert os.environ["TUNELAB_T_SET"] == "new" and os.environ["TUNELAB_T_UNSET"] == "x"
    assert os.environ["TUNELAB_T_SET"] == "old" and "TUNELAB_T_UNSET" not in os.environ


def test_report_to_accepts_only_known_trackers(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="report_to"):
        _recipe(tmp_path, "bad", ["tensorbord"])
