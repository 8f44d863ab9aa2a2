"""Training runs the studio starts: separate processes running the CLI, their state read from disk.

A run is ``python -m tunelab train RECIPE`` (or ``--resume``) in its own session, so it outlives the
studio; its output goes to ``RUNS/.studio/NAME.log`` and its PID to ``RUNS/.studio/NAME.json``. The
state shown is the run directory's: the manifest's status, corrected by the run's lock, which the
kernel frees when the trainer dies however it dies, so a killed run reads as failed at once even
though it could not write that itself. Nothing is kept in memory that a restart would lose.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tunelab.runs.manifest import read_manifest
from tunelab.runs.rundir import live_status, lock_held  # noqa: F401  (lock_held: the studio's tests ask it)

STUDIO_DIR = ".studio"  # hidden, so the runs index never takes it for a run
TERMINAL = ("completed", "failed", "interrupted")
LOG_TAIL = 40


@dataclass
class RunState:
    """What the Train page shows: ``status`` (starting, running, completed, failed, interrupted) and why."""

    status: str
    reason: str = ""

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL


def log_path(runs_dir: Path, name: str) -> Path:
    return runs_dir / STUDIO_DIR / f"{name}.log"


def _job_path(runs_dir: Path, name: str) -> Path:
    return runs_dir / STUDIO_DIR / f"{name}.json"


def free_name(runs_dir: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``...: a name neither a run nor a started job has taken."""
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip(".-") or "run"
    name, k = stem, 1
    while (runs_dir / name).exists() or _job_path(runs_dir, name).exists():
        k += 1
        name = f"{stem}-{k}"
    return name


def start(runs_dir: Path, name: str, args: list[str]) -> subprocess.Popen:
    """Start ``tunelab ARGS`` in its own session, logging to the run's log; record its PID."""
    log_path(runs_dir, name).parent.mkdir(parents=True, exist_ok=True)  # eval jobs: .studio/eval/
    command = [sys.executable, "-m", "tunelab", *args]
    with open(log_path(runs_dir, name), "ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    job = {"name": name, "pid": process.pid, "command": command}
    _job_path(runs_dir, name).write_text(json.dumps(job), encoding="utf-8")
    return process


def train_args(recipe: Path, runs_dir: Path, name: str) -> list[str]:
    """``train RECIPE`` with its run placed in the studio's runs dir under ``name``."""
    return ["train", str(recipe), "--set", f"output.dir={runs_dir}", "--set", f"output.name={name}"]


def read_job(runs_dir: Path, name: str) -> dict | None:
    try:
        return json.loads(_job_path(runs_dir, name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def alive(pid: int, processes: dict[int, subprocess.Popen]) -> bool:
    """Is ``pid`` running? A child of this studio is polled (which also reaps it, so it is not a zombie)."""
    if pid in processes:
        return processes[pid].poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_started(runs_dir: Path, name: str) -> float | None:
    """When the job was started (its record's mtime), to tell a fresh result from an older one."""
    try:
        return _job_path(runs_dir, name).stat().st_mtime
    except OSError:
        return None


def run_state(runs_dir: Path, name: str, processes: dict[int, subprocess.Popen] | None = None) -> RunState:
    """The run's state from disk: its manifest, its lock, and the process the studio started."""
    processes = processes if processes is not None else {}
    manifest_path = runs_dir / name / "manifest.json"
    if manifest_path.is_file():
        manifest = read_manifest(manifest_path)
        status, died = live_status(runs_dir / name, manifest.get("status") or "running")
        return RunState(status, died or str(manifest.get("error") or ""))
    job = read_job(runs_dir, name)
    if job is None:
        return RunState("failed", f"no run named {name} in {runs_dir}")
    if alive(int(job["pid"]), processes):
        return RunState("starting", "checking the recipe and data, loading the model")
    last = next((line for line in reversed(log_tail(runs_dir, name)) if line.strip()), "")
    return RunState("failed", last or "the training process exited before the run started")


def log_tail(runs_dir: Path, name: str, lines: int = LOG_TAIL) -> list[str]:
    """The last ``lines`` lines of the run's log (read from the end: a long log costs nothing)."""
    try:
        with open(log_path(runs_dir, name), "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def stop(runs_dir: Path, name: str) -> bool:
    """Interrupt the run as Ctrl-C would (it records ``interrupted`` and can be resumed)."""
    job = read_job(runs_dir, name)
    if job is None:
        return False
    try:
        os.kill(int(job["pid"]), signal.SIGINT)
    except ProcessLookupError:
        return False
    return True
