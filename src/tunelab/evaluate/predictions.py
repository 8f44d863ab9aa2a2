"""Per-example predictions of every model an eval measured, side by side (``tunelab eval --predictions``).

One JSON line per example, in data order: the input, the reference, and for each model (by role:
``base``, ``tuned``, ``export``...) its answer and whether the main metric counted it correct. The
judged model's ``gold``/``generated``/``generated_correct``/``label_choice`` are also kept at the top
level, the keys the file had before it held every model. The studio's Evaluate page reads this file
to list the examples and filter them to where base and tuned disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # reading and filtering the file (the studio) must not import torch
    from tunelab.evaluate.run import EvalResult, EvalTask


def example_inputs(task: EvalTask) -> tuple[list[str], list[str]]:
    """Each example's input and reference as text, whatever the task's kind."""
    from tunelab.data.templates import split_prompt_answer  # noqa: PLC0415

    if task.kind == "lm":
        split = [split_prompt_answer(c) for c in task.conversations]
        return [_messages_text(prompt) for prompt, _ in split], [gold for _, gold in split]
    if task.kind == "classify":
        return list(task.texts), list(task.golds)
    return [_text(p.get("prompt")) for p in task.pairs], [_text(p.get("chosen")) for p in task.pairs]


def _messages_text(messages: list[dict[str, str]]) -> str:
    """A one-turn prompt as its text; a longer one with each message's role."""
    if len(messages) == 1:
        return str(messages[0].get("content", ""))
    return "\n".join(f"{m.get('role', '')}: {m.get('content', '')}" for m in messages)


def _text(value: Any) -> str:
    if isinstance(value, list):  # a conversation
        return _messages_text(value)
    return "" if value is None else str(value)


def model_answers(result: EvalResult, task: EvalTask, i: int) -> dict[str, Any]:
    """One model's answer to example ``i``: what the main metric judged, and whether it was right."""
    main = task.main_metric
    score = result.per_example.get(main, [])
    entry: dict[str, Any] = {"name": result.model}
    if result.generations:
        entry["generated"] = result.generations[i]
    if result.label_predictions:
        entry["label_choice"] = result.label_predictions[i]
    margins = result.per_example.get("reward_margin_mean") or result.per_example.get("implicit_margin_mean")
    if main == "accuracy_loglik" and result.label_predictions:
        entry["answer"] = result.label_predictions[i]
    elif result.generations:
        entry["answer"] = result.generations[i]
    else:  # preference pairs: no text, the margin chosen - rejected is the answer
        entry["answer"] = f"margin {margins[i]:+.4f}" if margins else ""
    entry["correct"] = bool(score[i] >= 1.0) if i < len(score) else None
    return entry


def prediction_rows(task: EvalTask, results: list[tuple[str, EvalResult]]) -> list[dict[str, Any]]:
    """``results``: (role, result) in the eval's order; the last one (or ``tuned``) is the judged model."""
    from tunelab.evaluate.metrics import normalise_answer  # noqa: PLC0415

    inputs, references = example_inputs(task)
    judged = dict(results).get("tuned", results[-1][1])
    rows = []
    for i, (text, reference) in enumerate(zip(inputs, references)):
        row: dict[str, Any] = {"index": i, "input": text, "reference": reference}
        row["models"] = {role: model_answers(result, task, i) for role, result in results}
        if judged.generations:  # the file's original keys, for the judged model
            row["gold"] = reference
            row["generated"] = judged.generations[i]
            row["generated_correct"] = normalise_answer(judged.generations[i]) == normalise_answer(reference)
        if judged.label_predictions:
            row["label_choice"] = judged.label_predictions[i]
        rows.append(row)
    return rows


def write_prediction_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_prediction_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a predictions file (a line that is not JSON, e.g. cut short, is skipped)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def disagrees(row: dict[str, Any], first: str = "base", second: str = "tuned") -> bool:
    """Do the two models differ on this example: one right and one wrong, or different answers?"""
    a, b = (row.get("models") or {}).get(first), (row.get("models") or {}).get(second)
    if a is None or b is None:
        return False
    return a.get("correct") != b.get("correct") or a.get("answer") != b.get("answer")
