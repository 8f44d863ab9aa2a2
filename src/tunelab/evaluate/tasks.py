"""Per-task evaluation of a multi-task run: each task's eval rows, tagged as in the training
mixture (:mod:`tunelab.data.mixing`), scored separately.

The loss itself is the caller's (the engine passes its own ``evaluate_loss``), so this module
needs nothing from ``train`` and the engine can import it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tunelab.data.mixing import TaskSpec, tag_row
from tunelab.objectives.base import Dropped

__all__ = ["LossFn", "evaluate_per_task"]

# (model, objective, features, batch_size, device) -> {"eval_loss": ..., "eval_perplexity": ...}
LossFn = Callable[[Any, Any, list[dict[str, Any]], int, Any], dict[str, float]]


def evaluate_per_task(
    model: Any,
    objective: Any,
    eval_tasks: Sequence[TaskSpec],
    *,
    loss: LossFn,
    batch_size: int = 16,
    device: Any = "cpu",
    tag_template: str | None = None,
) -> dict[str, float]:
    """``{"<task>/eval_loss": ..., "<task>/eval_perplexity": ...}`` for each task's eval rows.

    Rows are canonical examples (as :func:`tunelab.data.mixing.load_task` gives), tagged like the
    training mixture, encoded by the run's objective; rows the objective drops are skipped.
    ``loss`` scores the encoded features (the engine's ``evaluate_loss``).
    """
    metrics: dict[str, float] = {}
    for task in eval_tasks:
        tag = tag_template.format(task=task.name) if tag_template else None
        encoded = [objective.encode(i, tag_row(r, tag) if tag else r) for i, r in enumerate(task.rows)]
        features = [e for e in encoded if not isinstance(e, Dropped)]
        for f in features:
            f.pop("truncated", None)
        if not features:
            raise ValueError(f"task '{task.name}': every eval example was dropped by the objective")
        for key, value in loss(model, objective, features, batch_size, device).items():
            metrics[f"{task.name}/{key}"] = value
    return metrics
