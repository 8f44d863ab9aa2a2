"""A run killed with SIGKILL and resumed produces the same per-step losses as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tunelab.recipe import load_recipe
from tunelab.train.run import train


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert len(losses) == sum("loss" in r for r in rows), "a step was logged twice"
    return losses


def _recipe(tmp_path: Path, qa_rows: list[dict], name: str) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows * 4))
    recipe = {
        "seed": 3,
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data), "eval": str(data), "max_length": 64},
        "method": {"name": "lora", "r": 4, "dropout": 0.1},  # dropout: RNG state must be restored too
        "training": {
            "epochs": 6,
            "batch_size": 4,
            "learning_rate": 5e-3,
            "eval_every": 4,
            "save_every": 4,
            "lr_scheduler": "cosine",
            "warmup_steps": 2,
        },
        "output": {"dir": str(tmp_path / "runs"), "name": name},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _kill_after_first_checkpoint(cmd: list[str], run: Path, timeout: float = 120.0) -> None:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if list(run.glob("checkpoints/step-*/checkpoint.json")):
                os.kill(proc.pid, signal.SIGKILL)
                break
            if proc.poll() is not None:
                raise AssertionError(
                    f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
                )
            time.sleep(0.005)
        else:
            raise AssertionError("no checkpoint appeared in time")
    finally:
        proc.wait()


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, qa_rows):
    reference = train(load_recipe(_recipe(tmp_path, qa_rows, "reference")))
    expected = _losses(reference.run_dir)

    run = tmp_path / "runs" / "killed"
    cmd = [sys.executable, "-m", "tunelab", "train", str(_recipe(tmp_path, qa_rows, "killed"))]
    _kill_after_first_checkpoint(cmd, run)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "running" and not (run / "final").exists(), "the run was not killed mid-way"

    done = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", "--resume", str(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    resumed = _losses(run)
    assert sorted(resumed) == sorted(expected)
    for step, loss in expected.items():
        assert abs(resumed[step] - loss) < 1e-6, (step, resumed[step], loss)
    assert json.loads((run / "manifest.json").read_text())["status"] == "completed"
