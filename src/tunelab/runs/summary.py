"""The few numbers that summarise a run, shared by its report (`runs/report.py`) and the runs index
(`runs/index.py`), so a listing and a report can never disagree, and neither imports the other."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any

# Preferred headline metric per run, in order; the first one a run has is its key metric.
KEY_METRICS = ("eval_loss", "eval_accuracy", "reward_mean", "loss")


def fmt(value: Any) -> str:
    """The one way a report prints a value: ints as they are, floats to 4 significant digits."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``training.learning_rate``); lists and scalars are leaves."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def key_metric(final_eval: dict[str, Any], last_train: dict[str, Any]) -> tuple[str | None, float | None]:
    """The one number that summarises a run in a listing: eval loss if measured, else the best
    available of :data:`KEY_METRICS`, else the first numeric final eval metric."""
    candidates = {**last_train, **final_eval}
    for name in KEY_METRICS:
        if is_number(candidates.get(name)):
            return name, float(candidates[name])
    for name, value in final_eval.items():
        if is_number(value):
            return name, float(value)
    return None, None


def duration_seconds(started_at: str | None, ended_at: str | None) -> float | None:
    """Wall time between two manifest timestamps; None while running or if either is unreadable."""
    try:
        return (datetime.fromisoformat(ended_at) - datetime.fromisoformat(started_at)).total_seconds()
    except (TypeError, ValueError):
        return None


def split_metric_rows(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Training rows and evaluation rows of ``metrics.jsonl`` (an eval row carries ``eval_*`` keys)."""
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    train = [r for r in rows if not any(k.startswith("eval_") for k in r)]
    return train, evals
