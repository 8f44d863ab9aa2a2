"""The run directory: the only thing ``tunelab train`` hands to the stages after it.

Layout (see docs/architecture.md)::

    runs/<name>/
      recipe.yaml          fully resolved recipe
      manifest.json        versions, git sha, data sha256, seed, hardware, status
      metrics.jsonl        one JSON object per logged step/eval (rows carry ``step``)
      checkpoints/step-N/  written via atomic_directory, ``checkpoint.json`` marker last
      final/               the trained model or adapter
      .lock                held (flock) by the one process training the run; holds its PID

Everything is written atomically, so a kill at any instant leaves a directory that
``--resume`` can continue from the last complete checkpoint. One process at a time trains a run:
a second ``train --resume`` (or ``--overwrite``) of a run still training is refused, naming the
holder's PID. The lock is the kernel's (``flock``), so it ends with its process however that
process dies: a lock left by a killed run is simply taken over.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tunelab.runs.atomic import (
    OLD_SUFFIX,
    append_jsonl,
    atomic_directory,
    atomic_write_json,
    atomic_write_text,
    creating,
    hidden_sibling,
    remove_tree,
)
from tunelab.runs.manifest import read_manifest, update_manifest, utc_now

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not protected against a second process
    fcntl = None  # type: ignore[assignment]

CHECKPOINT_MARKER = "checkpoint.json"
LOCK_FILE = ".lock"
STATUSES = ("running", "completed", "failed", "interrupted")
DIED_UNRECORDED = "the training process ended without finishing (killed or crashed)"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class RunExistsError(FileExistsError):
    """A new run would clobber an existing one; the user must say which they meant."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"run directory {path} already exists. Pass --resume to continue it from its last "
            f"checkpoint, or --overwrite to delete it and start again."
        )


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""

    def __init__(self, path: Path, pid: int | None) -> None:
        self.path, self.pid = path, pid
        holder = f"PID {pid}" if pid else "a process whose PID is unknown"
        super().__init__(
            f"run directory {path} is in use by another tunelab process ({holder}); wait for it to "
            f"finish, or stop it{f' (kill {pid})' if pid else ''}, then try again."
        )


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock``, which holds the holder's PID for the error message."""

    def __init__(self, run_path: Path) -> None:
        self.path = run_path / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> RunLock:
        if fcntl is None or self._fd is not None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # held: EWOULDBLOCK (BlockingIOError)
            pid = _read_pid(fd)
            os.close(fd)
            raise RunLockedError(self.path.parent, pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock up (closing the descriptor releases the flock); safe to call twice."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_held(run_path: Path) -> bool:
    """Does a live process hold the run's lock (is it training)? Read-only: nothing in the run changes.
    Where there is no flock (Windows) every run counts as held: its manifest is taken at its word."""
    if fcntl is None:
        return True
    try:
        fd = os.open(run_path / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no process ever trained it, or it is not a run
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def live_status(run_path: Path, status: str | None) -> tuple[str | None, str]:
    """The status a run is in now, and why when the manifest cannot say it: a manifest that says
    ``running`` is believed only while a process holds the run's lock. The kernel frees the lock
    when the trainer dies however it dies (SIGKILL, OOM killer, power), so a run whose trainer died
    without recording it reads ``failed`` at once. Every reader of a run's state (``runs ls/show``,
    the studio, the report) asks this one function."""
    if status == "running" and not lock_held(run_path):
        return "failed", DIED_UNRECORDED
    return status, ""


def check_resumable(path: Path) -> None:
    """``--resume PATH`` must name a run directory that ``tunelab train`` wrote (it holds the saved
    recipe), checked before anything is written into PATH; FileNotFoundError saying what PATH is instead."""
    if not path.exists():
        raise FileNotFoundError(
            f"cannot resume: no run directory at {path}. Drop --resume to start a new run."
        )
    if not path.is_dir():
        raise FileNotFoundError(
            f"cannot resume {path}: it is a file; --resume takes a run directory (runs/<name>)"
        )
    if not (path / "recipe.yaml").is_file():
        raise FileNotFoundError(
            f"cannot resume {path}: it is not a tunelab run directory (no recipe.yaml in it); --resume takes "
            "the runs/<name> folder that `tunelab train` wrote (`tunelab runs ls` lists them)"
        )


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip()
    return int(text) if text.isdigit() else None


class RunDir:
    """Paths and crash-safe writers for one run directory."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._lock = RunLock(self._path)
        self._replaced: Path | None = None  # an overwritten run kept aside until settle()

    def __repr__(self) -> str:
        return f"RunDir({str(self._path)!r})"

    @classmethod
    def create(
        cls,
        root: str | Path,
        name: str,
        *,
        overwrite: bool = False,
        resume: bool = False,
        lock: bool = False,
        keep_replaced: bool = False,
    ) -> RunDir:
        """Create (or, with ``resume``, reopen) ``root/name``; refuses to silently reuse a run.

        ``lock``: take the run's lock for this process (released by :meth:`release`); a run another
        process is training is then neither resumed nor overwritten (:class:`RunLockedError`).
        ``keep_replaced``: an overwritten run is only moved aside, deleted by :meth:`settle` once the
        new run has passed its checks, and put back by :meth:`discard` if it has not.
        """
        _check_name(name)
        if overwrite and resume:
            raise ValueError("--overwrite and --resume contradict each other; pass only one.")
        path = Path(root) / name
        if path.exists() and not path.is_dir():
            raise FileExistsError(
                f"{path} is a file, not a run directory; "
                + ("--resume takes a run directory (runs/<name>)" if resume else "pick another run name")
            )
        exists = path.is_dir() and any(path.iterdir())
        if resume and not exists:
            raise FileNotFoundError(
                f"cannot resume: no run directory at {path}. Drop --resume to start a new run."
            )
        if exists and not (resume or overwrite):
            raise RunExistsError(path)
        replaced = None
        if exists and overwrite:
            _check_looks_like_run(path)
            old = RunLock(path).acquire() if lock else None  # never delete a run that is training
            if keep_replaced:
                replaced = hidden_sibling(path, OLD_SUFFIX)
                os.replace(path, replaced)
            else:
                remove_tree(path)
            if old is not None:
                old.release()
        run = cls(path)
        run._replaced = replaced
        with creating(run.path):
            run.path.mkdir(parents=True, exist_ok=True)
        if lock:
            run._lock.acquire()
        run.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        return run

    def release(self) -> None:
        """Release this process's lock on the run (end of training); safe to call twice."""
        self._lock.release()

    def discard(self) -> None:
        """Delete the run directory (a new run whose setup failed), put back the run it was to
        replace, if any, then release the lock."""
        remove_tree(self._path)
        if self._replaced is not None:
            os.replace(self._replaced, self._path)
            self._replaced = None
        self.release()

    def settle(self) -> None:
        """The new run passed its checks: delete the run it replaces (``keep_replaced``), if any."""
        if self._replaced is not None:
            shutil.rmtree(self._replaced, ignore_errors=True)
            self._replaced = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def name(self) -> str:
        return self._path.name

    @property
    def recipe_path(self) -> Path:
        return self._path / "recipe.yaml"

    @property
    def manifest_path(self) -> Path:
        return self._path / "manifest.json"

    @property
    def metrics_path(self) -> Path:
        return self._path / "metrics.jsonl"

    @property
    def checkpoints_dir(self) -> Path:
        return self._path / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self._path / "final"

    def write_recipe(self, recipe: dict[str, Any]) -> Path:
        """Store the fully resolved recipe as YAML, in the user's key order."""
        text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
        return atomic_write_text(self.recipe_path, text)

    def read_recipe(self) -> dict[str, Any]:
        return yaml.safe_load(self.recipe_path.read_text(encoding="utf-8")) or {}

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        return atomic_write_json(self.manifest_path, manifest)

    def read_manifest(self) -> dict[str, Any]:
        return read_manifest(self.manifest_path)

    def set_status(self, status: str, **extra: Any) -> dict[str, Any]:
        """Record the run's state; a terminal state stamps ``ended_at``, ``running`` clears it."""
        if status not in STATUSES:
            raise ValueError(f"unknown run status {status!r}; expected one of {', '.join(STATUSES)}.")
        ended_at = None if status == "running" else utc_now()
        return update_manifest(self.manifest_path, status=status, ended_at=ended_at, **extra)

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one metrics row; durable before returning, so a crash loses at most this row."""
        append_jsonl(self.metrics_path, row)

    def read_metrics(self) -> list[dict[str, Any]]:
        """All metrics rows; a torn last line (crash mid-write) is skipped silently, others warn."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
        rows = []
        for number, line in enumerate(lines, start=1):
            row = _parse_row(line)
            if row is not None:
                rows.append(row)
            elif line.strip() and number < len(lines):
                warnings.warn(f"{self.metrics_path}:{number}: skipping unreadable metrics line", stacklevel=2)
        return rows

    def truncate_metrics_after(self, step: int) -> int:
        """Drop rows logged after ``step`` (the checkpoint resumed from); returns how many were dropped.

        Without this, a resumed run would log steps N+1.. a second time and every curve would
        zig-zag. Rows without a ``step`` key are kept.
        """
        rows = self.read_metrics()
        kept = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= step]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
        atomic_write_text(self.metrics_path, text)
        return len(rows) - len(kept)

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"step-{step}"

    @contextmanager
    def writing_checkpoint(self, step: int, **meta: Any) -> Iterator[Path]:
        """Yield a temp dir to fill; on success the marker is written last and the dir published.

        Use this instead of writing into :meth:`checkpoint_dir` directly, so that a kill leaves
        either no ``step-N`` or a complete one.
        """
        with atomic_directory(self.checkpoint_dir(step)) as tmp:
            yield tmp
            atomic_write_json(tmp / CHECKPOINT_MARKER, {"step": step, "saved_at": utc_now(), **meta})

    def list_checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first; temp dirs and dirs without the marker are ignored."""
        return [(s, p) for s, p in self._step_dirs() if (p / CHECKPOINT_MARKER).is_file()]

    def latest_checkpoint(self) -> Path | None:
        checkpoints = self.list_checkpoints()
        return checkpoints[-1][1] if checkpoints else None

    def prune_checkpoints(self, keep_last: int) -> list[Path]:
        """Delete all but the newest ``keep_last`` complete checkpoints, plus leftovers of crashes.

        Leftovers are incomplete ``step-N`` dirs older than the newest kept checkpoint and hidden
        temp dirs; call this only when no checkpoint is being written.
        """
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}.")
        complete = self.list_checkpoints()
        kept = complete[len(complete) - keep_last :] if keep_last else []
        newest_kept = kept[-1][0] if kept else None
        kept_paths = {p for _, p in kept}
        doomed = [
            p
            for s, p in self._step_dirs()
            if p not in kept_paths and (newest_kept is None or s < newest_kept)
        ]
        doomed += self._stale_temp_dirs()
        for path in doomed:
            remove_tree(path)
        return doomed

    def _step_dirs(self) -> list[tuple[int, Path]]:
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for child in self.checkpoints_dir.iterdir():
            match = _STEP_DIR.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), child))
        return sorted(found)

    def _stale_temp_dirs(self) -> list[Path]:
        if not self.checkpoints_dir.is_dir():
            return []
        return [p for p in self.checkpoints_dir.iterdir() if p.name.startswith(".step-") and p.is_dir()]


def _parse_row(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def _check_name(name: str) -> None:
    """Run names become directory names; reject anything that could escape ``root``."""
    if not name or name in {".", ".."} or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise ValueError(
            f"invalid run name {name!r}: it must be a single directory name, not starting with '.'."
        )


def _check_looks_like_run(path: Path) -> None:
    """Guard --overwrite against deleting a directory that is not a tunelab run."""
    if not path.is_dir() or not any(
        (path / f).exists() for f in ("manifest.json", "recipe.yaml", "checkpoints")
    ):
        raise FileExistsError(
            f"{path} exists but does not look like a tunelab run directory (no manifest.json, "
            f"recipe.yaml or checkpoints/); refusing to delete it with --overwrite. Remove it yourself "
            f"or pick another run name."
        )
