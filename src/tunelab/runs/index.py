"""A SQLite index of the runs under one root, so ``tunelab runs ls`` stays fast with thousands of runs.

The run directories stay the truth; the index (``<root>/.tunelab-index.sqlite``) is a cache that can
be deleted at any time. A refresh stats every run's manifest, recipe and metrics file and re-reads
only the runs whose (mtime, size) changed, drops rows of deleted runs, and rebuilds from scratch if
the file is missing, unreadable or of another schema version.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from tunelab.runs.manifest import read_manifest
from tunelab.runs.rundir import RunDir, live_status
from tunelab.runs.summary import duration_seconds, key_metric, split_metric_rows

INDEX_FILE = ".tunelab-index.sqlite"
SCHEMA_VERSION = 1
_WATCHED = ("manifest.json", "recipe.yaml", "metrics.jsonl")
_COLUMNS = (
    "name",
    "path",
    "status",
    "method",
    "objective",
    "model",
    "key_metric",
    "key_value",
    "started",
    "duration_s",
    "signature",
)
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    name TEXT PRIMARY KEY, path TEXT NOT NULL, status TEXT, method TEXT, objective TEXT, model TEXT,
    key_metric TEXT, key_value REAL, started TEXT, duration_s REAL, signature TEXT NOT NULL
);
PRAGMA user_version = {SCHEMA_VERSION};
"""


@dataclass
class RunRow:
    """One run as listed: enough to choose which run to look at, no more."""

    name: str
    path: str
    status: str | None
    method: str | None
    objective: str | None
    model: str | None
    key_metric: str | None
    key_value: float | None
    started: str | None
    duration_s: float | None
    signature: str


def file_signature(run_path: Path) -> str:
    """(mtime_ns, size) of the files a row is built from; any change to them marks the row stale."""
    parts = []
    for name in _WATCHED:
        try:
            stat = (run_path / name).stat()
            parts.append(f"{stat.st_mtime_ns}:{stat.st_size}")
        except FileNotFoundError:
            parts.append("-")
    return "|".join(parts)


def read_run_row(run_path: Path, signature: str) -> RunRow:
    """Build a row from a run directory (the expensive part the index exists to avoid)."""
    manifest = read_manifest(run_path / "manifest.json")
    run = RunDir(run_path)
    recipe = _read_recipe(run.recipe_path)
    final_eval = manifest.get("final_eval") or {}
    last_train = {}
    if not final_eval:  # the listing needs the metrics file only when there is no final evaluation
        train_rows = split_metric_rows(run.read_metrics())[0]
        last_train = train_rows[-1] if train_rows else {}
    name, value = key_metric(final_eval, last_train)
    return RunRow(
        name=run_path.name,
        path=str(run_path.resolve()),
        status=manifest.get("status"),
        method=(recipe.get("method") or {}).get("name"),
        objective=(recipe.get("objective") or {}).get("name"),
        model=(recipe.get("model") or {}).get("name_or_path"),
        key_metric=name,
        key_value=value,
        started=manifest.get("started_at"),
        duration_s=duration_seconds(manifest.get("started_at"), manifest.get("ended_at")),
        signature=signature,
    )


def _read_recipe(path: Path) -> dict[str, Any]:
    """The saved recipe as a dict; a missing or unreadable one lists the run without method/objective."""
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return recipe if isinstance(recipe, dict) else {}


def find_run_dirs(root: Path) -> list[Path]:
    """Run directories directly under ``root``: visible children holding a ``manifest.json``."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if not p.name.startswith(".") and (p / "manifest.json").is_file())


@contextmanager
def _open_index(root: Path) -> Iterator[sqlite3.Connection]:
    """The index connection, created fresh if the file is missing, corrupt or of another schema version."""
    path = root / INDEX_FILE
    connection = _connect_checked(path)
    if connection is None:
        path.unlink(missing_ok=True)
        connection = sqlite3.connect(path)
        connection.executescript(_SCHEMA)
    with closing(connection):
        yield connection


def _connect_checked(path: Path) -> sqlite3.Connection | None:
    if not path.is_file():
        return None
    connection = sqlite3.connect(path)
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        columns = [row[1] for row in connection.execute("PRAGMA table_info(runs)")]
    except sqlite3.DatabaseError:  # "file is not a database", torn file, ...
        connection.close()
        return None
    if version != SCHEMA_VERSION or tuple(columns) != _COLUMNS:
        connection.close()
        return None
    return connection


def refresh_index(root: str | Path) -> list[RunRow]:
    """Bring the index of ``root`` up to date and return every run, newest first."""
    root = Path(root)
    runs = {p.name: p for p in find_run_dirs(root)}
    if not root.is_dir():
        return []
    with _open_index(root) as db:
        known = dict(db.execute("SELECT name, signature FROM runs"))
        gone = [name for name in known if name not in runs]
        fresh = []
        for name, path in runs.items():
            signature = file_signature(path)
            if known.get(name) != signature:
                row = _try_read_row(path, signature)
                if row is not None:
                    fresh.append(row)
        with db:
            db.executemany("DELETE FROM runs WHERE name = ?", [(name,) for name in gone])
            db.executemany(
                f"INSERT OR REPLACE INTO runs VALUES ({', '.join('?' * len(_COLUMNS))})",
                [tuple(asdict(row).values()) for row in fresh],
            )
        rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY started DESC, name").fetchall()
    return [_live(RunRow(*row)) for row in rows]


def _live(row: RunRow) -> RunRow:
    """The row with the status the run is in now: a lock is not a file the signature sees, so a run
    whose trainer was killed is corrected here on every listing, never cached as failed."""
    row.status = live_status(Path(row.path), row.status)[0]
    return row


def _try_read_row(path: Path, signature: str) -> RunRow | None:
    """A run whose manifest is being rewritten or is broken is skipped now and retried next refresh."""
    try:
        return read_run_row(path, signature)
    except (OSError, ValueError):
        return None
