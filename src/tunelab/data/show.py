"""`tunelab data show`: examples exactly as they will be tokenized, and which tokens carry loss.

The preview calls the objective's own ``encode`` — the function the trainer uses — so what is shown
is what is trained, not a re-implementation that could drift from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.text import Text

from tunelab.data.templates import IGNORE_INDEX, encode_prompt, select_template, split_prompt_answer
from tunelab.objectives.base import Dropped
from tunelab.objectives.sft import SftConfig, SftObjective
from tunelab.train.data import read_canonical


@dataclass
class Preview:
    row: int
    input_ids: list[int]
    loss_mask: list[bool]
    pieces: list[str]
    truncated: bool = False
    dropped: str | None = None
    warnings: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "input_ids": self.input_ids,
            "loss_mask": [int(m) for m in self.loss_mask],
            "tokens": self.pieces,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "warnings": self.warnings,
        }


@dataclass
class DataShowConfig:
    """The recipe fields that change tokenization (mirrors ``data.*`` and ``objective.*``)."""

    max_length: int | None = None
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)


def inference_mismatch(tokenizer: Any, example: dict[str, Any], input_ids: list[int]) -> str | None:
    """Where training tokens differ from the prompt the tokenizer builds at inference, if anywhere."""
    if "messages" not in example:
        return None
    prompt = encode_prompt(tokenizer, split_prompt_answer(example["messages"])[0])
    if input_ids[: len(prompt)] == prompt:
        return None
    at = next(
        (i for i, (a, b) in enumerate(zip(input_ids, prompt)) if a != b), min(len(input_ids), len(prompt))
    )
    return (
        f"training tokens differ from the inference prompt at token {at}: the model would be prompted "
        "differently from how it was trained"
    )


def preview_examples(
    path: str,
    tokenizer: Any,
    *,
    n: int = 3,
    template: str | None = None,
    objective: SftConfig | None = None,
    data: DataShowConfig | None = None,
) -> tuple[list[Preview], list[str]]:
    """The first ``n`` examples of ``path`` encoded by the SFT objective, plus template warnings."""
    data = data or DataShowConfig()
    notes = select_template(tokenizer, template)
    sft = SftObjective(objective or SftConfig(), tokenizer, data)
    rows, _, _ = read_canonical(path, data.format, data.columns)
    previews = []
    for row, example in rows[:n]:
        encoded = sft.encode(row, example)
        if isinstance(encoded, Dropped):
            previews.append(Preview(row, [], [], [], dropped=encoded.reason))
            continue
        ids = encoded["input_ids"]
        preview = Preview(
            row,
            ids,
            [lab != IGNORE_INDEX for lab in encoded["labels"]],
            [tokenizer.decode([t]) for t in ids],
            truncated=bool(encoded["truncated"]),
        )
        mismatch = inference_mismatch(tokenizer, example, ids)
        if mismatch:
            preview.warnings.append(mismatch)
        previews.append(preview)
    return previews, notes


def render_preview(preview: Preview) -> Text:
    """Loss tokens bold green on a dark background, masked tokens dimmed; token boundaries kept visible."""
    text = Text()
    if preview.dropped:
        return Text(f"row {preview.row}: dropped — {preview.dropped}", style="red")
    for piece, loss in zip(preview.pieces, preview.loss_mask):
        text.append(piece, style="bold green on grey15" if loss else "dim")
    return text
