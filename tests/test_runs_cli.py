"""`tunelab runs ls / show / compare` and the SQLite index behind `ls`."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tunelab.runs.index as index_module
from tunelab.cli import app
from tunelab.runs.index import INDEX_FILE, refresh_index
from tunelab.runs.summary import fmt

WIDE = {"COLUMNS": "240"}  # rich wraps tables to the terminal; CliRunner has none


def write_manifest(root: Path, name: str, **fields: object) -> Path:
    run = root / name
    run.mkdir(parents=True, exist_ok=True)
    manifest = {
        "run_name": name,
        "status": "completed",
        "started_at": "2025-01-01T00:00:00+00:00",
        "ended_at": "2025-01-01T00:01:40+00:00",
        "final_eval": {"eval_loss": 1.5},
        **fields,
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.fixture
def manifest_reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every manifest the index reads, in order (a spy; the index must not re-read fresh runs)."""
    reads: list[Path] = []
    real = index_module.read_manifest

    def spy(path: Path) -> dict:
        reads.append(Path(path))
        return real(path)

    monkeypatch.setattr(index_module, "read_manifest", spy)
    return reads


def test_ls_of_2000_runs_reads_manifests_once(tmp_path: Path, manifest_reads: list[Path]) -> None:
    root = tmp_path / "runs"
    for i in range(2000):
        write_manifest(root, f"run-{i:04d}", final_eval={"eval_loss": i / 1000})
    runner = CliRunner()
    first = runner.invoke(app, ["runs", "ls", str(root), "--json"])
    assert first.exit_code == 0, first.output
    assert len(manifest_reads) == 2000
    second = runner.invoke(app, ["runs", "ls", str(root), "--json"])
    assert second.exit_code == 0, second.output
    assert len(manifest_reads) == 2000, "the second ls must come from the index"
    rows = json.loads(second.output)
    assert len(rows) == 2000 and json.loads(first.output) == rows
    by_name = {r["name"]: r for r in rows}
    assert by_name["run-1234"]["key_metric"] == "eval_loss" and by_name["run-1234"]["key_value"] == 1.234
    assert by_name["run-0007"]["duration_s"] == 100.0


def test_index_is_rebuilt_when_its_file_is_deleted(tmp_path: Path, manifest_reads: list[Path]) -> None:
    root = tmp_path / "runs"
    write_manifest(root, "a")
    write_manifest(root, "b")
    refresh_index(root)
    (root / INDEX_FILE).unlink()
    rows = refresh_index(root)
    assert [r.name for r in rows] == ["a", "b"] and len(manifest_reads) == 4
    assert (root / INDEX_FILE).is_file()


@pytest.mark.parametrize("damage", ["garbage", "old_schema"])
def test_corrupt_or_foreign_index_is_rebuilt(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "runs"
    write_manifest(root, "a", status="failed")
    if damage == "garbage":
        (root / INDEX_FILE).write_bytes(b"this is not sqlite" * 100)
    else:
        with sqlite3.connect(root / INDEX_FILE) as db:
            db.execute("CREATE TABLE runs (name TEXT, status TEXT)")
            db.execute("INSERT INTO runs VALUES ('ghost', 'completed')")
    rows = refresh_index(root)
    assert [(r.name, r.status) for r in rows] == [("a", "failed")]


def test_stale_entry_is_updated_and_deleted_run_disappears(
    tmp_path: Path, manifest_reads: list[Path]
) -> None:
    from tunelab.runs.rundir import RunLock

    root = tmp_path / "runs"
    trainer = RunLock(write_manifest(root, "keep", status="running", final_eval={})).acquire()  # training
    gone = write_manifest(root, "gone")
    assert {r.name: r.status for r in refresh_index(root)} == {"keep": "running", "gone": "completed"}
    trainer.release()
    write_manifest(root, "keep", status="completed", final_eval={"eval_loss": 0.75})
    for file in gone.iterdir():
        file.unlink()
    gone.rmdir()
    manifest_reads.clear()
    rows = refresh_index(root)
    assert [(r.name, r.status, r.key_value) for r in rows] == [("keep", "completed", 0.75)]
    assert manifest_reads == [root / "keep" / "manifest.json"]


def test_runs_ls_table_and_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    write_manifest(root, "alpha", final_eval={"eval_loss": 0.123456})
    result = CliRunner().invoke(app, ["runs", "ls", str(root)], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "alpha" in result.output and f"eval_loss {fmt(0.123456)}" in result.output
    missing = CliRunner().invoke(app, ["runs", "ls", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a directory" in missing.output


@pytest.fixture
def two_runs(tiny_recipe) -> tuple[Path, Path]:
    """Two real tiny runs that differ only in learning rate (and name)."""
    from tunelab.train.run import train

    high = train(tiny_recipe(training__learning_rate=1e-2, training__max_steps=3, output__name="lr-high"))
    low = train(tiny_recipe(training__learning_rate=1e-3, training__max_steps=3, output__name="lr-low"))
    return high.run_dir, low.run_dir


def test_compare_and_show_on_two_real_runs(two_runs: tuple[Path, Path], tmp_path: Path) -> None:
    high, low = two_runs
    out_png = tmp_path / "cmp.png"
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["runs", "compare", "lr-high", str(low), "--root", str(high.parent), "--out", str(out_png)],
        env=WIDE,
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    lr_line = next(line for line in lines if "training.learning_rate" in line)
    assert lr_line.index(fmt(0.01)) < lr_line.index(fmt(0.001))
    assert any("output.name" in line for line in lines)
    assert not any("training.batch_size" in line for line in lines), "equal fields must not be listed"
    losses = [
        json.loads((run / "manifest.json").read_text())["final_eval"]["eval_loss"] for run in (high, low)
    ]
    assert losses[0] != losses[1]
    eval_line = next(line for line in lines if line.strip("│ ").startswith("eval_loss"))
    assert eval_line.index(fmt(losses[0])) < eval_line.index(fmt(losses[1]))
    assert out_png.is_file() and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    shown = runner.invoke(app, ["runs", "show", "lr-low", "--root", str(high.parent)], env=WIDE)
    assert shown.exit_code == 0, shown.output
    assert fmt(losses[1]) in shown.output and "completed" in shown.output
    assert str(low / "report.html") in shown.output and "(missing)" not in shown.output

    listed = json.loads(runner.invoke(app, ["runs", "ls", str(high.parent), "--json"]).output)
    assert {r["name"]: r["key_value"] for r in listed} == {"lr-high": losses[0], "lr-low": losses[1]}
    assert {r["method"] for r in listed} == {"lora"}


def test_show_unknown_run_names_both_places(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["runs", "show", "nope", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "nope" in result.output and "manifest.json" in result.output


def test_show_includes_the_runs_last_eval_with_its_ci(tmp_path: Path) -> None:
    run = write_manifest(tmp_path / "runs", "tuned")
    payload = {
        "kind": "eval",
        "title": "before vs after",
        "main_metric": "accuracy_loglik",
        "models": [
            {"name": "base-model", "role": "base", "metrics": {"accuracy_loglik": 0.6667}},
            {"name": "runs/tuned", "role": "tuned", "metrics": {"accuracy_loglik": 0.8433}},
        ],
        "comparison": {"metric": "accuracy_loglik", "delta": 0.1767, "ci95": [0.12, 0.2367], "n": 300},
    }
    (run / "eval").mkdir()
    (run / "eval" / "report.json").write_text(json.dumps(payload))
    shown = CliRunner().invoke(app, ["runs", "show", str(run)], env=WIDE)
    assert shown.exit_code == 0, shown.output
    rows = [line for line in shown.output.splitlines() if "base-model" in line or "Δ" in line]
    assert fmt(0.6667) in rows[0] and fmt(0.1767) in rows[1] and fmt(0.12) in rows[1] and "n=300" in rows[1]
    assert str(run / "eval" / "report.html") in shown.output
