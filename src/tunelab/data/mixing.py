"""Multi-task data: several datasets mixed into one training set (per-task evaluation of the
mixture is :mod:`tunelab.evaluate.tasks`).

Each task's share of the mixture comes from explicit weights (``p_i ∝ w_i``) or from
temperature-based sampling over dataset sizes (``p_i ∝ n_i^(1/T)``; T=1 keeps natural
proportions, larger T flattens them towards uniform, as in mT5 / multilingual BERT). Counts are
exact (largest-remainder rounding of ``p_i · total``), rows are drawn from each task in shuffled
passes (all rows once before any repeats), and the result is shuffled — all from one seed.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.canonical import read_canonical

DEFAULT_TAG = "[{task}] "


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name, its rows (canonical or raw records) and its mixing weight."""

    name: str
    rows: Sequence[dict[str, Any]]
    weight: float = 1.0


def task_probabilities(tasks: Sequence[TaskSpec], temperature: float | None = None) -> dict[str, float]:
    """Each task's share of the mixture: by weight, or by size with temperature ``T`` (n_i^(1/T))."""
    if not tasks:
        raise ValueError("give at least one task")
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    for t in tasks:
        if not t.rows:
            raise ValueError(f"task '{t.name}' has no rows")
        if t.weight < 0 or not math.isfinite(t.weight):
            raise ValueError(f"task '{t.name}': weight must be a finite number >= 0, got {t.weight}")
    if temperature is not None:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if any(t.weight != 1.0 for t in tasks):
            raise ValueError("give task weights or a temperature, not both. Choose one.")
        raw = [len(t.rows) ** (1.0 / temperature) for t in tasks]
    else:
        raw = [t.weight for t in tasks]
    total = sum(raw)
    if total <= 0:
        raise ValueError("every task weight is 0; at least one must be positive")
    return {t.name: r / total for t, r in zip(tasks, raw)}


def _counts(probabilities: Mapping[str, float], total: int) -> dict[str, int]:
    """Largest-remainder rounding: counts sum to ``total`` and each is within 1 of ``p_i · total``."""
    exact = {name: p * total for name, p in probabilities.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda n: (counts[n] - exact[n], list(exact).index(n)))
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def _draw(rows: Sequence[dict[str, Any]], k: int, rng: random.Random) -> list[dict[str, Any]]:
    order: list[int] = []
    while len(order) < k:
        cycle = list(range(len(rows)))
        rng.shuffle(cycle)
        order += cycle
    return [rows[i] for i in order[:k]]


def tag_row(row: dict[str, Any], tag: str) -> dict[str, Any]:
    """A copy of ``row`` with ``tag`` prepended to its prompt (first user message, instruction or text)."""
    out = dict(row)
    if isinstance(out.get("messages"), list):
        messages = [dict(m) for m in out["messages"]]
        for m in messages:
            if m.get("role") == "user":
                m["content"] = tag + m["content"]
                break
        else:
            raise ValueError("cannot tag a conversation without a user message")
        out["messages"] = messages
    elif "instruction" in out:
        out["instruction"] = tag + out["instruction"]
    elif isinstance(out.get("prompt"), str):
        out["prompt"] = tag + out["prompt"]
    elif isinstance(out.get("prompt"), list):
        out["prompt"] = tag_row({"messages": out["prompt"]}, tag)["messages"]
    elif "text" in out:
        out["text"] = tag + out["text"]
    else:
        raise ValueError(f"no prompt field to tag in a row with fields {sorted(out)}")
    return out


def mix_tasks(
    tasks: Sequence[TaskSpec],
    *,
    temperature: float | None = None,
    total: int | None = None,
    seed: int = 0,
    tag_template: str | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """``total`` (default: all rows of all tasks) ``(task, row)`` pairs mixed by weight or temperature.

    ``tag_template`` (e.g. ``"[{task}] "``) is formatted with the task name and prepended to each
    row's prompt, so the model can tell the tasks apart; use the same template at evaluation.
    """
    probabilities = task_probabilities(tasks, temperature)
    total = sum(len(t.rows) for t in tasks) if total is None else total
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    counts = _counts(probabilities, total)
    rng = random.Random(seed)
    mixed: list[tuple[str, dict[str, Any]]] = []
    for task in tasks:
        tag = tag_template.format(task=task.name) if tag_template else None
        for row in _draw(task.rows, counts[task.name], rng):
            mixed.append((task.name, tag_row(row, tag) if tag else row))
    rng.shuffle(mixed)
    return mixed


def load_task(
    name: str, path: str, weight: float = 1.0, fmt: str = "auto", columns: dict[str, str] | None = None
) -> TaskSpec:
    """A task from a data file, its rows in canonical form (so tasks of different formats can mix)."""
    rows, _, _ = read_canonical(path, fmt, columns)
    return TaskSpec(name, [example for _, example in rows], weight)


def write_mixture(mixed: Sequence[tuple[str, dict[str, Any]]], path: str | Path) -> tuple[Path, Path]:
    """Write the mixed rows as JSONL (a normal ``data.train`` file) and each row's task beside it.

    Returns ``(rows_path, tasks_path)``; ``tasks_path`` holds one task name per line, same order.
    All rows must share one canonical shape, since the trainer reads one format per file.
    """
    shapes = {tuple(sorted(row)) for _, row in mixed}
    if len(shapes) > 1:
        raise ValueError(f"tasks have different formats ({sorted(shapes)}); mix tasks of one kind")
    rows_path = Path(path)
    tasks_path = rows_path.with_suffix(".tasks.txt")
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    rows_path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in mixed), encoding="utf-8"
    )
    tasks_path.write_text("".join(f"{t}\n" for t, _ in mixed), encoding="utf-8")
    return rows_path, tasks_path
