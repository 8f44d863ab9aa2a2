"""Clean and split from the Data page: :func:`tunelab.data.clean.clean` and
:func:`tunelab.data.split.split` (what ``tunelab data clean`` and ``data split`` run, with their
default settings), writing into ``RUNS/data/`` under names that are free, so no file is ever replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CHANGES_SHOWN = 50  # rows of the changes log shown on the page; the file has them all


def _free(folder: Path, stem: str, suffix: str = "") -> Path:
    """``folder/stem+suffix``, or ``stem-2``, ``stem-3``... when taken."""
    path, k = folder / f"{stem}{suffix}", 1
    while path.exists():
        k += 1
        path = folder / f"{stem}-{k}{suffix}"
    return path


def _stem(path: str) -> str:
    stem = Path(path).stem or "data"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip(".-") or "data"


def clean_file(runs_dir: Path, path: str) -> dict[str, Any]:
    """Clean ``path`` into ``RUNS/data/STEM.clean.jsonl``: the summary and the first changed or dropped rows."""
    from tunelab.data.clean import clean

    folder = runs_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    summary = clean(path, _free(folder, f"{_stem(path)}.clean", ".jsonl"), skip_bad=True)
    changes = []
    with open(summary["changes"], encoding="utf-8") as f:
        for line in f:
            changes.append(json.loads(line))
            if len(changes) >= CHANGES_SHOWN:
                break
    return {"summary": summary, "changes": changes}


def split_file(runs_dir: Path, path: str, ratios: str) -> dict[str, Any]:
    """Split ``path`` into ``RUNS/data/STEM-split/`` (train/validation[/test].jsonl): the summary."""
    from tunelab.data.split import split

    folder = runs_dir / "data"
    folder.mkdir(parents=True, exist_ok=True)
    return {"split": split(path, _free(folder, f"{_stem(path)}-split"), ratios=ratios or "0.8,0.1,0.1")}
