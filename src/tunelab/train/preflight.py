"""Pre-flight checks at the start of `tunelab train`: the data problems that silently spoil a run.

Leakage and format problems come from the data audit; truncation comes from the trainer's own
encoding (template-aware, so the counts are exact, not estimates). Problems are warnings, or
errors with ``data.strict: true``. The findings are kept in the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.console import labelled
from tunelab.data.audit import audit, blocking_problems
from tunelab.data.split import split
from tunelab.recipe import problems_line
from tunelab.runs.atomic import atomic_write_json
from tunelab.train.data import PreparedSplit


class PreflightError(ValueError):
    """``data.strict`` is on and the data has blocking problems."""


def truncation_problems(prepared: PreparedSplit, max_length: int) -> list[str]:
    problems = []
    if prepared.truncated:
        problems.append(
            f"{prepared.path}: {prepared.truncated} example(s) exceed data.max_length={max_length} "
            "and are truncated"
        )
    cut = [d for d in prepared.dropped if "truncation" in d.reason]
    if cut:
        problems.append(
            f"{prepared.path}: {len(cut)} example(s) lost their whole answer to truncation and were dropped"
        )
    return problems


def run_preflight(
    data_cfg: Any, train: PreparedSplit, evaluation: PreparedSplit | None, run_path: Path, console: Console
) -> list[str]:
    """Audit the training data against the eval data; warn, or raise :class:`PreflightError` when strict."""
    fmt = None if data_cfg.format == "auto" else data_cfg.format
    report = audit(
        data_cfg.train,
        eval_paths=[data_cfg.eval] if data_cfg.eval else [],
        fmt=fmt,
        columns=data_cfg.columns or None,
        skip_bad=data_cfg.skip_bad,
    )
    problems = blocking_problems(report)
    for prepared in filter(None, (train, evaluation)):
        problems += truncation_problems(prepared, data_cfg.max_length)
    atomic_write_json(run_path / "preflight.json", {"problems": problems, "audit": report})
    if problems and data_cfg.strict:
        raise PreflightError(
            f"data.strict: the data has blocking problems ({problems_line(problems)}); fix them "
            "(tunelab data clean / split) or set data.strict: false to train anyway"
        )
    for problem in problems:
        console.print(labelled("pre-flight", problem))
    return problems


def materialise_split(data_cfg: Any, run_path: Path) -> tuple[str, str]:
    """``data.split``: split the one training file into train/validation inside the run directory
    (seeded and leak-free, so a resumed run gets identical files)."""
    spec = data_cfg.split
    out = run_path / "data"
    if not (out / "train.jsonl").exists():
        split(
            data_cfg.train,
            out,
            ratios=(1 - spec.eval_ratio, spec.eval_ratio),
            by=spec.by,
            key=spec.key,
            seed=spec.seed,
            fmt=None if data_cfg.format == "auto" else data_cfg.format,
            columns=data_cfg.columns or None,
        )
    return str(out / "train.jsonl"), str(out / "validation.jsonl")
