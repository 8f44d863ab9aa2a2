"""`tunelab data show`: examples exactly as they will be tokenized, and which tokens carry loss.

The preview calls the objective's own ``encode`` — the function the trainer uses — so what is shown
is what is trained, not a re-implementation that could drift from it.

Only the first ``n`` rows are read, and with a ``max_length`` every text is first cut to a
character bound that still yields more than ``max_length`` tokens, so a preview of a huge row
costs what the preview shows, not what the row holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.text import Text

from tunelab.data.audit import no_rows_reason
from tunelab.data.formats import FormatError, detect_file_format, to_canonical
from tunelab.data.loaders import DataError, LoadReport, iter_records
from tunelab.data.templates import IGNORE_INDEX, encode_prompt, select_template, split_prompt_answer
from tunelab.objectives.base import Dropped
from tunelab.objectives.sft import SftConfig, SftObjective

TOKEN_MARGIN = 16  # extra tokens' worth of characters kept past max_length (template tokens etc.)


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
    rows: list[tuple[int, dict]] | None = None,
) -> tuple[list[Preview], list[str]]:
    """The first ``n`` examples of ``path`` encoded by the SFT objective, plus template warnings.
    ``rows``: those examples already read by :func:`first_examples` (the CLI reads them before it
    loads a tokenizer, so bad input fails fast)."""
    data = data or DataShowConfig()
    if rows is None:
        rows = first_examples(path, n, data.format, data.columns)
    notes = select_template(tokenizer, template)
    sft = SftObjective(objective or SftConfig(), tokenizer, data)
    bound = char_bound(tokenizer, data.max_length)
    previews = []
    for row, example in rows:
        example = cut_texts(example, bound)
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


def first_examples(path: str, n: int, fmt: str, columns: dict[str, str] | None) -> list[tuple[int, dict]]:
    """The first ``n`` rows of ``path`` in canonical shape, reading no further than needed."""
    load = LoadReport()
    out: list[tuple[int, dict]] = []
    detected = None if fmt == "auto" else fmt
    if n == 0:
        return out
    for row, record in iter_records(path, report=load):
        detected = detected or detect_file_format(path, row, record, columns or None)
        try:
            out.append((row, to_canonical(record, detected, columns or None)))
        except FormatError as e:
            raise DataError(path, row, "", str(e)) from None
        if len(out) >= n:
            break
    if not out:
        raise DataError(path, 0, "", no_rows_reason(load))
    return out


def char_bound(tokenizer: Any, max_length: int | None) -> int | None:
    """Characters of text that surely give more than ``max_length`` tokens: no token of the
    vocabulary is longer than the longest vocabulary entry (byte-level entries have one character
    per byte, so decoded text is never longer)."""
    if not max_length:
        return None
    try:
        longest = max((len(t) for t in tokenizer.get_vocab()), default=64)
    except (AttributeError, TypeError, NotImplementedError):
        longest = 64
    return (max_length + TOKEN_MARGIN) * max(longest, 1)


def cut_texts(example: dict[str, Any], bound: int | None) -> dict[str, Any]:
    """``example`` with every text cut to ``bound`` characters (the rest is past the window anyway)."""
    if bound is None:
        return example

    def cut(value: Any) -> Any:
        if isinstance(value, str):
            return value[:bound]
        if isinstance(value, list):
            return [{**m, "content": cut(m.get("content"))} if isinstance(m, dict) else cut(m) for m in value]
        return value

    return {k: cut(v) for k, v in example.items()}


def render_preview(preview: Preview) -> Text:
    """Loss tokens bold green on a dark background, masked tokens dimmed; token boundaries kept visible."""
    text = Text()
    if preview.dropped:
        return Text(f"row {preview.row}: dropped — {preview.dropped}", style="red")
    for piece, loss in zip(preview.pieces, preview.loss_mask):
        text.append(piece, style="bold green on grey15" if loss else "dim")
    return text
