"""`tunelab data show`: examples exactly as they will be tokenized, and which tokens carry loss.

The preview builds the objective training would build and calls its own ``encode`` — the function
the trainer uses — so what is shown is what is trained, not a re-implementation that could drift
from it. Every sequence of a row is shown (chosen and rejected for preference objectives, one per
assistant turn when the template rewrites earlier turns).

Only the first ``n`` rows are read, and every text is first cut: with a ``max_length`` to a
character bound that still yields more than ``max_length`` tokens, else to :data:`SHOW_CHARS`
characters (with a warning), so a preview of a huge row costs what the preview shows, not what
the row holds. Control characters in the data are printed escaped (``\\x1b``), never sent raw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from rich.text import Text

from tunelab.console import escape_controls
from tunelab.data.audit import no_rows_reason
from tunelab.data.canonical import row_error
from tunelab.data.formats import FormatError, detect_file_format, to_canonical
from tunelab.data.loaders import DataError, LoadReport, iter_records
from tunelab.data.templates import (
    IGNORE_INDEX,
    TemplateError,
    encode_prompt,
    select_template,
    split_prompt_answer,
)
from tunelab.objectives import OBJECTIVES, Dropped, ObjectiveConfig
from tunelab.objectives.sft import SftConfig

TOKEN_MARGIN = 16  # extra tokens' worth of characters kept past max_length (template tokens etc.)
SHOW_CHARS = 16_384  # without max_length, each text is cut to this for the preview (a screenful or more)


@dataclass
class Preview:
    """One encoded sequence of a row. ``part`` names it when a row gives several (``chosen`` /
    ``rejected`` for preference objectives, ``turn 2`` for per-turn sequences); ``tags`` marks tokens
    inside a tool call (``call``), a tool result (``tool``) or reasoning (``think``)."""

    row: int
    input_ids: list[int]
    loss_mask: list[bool]
    pieces: list[str]
    truncated: bool = False
    dropped: str | None = None
    warnings: list[str] = field(default_factory=list)
    part: str = ""
    tags: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "row": self.row,
            "part": self.part,
            "input_ids": self.input_ids,
            "loss_mask": [int(m) for m in self.loss_mask],
            "tokens": self.pieces,
            "tags": self.tags,
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
    train_on_reasoning: bool = True


def inference_mismatch(tokenizer: Any, example: dict[str, Any], input_ids: list[int]) -> str | None:
    """Where training tokens differ from the prompt the tokenizer builds at inference, if anywhere."""
    if "messages" not in example:
        return None
    messages = split_prompt_answer(example["messages"])[0]
    try:
        prompt = encode_prompt(tokenizer, messages, tools=example.get("tools"))
    except TemplateError:
        return None  # the encoding itself reports why this template cannot render the row
    if input_ids[: len(prompt)] == prompt:
        return None
    at = next(
        (i for i, (a, b) in enumerate(zip(input_ids, prompt)) if a != b), min(len(input_ids), len(prompt))
    )
    return (
        f"training tokens differ from the inference prompt at token {at}: the model would be prompted "
        "differently from how it was trained"
    )


def build_objective(tokenizer: Any, objective: ObjectiveConfig | None, data: DataShowConfig) -> Any:
    """The objective training would build (its own ``encode`` is what the preview shows)."""
    cfg = objective or SftConfig()
    return OBJECTIVES.get(cfg.name).impl(cfg, tokenizer, data)


def preview_examples(
    path: str,
    tokenizer: Any,
    *,
    n: int = 3,
    template: str | None = None,
    objective: ObjectiveConfig | None = None,
    data: DataShowConfig | None = None,
    rows: list[tuple[int, dict]] | None = None,
) -> tuple[list[Preview], list[str]]:
    """The first ``n`` examples of ``path`` encoded by ``objective`` (SFT by default), one
    :class:`Preview` per encoded sequence, plus template warnings. ``rows``: those examples already
    read by :func:`first_examples` (the CLI reads them before it loads a tokenizer, so bad input
    fails fast)."""
    data = data or DataShowConfig()
    if rows is None:
        rows = first_examples(path, n, data.format, data.columns)
    notes = select_template(tokenizer, template)
    encoder = build_objective(tokenizer, objective, data)
    bound = char_bound(tokenizer, data.max_length) if data.max_length else SHOW_CHARS
    previews: list[Preview] = []
    for row, whole in rows:
        example = cut_texts(whole, bound)
        encoded = encoder.encode(row, example)
        if isinstance(encoded, Dropped):
            previews.append(Preview(row, [], [], [], dropped=encoded.reason))
            continue
        for part, ids, labels, truncated in feature_sequences(encoded):
            preview = _preview(tokenizer, row, example, part, ids, labels, truncated)
            if not data.max_length and example != whole:
                preview.warnings.append(
                    f"texts over {SHOW_CHARS:,} characters are cut for this preview (training reads them "
                    "whole); give --max-length to see the row truncated as training truncates it"
                )
            previews.append(preview)
    return previews, notes


def feature_sequences(encoded: Any) -> list[tuple[str, list[int], list[int] | None, bool]]:
    """``(part, input_ids, labels, truncated)`` of every sequence in an objective's feature(s).
    ``labels`` None: the objective reads one score at the last token (reward, classify)."""
    if isinstance(encoded, list):
        return [(f"turn {k + 1}", *seq[1:]) for k, f in enumerate(encoded) for seq in feature_sequences(f)]
    truncated = bool(encoded.get("truncated"))
    if "chosen_ids" in encoded:
        return [
            (side, encoded[f"{side}_ids"], encoded.get(f"{side}_labels"), truncated)
            for side in ("chosen", "rejected")
        ]
    if "examples" in encoded:  # KTO: desirable / undesirable answers
        return [
            ("desirable" if e["desirable"] else "undesirable", e["input_ids"], e["labels"], truncated)
            for e in encoded["examples"]
        ]
    if "labels" in encoded:
        return [("", encoded["input_ids"], encoded["labels"], truncated)]
    part = f"label {encoded['label']}" if "label" in encoded else ""
    return [(part, encoded["input_ids"], None, truncated)]


def _preview(
    tokenizer: Any,
    row: int,
    example: dict[str, Any],
    part: str,
    ids: list[int],
    labels: list[int] | None,
    truncated: bool,
) -> Preview:
    if labels is None:  # scored at the last token
        mask = [i == len(ids) - 1 for i in range(len(ids))]
    else:
        mask = [lab != IGNORE_INDEX for lab in labels]
    pieces = [tokenizer.decode([t]) for t in ids]
    preview = Preview(row, ids, mask, pieces, truncated=truncated, part=part)
    preview.tags = token_tags(pieces, mask, example)
    if not part:
        mismatch = inference_mismatch(tokenizer, example, ids)
        if mismatch:
            preview.warnings.append(mismatch)
    return preview


def token_tags(pieces: list[str], mask: list[bool], example: dict[str, Any]) -> list[str]:
    """``call`` for trained tokens of a tool call, ``tool`` for tool-result tokens, ``think`` for
    reasoning tokens, "" otherwise. Found by locating the messages' own text in the decoded
    sequence (template-agnostic: every template writes contents and function names verbatim)."""
    text = "".join(pieces)
    starts = list(accumulate((len(p) for p in pieces), initial=0))
    regions: list[tuple[int, int, str]] = []
    cursor = 0
    for message in _messages_of(example):
        for kind, needle in _needles(message):
            at = text.find(needle, cursor) if needle else -1
            if at >= 0:
                regions.append((at, at + len(needle), kind))
                cursor = at + len(needle)
    tags = []
    for k, (start, piece) in enumerate(zip(starts, pieces)):
        end = start + len(piece)
        kind = next((r for a, b, r in regions if a < end and start < b), "")
        tags.append(kind if kind != "call" or mask[k] else "")
    return _extend_calls(tags, mask)


def _messages_of(example: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" in example:
        return example["messages"]
    answers = [m for key in ("chosen", "completion") for m in example.get(key, [])]
    return [*example.get("prompt", []), *answers]


def _needles(message: dict[str, Any]) -> list[tuple[str, str]]:
    """The texts of a message in the order templates write them, each with its tag ("" for text
    that only moves the search past it, so a name in the system prompt's tool list is not
    mistaken for the call)."""
    content = str(message.get("content") or "")
    if message.get("role") == "tool":
        return [("tool", content.strip())]
    if message.get("role") != "assistant":
        return [("", content.strip())]
    out = []
    if message.get("reasoning_content"):
        out.append(("think", message["reasoning_content"].strip()))
    if "</think>" in content:
        thought, _, content = content.partition("</think>")
        out.append(("think", thought.replace("<think>", "").strip()))
    out.append(("", content.strip()))
    for call in message.get("tool_calls") or []:
        out.append(("call", str(call.get("function", {}).get("name", ""))))
    return out


def _extend_calls(tags: list[str], mask: list[bool]) -> list[str]:
    """A tool call runs from its function name to the end of that trained stretch (its arguments)."""
    out = list(tags)
    for k in range(1, len(out)):
        if not out[k] and mask[k] and out[k - 1] == "call":
            out[k] = "call"
    return out


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
            raise row_error(path, row, record, e) from None
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
        if isinstance(value, list):  # messages: only their texts are cut (tool calls are short)
            return [
                {**m, **{k: cut(m[k]) for k in ("content", "reasoning_content") if k in m}}
                if isinstance(m, dict) and "role" in m
                else m
                for m in value
            ]
        return value

    # tools are schemas, not text to cut
    return {k: v if k == "tools" else cut(v) for k, v in example.items()}


STYLES = {
    (True, ""): "bold green on grey15",
    (True, "call"): "bold cyan on grey15",
    (True, "think"): "bold magenta on grey15",
    (False, "tool"): "yellow",
    (False, "think"): "magenta",
}


def render_preview(preview: Preview) -> Text:
    """Loss tokens bold green on a dark background (tool calls cyan, reasoning magenta), tool results
    yellow, other masked tokens dimmed; token boundaries kept visible."""
    text = Text()
    if preview.dropped:
        return Text(f"row {preview.row}: dropped — {preview.dropped}", style="red")
    tags = preview.tags or [""] * len(preview.pieces)
    for piece, loss, tag in zip(preview.pieces, preview.loss_mask, tags):
        # Data is shown, never obeyed: an ESC or carriage return in a row is printed as \x1b, \r.
        visible = escape_controls(piece, keep="\n\t")
        text.append(visible, style=STYLES.get((loss, tag), "bold green on grey15" if loss else "dim"))
    return text
