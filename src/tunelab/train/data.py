"""From data files to encoded features, with every dropped row accounted for.

Rows that cannot be used (bad lines with ``skip_bad``, examples whose loss tokens were all cut by
truncation) are counted and written with their reason; nothing disappears silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.canonical import read_canonical
from tunelab.data.loaders import DataError, iter_records
from tunelab.objectives.base import Dropped, Objective
from tunelab.runs.atomic import append_jsonl


@dataclass
class PreparedSplit:
    """Encoded features of one data file and what happened to every row."""

    path: str
    features: list[dict[str, Any]]
    rows_read: int = 0
    rows_rejected: int = 0
    dropped: list[Dropped] = field(default_factory=list)
    truncated: int = 0
    format: str = ""
    rows_used: int = 0
    unused_columns: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "rows_read": self.rows_read,
            "rows_rejected_malformed": self.rows_rejected,
            "examples_dropped": len(self.dropped),
            "examples_truncated": self.truncated,
            "rows_used": self.rows_used,
            "examples_used": len(self.features),
            "unused_columns": self.unused_columns,
        }


def prepare_split(
    path: str,
    objective: Objective,
    data_cfg: Any,
    *,
    dropped_path: Path | None = None,
    rejects_path: Path | None = None,
) -> PreparedSplit:
    """Read, canonicalise and encode one file for ``objective``."""
    rows, report, fmt = read_canonical(
        path, data_cfg.format, data_cfg.columns, skip_bad=data_cfg.skip_bad, rejects_path=rejects_path
    )
    split = PreparedSplit(
        path=path,
        features=[],
        rows_read=report.rows_read,
        rows_rejected=report.rows_rejected,
        format=fmt,
        unused_columns=dict(report.unused_columns),
    )
    for row, example in rows:
        encoded = objective.encode(row, example)
        if isinstance(encoded, Dropped):
            split.dropped.append(encoded)
            if dropped_path is not None:
                append_jsonl(dropped_path, {"file": path, "row": encoded.row, "reason": encoded.reason})
            continue
        # A row may give several sequences (one per assistant turn when the template rewrites
        # earlier turns; see templates.encode_conversation).
        split.rows_used += 1
        for feature in encoded if isinstance(encoded, list) else [encoded]:
            split.truncated += bool(feature.pop("truncated", False))
            split.features.append(feature)
    if not split.features:
        reasons = {d.reason for d in split.dropped}
        raise DataError(path, 0, "", f"every example was dropped: {'; '.join(sorted(reasons))[:300]}")
    return split


def raw_rows(path: str, data_cfg: Any) -> dict[int, dict[str, Any]]:
    """The data rows of ``path`` as written, every column kept, by the row number features carry
    (online rewards read a row's ``answer``, ``tests``, ... from here). Unreadable rows are left out,
    as :func:`prepare_split` leaves them out with ``skip_bad``."""
    return dict(iter_records(path, skip_bad=data_cfg.skip_bad))


def split_notes(split: PreparedSplit, run_path: Path, max_length: int) -> list[str]:
    """What the user should know about a prepared file: rows not used (and where their reasons
    are), truncation, and columns the format did not read."""
    notes = []
    if split.dropped or split.rows_rejected:
        notes.append(
            f"{split.path}: {len(split.dropped)} example(s) dropped and {split.rows_rejected} "
            f"malformed row(s) rejected; reasons in {run_path}/dropped.jsonl and rejects.jsonl"
        )
    if split.truncated:
        notes.append(f"{split.path}: {split.truncated} example(s) truncated to data.max_length={max_length}")
    if split.unused_columns:
        cols = ", ".join(f"{c} ({n} rows)" for c, n in sorted(split.unused_columns.items()))
        notes.append(
            f"{split.path}: columns not used by format {split.format!r}: {cols}; map them with "
            "data.columns if they hold data this run should use"
        )
    return notes
