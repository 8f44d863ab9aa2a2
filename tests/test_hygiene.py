"""The test suite leaves the checkout as it found it, and training never writes outside its run dir.

The session-wide check itself is a pair of hooks in conftest.py (`pytest_sessionstart` records
`git status`, `pytest_sessionfinish` fails the session if it changed), because only a hook runs
after every test however the suite is selected or ordered. These tests prove those hooks work, and
pin the cause of the `mlflow.db` once committed at the repository root: an MLflow run left open
was ended by MLflow's own exit hook with the default tracking URI, i.e. ./mlflow.db.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repo_state import REPO, checkout_state, describe_change

PYTHON_PATH = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-C", str(root), "-c", "user.email=t@t", "-c", "user.name=t", *args],
        check=True,
        capture_output=True,
    )


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    (root / "kept.txt").write_text("one\n")
    _git(root, "add", "kept.txt")
    _git(root, "commit", "-q", "-m", "start")
    return root


def test_checkout_state_sees_new_changed_and_rewritten_files(repo: Path) -> None:
    clean = checkout_state(repo)
    assert clean == {}
    (repo / "mlflow.db").write_bytes(b"x")
    added = checkout_state(repo)
    assert added != clean and describe_change(clean, added) == "mlflow.db"
    (repo / "kept.txt").write_text("two\n")
    edited = checkout_state(repo)
    assert describe_change(added, edited) == "kept.txt"
    (repo / "kept.txt").write_text("three\n")  # same `git status` line, different content
    assert describe_change(edited, checkout_state(repo)) == "kept.txt"


def test_checkout_state_is_none_outside_a_git_checkout(tmp_path: Path) -> None:
    outside = tmp_path / "plain"
    outside.mkdir()
    env_free = subprocess.run(["git", "-C", str(outside), "rev-parse"], capture_output=True)
    if env_free.returncode == 0:
        pytest.skip("the temporary directory is itself inside a git checkout")
    assert checkout_state(outside) is None


@pytest.mark.slow
def test_a_session_that_writes_into_the_checkout_fails(repo: Path) -> None:
    """The real conftest hooks in a throwaway checkout: a test that drops a file fails the run."""
    tests = repo / "tests"
    tests.mkdir()
    for helper in ("conftest.py", "repo_state.py"):  # conftest imports repo_state
        (tests / helper).write_text((REPO / "tests" / helper).read_text())
    (tests / "test_litter.py").write_text(
        "from pathlib import Path\n\n"
        "def test_litters():\n"
        "    (Path(__file__).parents[1] / 'litter.db').write_text('x')\n"
    )
    _git(repo, "add", "tests")
    _git(repo, "commit", "-q", "-m", "tests")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=repo,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": PYTHON_PATH},
    )
    assert run.returncode == pytest.ExitCode.TESTS_FAILED, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert "the test session changed the checkout (git status): litter.db" in run.stdout


@pytest.mark.slow
def test_an_mlflow_run_left_open_is_ended_in_its_run_dir_not_in_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that exits with an MLflow run still open (a crash, a path that forgot to finish)."""
    pytest.importorskip("mlflow")
    cwd, run_dir = tmp_path / "cwd", tmp_path / "run"
    cwd.mkdir()
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from types import SimpleNamespace
        from accelerate.tracking import MLflowTracker
        from tunelab.train.tracking import Tracking

        accelerator = SimpleNamespace(
            is_main_process=True, trackers=[], log_with=[MLflowTracker("tunelab", run_name="open")]
        )
        tracking = Tracking.start(accelerator, Path({str(run_dir)!r}), {{"seed": 0}})
        assert [t.name for t in tracking.active] == ["mlflow"]
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": PYTHON_PATH, "MLFLOW_TRACKING_URI": ""},
    )
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in cwd.iterdir()) == [], "MLflow wrote into the working directory"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert _mlflow_statuses(run_dir) == ["FINISHED"]  # ended by tunelab's exit hook, in its own store


def test_a_run_failing_while_its_trainer_is_built_closes_its_mlflow_run(
    tiny_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data error while the trainer is built must leave no MLflow run open (MLflow's exit hook
    would end it in ./mlflow.db) and, as the run never started, no run directory either."""
    mlflow = pytest.importorskip("mlflow")
    import tunelab.train.loop as loop
    from tunelab.train.run import train

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("bad data")

    monkeypatch.setattr(loop, "run_preflight", refuse)
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(training__report_to='["mlflow"]')
    with pytest.raises(ValueError, match="bad data"):
        train(recipe)
    assert not (tmp_path / "runs" / "t-lora").exists()
    assert mlflow.active_run() is None  # nothing left for MLflow's exit hook to end in ./mlflow.db
    assert not (tmp_path / "mlflow.db").exists()


def _mlflow_statuses(run_dir: Path) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"file:{run_dir / 'mlruns'}")
    experiment = client.get_experiment_by_name("tunelab")
    return [run.info.status for run in client.search_runs([experiment.experiment_id])]
