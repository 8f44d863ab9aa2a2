"""Run directory layout, crash-safe writes and the manifest."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from tunelab.runs.atomic import (
    append_jsonl,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from tunelab.runs.manifest import build_manifest, file_sha256, git_info, update_manifest
from tunelab.runs.rundir import CHECKPOINT_MARKER, RunDir, RunExistsError


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def run(tmp_path: Path) -> RunDir:
    return RunDir.create(tmp_path / "runs", "exp1")


def _save_checkpoint(run: RunDir, step: int) -> Path:
    with run.writing_checkpoint(step, epoch=0) as tmp:
        (tmp / "adapter.safetensors").write_bytes(b"w" * step)
    return run.checkpoint_dir(step)


# --- atomic writes ---------------------------------------------------------------------------


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _names(target.parent) == ["file.txt"]


def test_atomic_write_json_roundtrips_and_writes_nothing_on_bad_object(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1, "b": [1.5, None]})
    assert json.loads(target.read_text()) == {"a": 1, "b": [1.5, None]}
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"a": 1, "b": [1.5, None]}
    assert _names(tmp_path) == ["m.json"]


def test_atomic_directory_publishes_on_success(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    with atomic_directory(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".")
        (tmp / "weights").write_bytes(b"new")
    assert (final / "weights").read_bytes() == b"new"
    assert _names(tmp_path) == ["ckpt"]


def test_atomic_directory_replaces_an_existing_dir_whole(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "stale").write_text("old only")
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_bytes(b"new")
    assert _names(final) == ["weights"]
    assert _names(tmp_path) == ["ckpt"]


def test_atomic_directory_keeps_old_content_if_the_block_raises(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "weights").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "weights").write_bytes(b"half")
        raise RuntimeError("killed mid-save")
    assert (final / "weights").read_bytes() == b"old"
    assert _names(tmp_path) == ["ckpt"]


def test_append_jsonl_starts_a_new_line_after_a_torn_one(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append_jsonl(path, {"step": 1})
    with open(path, "a") as f:
        f.write('{"step": 2, "lo')  # crash mid-write
    append_jsonl(path, {"step": 3})
    lines = path.read_text().splitlines()
    assert lines[0] == '{"step": 1}' and lines[-1] == '{"step": 3}'


# --- RunDir create / exists / overwrite / resume ---------------------------------------------


def test_create_new_run_lays_out_the_directory(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "exp1")
    assert run.path == tmp_path / "exp1"
    # a new run holds exactly an empty checkpoints/ (no lock file unless asked to lock)
    assert [p.name for p in run.path.iterdir()] == ["checkpoints"]
    assert list(run.checkpoints_dir.iterdir()) == []
    # every file of the documented layout sits directly in the run directory
    assert run.recipe_path == run.path / "recipe.yaml"
    assert run.manifest_path == run.path / "manifest.json"
    assert run.metrics_path == run.path / "metrics.jsonl"
    assert run.checkpoints_dir == run.path / "checkpoints"
    assert run.final_dir == run.path / "final"
    assert run.checkpoint_dir(3) == run.path / "checkpoints" / "step-3"
    run.write_recipe({"seed": 1})
    run.write_manifest({"status": "running"})
    run.log_metrics({"step": 1, "loss": 2.0})
    assert sorted(p.name for p in run.path.iterdir()) == [
        "checkpoints",
        "manifest.json",
        "metrics.jsonl",
        "recipe.yaml",
    ]
    locked = RunDir.create(tmp_path, "exp2", lock=True)
    try:
        assert sorted(p.name for p in locked.path.iterdir()) == [".lock", "checkpoints"]
    finally:
        locked.release()


def test_existing_run_without_flags_says_resume_or_overwrite(run: RunDir) -> None:
    run.write_recipe({"lr": 1e-4})
    with pytest.raises(RunExistsError, match="--resume.*--overwrite") as info:
        RunDir.create(run.path.parent, "exp1")
    assert isinstance(info.value, FileExistsError)
    assert info.value.path == run.path


def test_overwrite_replaces_the_old_run(run: RunDir) -> None:
    run.write_recipe({"lr": 1e-4})
    _save_checkpoint(run, 10)
    fresh = RunDir.create(run.path.parent, "exp1", overwrite=True)
    assert not fresh.recipe_path.exists()
    assert fresh.list_checkpoints() == []
    assert fresh.checkpoints_dir.is_dir()


def test_overwrite_can_keep_the_old_run_until_the_new_one_settles(run: RunDir) -> None:
    run.write_recipe({"lr": 1e-4})
    _save_checkpoint(run, 10)
    failed = RunDir.create(run.path.parent, "exp1", overwrite=True, lock=True, keep_replaced=True)
    assert failed.list_checkpoints() == []  # the new run starts empty
    failed.discard()  # its checks failed: the old run comes back whole
    assert run.read_recipe() == {"lr": 1e-4} and [s for s, _ in run.list_checkpoints()] == [10]
    fresh = RunDir.create(run.path.parent, "exp1", overwrite=True, lock=True, keep_replaced=True)
    fresh.settle()  # its checks passed: the old run is deleted
    fresh.release()
    assert sorted(p.name for p in run.path.parent.iterdir()) == ["exp1"]
    assert not fresh.recipe_path.exists() and fresh.list_checkpoints() == []


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    with pytest.raises(FileExistsError, match="does not look like a tunelab run"):
        RunDir.create(tmp_path, "precious", overwrite=True)
    assert (tmp_path / "precious" / "thesis.tex").exists()


def test_resume_reopens_an_existing_run(run: RunDir) -> None:
    run.write_recipe({"lr": 1e-4})
    _save_checkpoint(run, 5)
    again = RunDir.create(run.path.parent, "exp1", resume=True)
    assert again.read_recipe() == {"lr": 1e-4}
    assert again.latest_checkpoint() == run.checkpoint_dir(5)


def test_resume_of_a_missing_run_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot resume.*Drop --resume"):
        RunDir.create(tmp_path, "ghost", resume=True)


def test_resume_and_overwrite_together_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="only one"):
        RunDir.create(tmp_path, "x", resume=True, overwrite=True)


@pytest.mark.parametrize("name", ["", "..", "a/b", ".hidden"])
def test_run_names_cannot_escape_the_root(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="invalid run name"):
        RunDir.create(tmp_path, name)


# --- recipe, manifest, status ----------------------------------------------------------------


def test_recipe_is_yaml_in_key_order(run: RunDir) -> None:
    recipe = {"model": "tiny", "method": {"name": "lora", "r": 8}, "lr": 0.0002}
    run.write_recipe(recipe)
    assert run.read_recipe() == recipe
    assert list(yaml.safe_load(run.recipe_path.read_text())) == ["model", "method", "lr"]


def test_set_status_stamps_ended_at(run: RunDir) -> None:
    run.write_manifest({"run_name": "exp1", "status": "running", "ended_at": None})
    done = run.set_status("completed", final_loss=0.5)
    assert done["status"] == "completed" and done["ended_at"] and done["final_loss"] == 0.5
    assert run.read_manifest()["status"] == "completed"
    assert run.set_status("running")["ended_at"] is None
    with pytest.raises(ValueError, match="unknown run status"):
        run.set_status("exploded")


def test_manifest_has_data_sha256_versions_and_seed(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n' * 50)
    manifest = build_manifest(recipe={"lr": 1e-4}, data_files=[data], seed=1234, run_name="exp1")
    assert manifest["data"][0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert manifest["data"][0]["size"] == data.stat().st_size
    assert manifest["versions"]["torch"] == metadata.version("torch")
    assert manifest["versions"]["transformers"] == metadata.version("transformers")
    assert set(manifest["versions"]) >= {"python", "tunelab", "peft", "accelerate", "datasets"}
    assert (manifest["seed"], manifest["status"], manifest["run_name"]) == (1234, "running", "exp1")
    assert manifest["started_at"] and manifest["hardware"]["cpu_count"]
    assert "cuda_device_count" in manifest["hardware"] and "mps" in manifest["hardware"]
    json.dumps(manifest)


def test_manifest_hashes_a_data_directory(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "part-0.arrow").write_bytes(b"abc")
    first = build_manifest(recipe={}, data_files=[folder], seed=0, run_name="r")["data"][0]["sha256"]
    (folder / "part-0.arrow").write_bytes(b"abd")
    assert build_manifest(recipe={}, data_files=[folder], seed=0, run_name="r")["data"][0]["sha256"] != first


def test_git_info_is_none_outside_a_repo(tmp_path: Path) -> None:
    assert git_info(tmp_path) is None


def test_update_manifest_keeps_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    atomic_write_json(path, {"status": "running", "from_the_future": 1})
    update_manifest(path, status="failed", error="OOM")
    assert json.loads(path.read_text()) == {"status": "failed", "from_the_future": 1, "error": "OOM"}


def test_file_sha256_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(bytes(range(256)) * 10_000)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_roundtrip(run: RunDir) -> None:
    assert run.read_metrics() == []
    for step in (1, 2, 3):
        run.log_metrics({"step": step, "loss": 1.0 / step})
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]


def test_read_metrics_skips_a_torn_final_line(run: RunDir) -> None:
    run.log_metrics({"step": 1, "loss": 2.0})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 2, "lo')
    assert run.read_metrics() == [{"step": 1, "loss": 2.0}]


def test_truncate_metrics_after_drops_steps_past_the_checkpoint(run: RunDir) -> None:
    for step in range(1, 8):
        run.log_metrics({"step": step, "loss": float(step)})
    run.log_metrics({"event": "note"})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 8, "lo')
    assert run.truncate_metrics_after(4) == 3
    assert [r.get("step") for r in run.read_metrics()] == [1, 2, 3, 4, None]
    run.log_metrics({"step": 5, "loss": 5.0})
    assert [r.get("step") for r in run.read_metrics()] == [1, 2, 3, 4, None, 5]


# --- checkpoints -----------------------------------------------------------------------------


def test_checkpoint_has_marker_and_is_listed(run: RunDir) -> None:
    path = _save_checkpoint(run, 100)
    assert path == run.checkpoints_dir / "step-100"
    marker = json.loads((path / CHECKPOINT_MARKER).read_text())
    assert marker["step"] == 100 and marker["epoch"] == 0
    assert run.list_checkpoints() == [(100, path)]


def test_checkpoints_sort_numerically(run: RunDir) -> None:
    for step in (9, 100, 20):
        _save_checkpoint(run, step)
    assert [s for s, _ in run.list_checkpoints()] == [9, 20, 100]
    assert run.latest_checkpoint() == run.checkpoint_dir(100)


def test_incomplete_checkpoints_are_ignored(run: RunDir) -> None:
    assert run.latest_checkpoint() is None
    _save_checkpoint(run, 10)
    (run.checkpoint_dir(20)).mkdir()  # no marker: torn write by some other writer
    (run.checkpoint_dir(20) / "adapter.safetensors").write_bytes(b"half")
    (run.checkpoints_dir / ".step-30.abc123.tmp").mkdir()  # atomic_directory killed mid-write
    (run.checkpoints_dir / ".step-30.abc123.tmp" / CHECKPOINT_MARKER).write_text("{}")
    assert run.latest_checkpoint() == run.checkpoint_dir(10)


def test_a_failed_checkpoint_write_leaves_nothing(run: RunDir) -> None:
    with pytest.raises(KeyboardInterrupt), run.writing_checkpoint(5) as tmp:
        (tmp / "optimizer.pt").write_bytes(b"...")
        raise KeyboardInterrupt
    assert _names(run.checkpoints_dir) == []


def test_prune_keeps_the_last_n_and_clears_crash_leftovers(run: RunDir) -> None:
    for step in (10, 20, 30, 40):
        _save_checkpoint(run, step)
    run.checkpoint_dir(15).mkdir()
    (run.checkpoints_dir / ".step-50.dead.tmp").mkdir()
    removed = run.prune_checkpoints(keep_last=2)
    assert {p.name for p in removed} == {"step-10", "step-15", "step-20", ".step-50.dead.tmp"}
    assert [s for s, _ in run.list_checkpoints()] == [30, 40]
    assert _names(run.checkpoints_dir) == ["step-30", "step-40"]


def test_prune_leaves_a_newer_incomplete_checkpoint_alone(run: RunDir) -> None:
    _save_checkpoint(run, 10)
    run.checkpoint_dir(20).mkdir()
    run.prune_checkpoints(keep_last=1)
    assert _names(run.checkpoints_dir) == ["step-10", "step-20"]


_KILL_WRITER = """
import sys
from tunelab.runs.rundir import RunDir
run = RunDir.create(sys.argv[1], "r", resume=True)
step = 0
while True:
    step += 1
    with run.writing_checkpoint(step % 3) as tmp:  # reuse names so replacement is exercised too
        (tmp / "w.bin").write_bytes(bytes([step % 256]) * 2_000_000)
        (tmp / "opt.bin").write_bytes(bytes([step % 256]) * 500_000)
    run.log_metrics({"step": step})
"""


@pytest.mark.slow
def test_sigkill_never_leaves_a_torn_checkpoint(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, "r")
    for delay in (0.9, 1.05, 1.2, 1.35, 1.5):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_WRITER, str(tmp_path)])
        time.sleep(delay)
        proc.kill()
        proc.wait()
        for _, path in run.list_checkpoints():
            weights, optimizer = (path / "w.bin").read_bytes(), (path / "opt.bin").read_bytes()
            assert len(weights) == 2_000_000 and len(optimizer) == 500_000
            assert set(weights) == set(optimizer) and len(set(weights)) == 1
        run.read_metrics()
    assert run.list_checkpoints()
    run.prune_checkpoints(keep_last=1)
    assert len(_names(run.checkpoints_dir)) == 1
