"""Procedural reasoning tasks from ``reasoning-gym``, written as prompt rows a verifier can score.

``tunelab data gym TASK --n N -o FILE`` is a shell over :func:`write_gym`. The library generates
every problem offline from a seed (no download), and each row keeps what its own scorer needs::

    {"prompt": question, "system": instructions, "question": ..., "answer": ...,
     "metadata": {"source_dataset": TASK, ...}}

``prompt`` (and ``system``) is what the policy sees; ``builtin:gym_score`` hands the completion's
``<answer>`` to reasoning-gym's scorer for ``metadata.source_dataset`` with this row as the entry,
and ``builtin:math_answer`` can check ``answer`` for numeric tasks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.data.outputs import atomic_open, check_outputs
from tunelab.registry import did_you_mean

__all__ = ["gym_tasks", "gym_rows", "write_gym"]

SYSTEM = "default"
"""reasoning-gym's own instruction prompt (think step by step, answer in ``<answer>`` tags)."""


def gym_tasks() -> list[str]:
    """The task names reasoning-gym registers."""
    from reasoning_gym.factory import DATASETS  # noqa: PLC0415  (optional dependency: tunelab[rl])

    return sorted(DATASETS)


def gym_rows(task: str, n: int, *, seed: int = 0, system: str | None = SYSTEM) -> list[dict[str, Any]]:
    """``n`` problems of ``task`` from ``seed``; ``system`` names one of reasoning-gym's system
    prompts (``default``, ``simple``, ``direct``, ...) or None for none."""
    try:
        import reasoning_gym  # noqa: PLC0415
        from reasoning_gym.utils import SYSTEM_PROMPTS  # noqa: PLC0415
    except ImportError:
        raise ValueError("data gym needs reasoning-gym: pip install 'tunelab[rl]'") from None
    tasks = gym_tasks()
    if task not in tasks:
        hint = did_you_mean(task, tasks) or f" Tasks: {', '.join(tasks)}."
        raise ValueError(f"no reasoning-gym task {task!r}.{hint}")
    if n < 1:
        raise ValueError(f"--n must be 1 or more, got {n}")
    if system is not None and system not in SYSTEM_PROMPTS:
        raise ValueError(f"--system must be one of {', '.join(SYSTEM_PROMPTS)} or none, got {system!r}")
    dataset = reasoning_gym.create_dataset(task, size=n, seed=seed)
    rows = []
    for entry in dataset:
        row = {"prompt": entry["question"]}
        if system is not None:
            row["system"] = SYSTEM_PROMPTS[system]
        row.update(question=entry["question"], answer=entry["answer"], metadata=entry["metadata"])
        rows.append(json.loads(json.dumps(row, default=str)))  # what the file will hold, exactly
    return rows


def write_gym(
    task: str,
    n: int,
    output: str | Path,
    *,
    seed: int = 0,
    system: str | None = SYSTEM,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write ``n`` rows of ``task`` to ``output`` (JSONL, atomically); returns a summary."""
    check_outputs([], [output], overwrite=overwrite)
    rows = gym_rows(task, n, seed=seed, system=system)
    with atomic_open(output) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return {"task": task, "rows_written": len(rows), "seed": seed, "output": str(output)}
