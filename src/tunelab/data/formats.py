"""Data formats: detect them from column names and map rows to one canonical shape per format.

Canonical shapes::

    text            {"text": str}
    instruction     {"messages": [system?, user, assistant]}
    chat            {"messages": [{"role", "content"}, ...]}
    preference      {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}
    classification  {"text": str, "label": str}

``columns`` maps a canonical field to the column that holds it, as in a recipe's
``data.columns: {instruction: question}`` (read ``instruction`` from the ``question`` column).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

__all__ = [
    "FORMATS",
    "REQUIRED",
    "OPTIONAL",
    "FormatError",
    "detect_format",
    "detect_file_format",
    "to_canonical",
    "rows_to_canonical",
    "iter_canonical",
    "canonical_text",
    "prompt_text",
    "target_text",
]

FORMATS = ("text", "instruction", "chat", "preference", "classification")

# Field sets per format. Chat accepts either of two fields, so it is listed by alternatives.
REQUIRED: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "instruction": ("instruction", "output"),
    "chat": ("messages",),  # or "conversations" (ShareGPT)
    "preference": ("chosen", "rejected"),
    "classification": ("text", "label"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    "text": (),
    "instruction": ("input", "system"),
    "chat": ("conversations",),
    "preference": ("prompt",),
    "classification": (),
}
# Most specific first: {"text", "label"} is classification, not text.
_PRECEDENCE = ("preference", "chat", "instruction", "classification", "text")
_ROLES = {"system", "user", "assistant", "tool"}
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


class FormatError(ValueError):
    """Data does not fit a format. ``field`` names the missing or bad canonical field, if any."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _source(field: str, columns: dict[str, str] | None) -> str:
    return (columns or {}).get(field, field)


def _has(field: str, names: set[str], columns: dict[str, str] | None) -> bool:
    return _source(field, columns) in names


def _matches(fmt: str, names: set[str], columns: dict[str, str] | None) -> bool:
    if fmt == "chat":
        return _has("messages", names, columns) or _has("conversations", names, columns)
    return all(_has(f, names, columns) for f in REQUIRED[fmt])


def _needs(fmt: str) -> str:
    if fmt == "chat":
        return "messages (role/content) or conversations (ShareGPT from/value)"
    need = ", ".join(REQUIRED[fmt])
    opt = [o for o in OPTIONAL[fmt]]
    return need + (f" (optional: {', '.join(opt)})" if opt else "")


def detect_format(columns: Iterable[str], mapping: dict[str, str] | None = None) -> str:
    """Return the format whose required fields are all present in ``columns``.

    ``mapping`` is the recipe's ``data.columns`` (canonical field -> column). Raises
    :class:`FormatError` listing the columns found and what each format needs.
    """
    names = set(columns)
    for fmt in _PRECEDENCE:
        if _matches(fmt, names, mapping):
            return fmt
    needs = []
    for fmt in FORMATS:
        fields = ("messages", "conversations") if fmt == "chat" else REQUIRED[fmt] + OPTIONAL[fmt]
        have = [f for f in fields if _has(f, names, mapping)]
        needs.append(f"{fmt}: needs {_needs(fmt)}" + (f" (has {', '.join(have)})" if have else ""))
    partial = [fmt for fmt, need in zip(FORMATS, needs, strict=True) if " (has " in need]
    closest = f"Closest: {', '.join(partial)}; " if partial else ""
    # One line: errors are printed as a single line (docs/architecture.md, "Output").
    raise FormatError(
        f"Cannot tell the data format from the columns found: {', '.join(sorted(names)) or '(none)'}; "
        + "; ".join(needs)
        + f"; {closest}set the format (--format / data.format) and map columns with --columns "
        "instruction=question,output=answer (data.columns in a recipe)"
    )


def detect_file_format(path: str, row: int, record: dict, mapping: dict[str, str] | None = None) -> str:
    """:func:`detect_format` for the first record of a file; the error names the file and line, and
    for CSV/TSV says when the header row looks like data (a file without a header row)."""
    try:
        return detect_format(record, mapping)
    except FormatError as e:
        if str(path).lower().endswith((".csv", ".tsv")):
            cols = ", ".join(f"'{c[:40]}'" for c in list(record)[:8])
            raise FormatError(
                f"{path}:1: the header row ({cols}) names no known column; if the file has no header "
                "row, add one (e.g. text,label or instruction,output), else map columns with --columns "
                "instruction=question,output=answer"
            ) from None
        raise FormatError(f"{path}:{row}: {e}") from None


def _get(row: dict, field: str, columns: dict[str, str] | None, required: bool = True) -> Any:
    col = _source(field, columns)
    value = row.get(col)
    if value is None and required:
        where = f" (read from column '{col}')" if col != field else ""
        if col in row:
            raise FormatError(f"field '{field}'{where} is null; give it a value or drop the row", field)
        raise FormatError(
            f"missing required field '{field}'{where}; row has: {', '.join(row) or '(none)'}", field
        )
    return value


def _text(value: Any, field: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and "text" in p for p in value):
        return "".join(str(p["text"]) for p in value)  # OpenAI-style content parts
    if isinstance(value, (int, float, bool)):
        return str(value)
    raise FormatError(f"field '{field}' must be a string, got {type(value).__name__}", field)


def _messages(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise FormatError(f"field '{field}' must be a list of messages, got {type(value).__name__}", field)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise FormatError(f"{field}[{i}] must be an object with role/content", field)
        if "role" in m:
            role, content = m.get("role"), m.get("content")
        elif "from" in m:
            role = _SHAREGPT_ROLES.get(str(m.get("from")).lower())
            if role is None:
                raise FormatError(
                    f"{field}[{i}] has unknown ShareGPT speaker {m.get('from')!r}; "
                    f"expected one of {', '.join(sorted(_SHAREGPT_ROLES))}",
                    field,
                )
            content = m.get("value")
        else:
            raise FormatError(f"{field}[{i}] needs role/content (or ShareGPT from/value)", field)
        if role not in _ROLES:
            raise FormatError(
                f"{field}[{i}] has unknown role {role!r}; expected {', '.join(sorted(_ROLES))}", field
            )
        out.append(
            {"role": role, "content": "" if content is None else _text(content, f"{field}[{i}].content")}
        )
    return out


def _as_turns(value: Any, field: str, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    return _messages(value, field)


def _preference(row: dict, columns: dict[str, str] | None) -> dict:
    chosen = _as_turns(_get(row, "chosen", columns), "chosen", "assistant")
    rejected = _as_turns(_get(row, "rejected", columns), "rejected", "assistant")
    raw_prompt = _get(row, "prompt", columns, required=False)
    if raw_prompt is not None:
        prompt = _as_turns(raw_prompt, "prompt", "user")
        # Some datasets repeat the prompt at the head of chosen/rejected; strip it.
        n = len(prompt)
        if chosen[:n] == prompt and rejected[:n] == prompt:
            chosen, rejected = chosen[n:], rejected[n:]
    else:
        # Implicit prompt: the shared prefix of both conversations up to the last non-assistant turn.
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n > 0 and chosen[n - 1]["role"] == "assistant":
            n -= 1
        if n == 0:
            raise FormatError(
                "missing required field 'prompt' (and chosen/rejected share no prompt turns)", "prompt"
            )
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def to_canonical(row: dict, fmt: str, columns: dict[str, str] | None = None) -> dict:
    """Map one record to the canonical shape of ``fmt`` (see the module docstring).

    Raises :class:`FormatError` naming the missing or malformed field; callers add file and line.
    """
    if fmt == "text":
        return {"text": _text(_get(row, "text", columns), "text")}
    if fmt == "classification":
        return {
            "text": _text(_get(row, "text", columns), "text"),
            "label": _text(_get(row, "label", columns), "label"),
        }
    if fmt == "instruction":
        instruction = _text(_get(row, "instruction", columns), "instruction")
        extra = _get(row, "input", columns, required=False)
        extra = _text(extra, "input") if extra is not None else ""
        system = _get(row, "system", columns, required=False)
        messages = [{"role": "system", "content": _text(system, "system")}] if system else []
        user = instruction + ("\n\n" + extra if extra.strip() else "")
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": _text(_get(row, "output", columns), "output")})
        return {"messages": messages}
    if fmt == "chat":
        col = _source("messages", columns)
        if row.get(col) is None and row.get(_source("conversations", columns)) is not None:
            return {"messages": _messages(row[_source("conversations", columns)], "conversations")}
        return {"messages": _messages(_get(row, "messages", columns), "messages")}
    if fmt == "preference":
        return _preference(row, columns)
    raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def iter_canonical(
    records: Iterable[dict | tuple[int, dict]], fmt: str | None = None, columns: dict[str, str] | None = None
) -> Iterator[tuple[int, dict]]:
    """Yield ``(row, canonical)``; records may be dicts or ``(row, dict)`` pairs from ``iter_records``.

    The format is detected from the first record's keys when ``fmt`` is None. A bad row raises
    :class:`FormatError` whose message starts with ``row N:``.
    """
    for i, item in enumerate(records, 1):
        row, rec = item if isinstance(item, tuple) else (i, item)
        if fmt is None:
            fmt = detect_format(rec, columns)
        try:
            yield row, to_canonical(rec, fmt, columns)
        except FormatError as e:
            raise FormatError(f"row {row}: {e}", e.field) from None


def rows_to_canonical(
    records: Iterable[dict | tuple[int, dict]], fmt: str | None = None, columns: dict[str, str] | None = None
) -> list[dict]:
    """List version of :func:`iter_canonical` (canonical dicts only)."""
    return [c for _, c in iter_canonical(records, fmt, columns)]


def _join(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def canonical_text(c: dict) -> str:
    """All text of a canonical record, as compared by dedup and leakage checks."""
    if "messages" in c:
        return _join(c["messages"])
    if "chosen" in c:
        return "\n".join((_join(c["prompt"]), _join(c["chosen"]), _join(c["rejected"])))
    return c["text"]


def prompt_text(c: dict) -> str:
    """The input side of a canonical record (everything before the last assistant turn)."""
    if "messages" in c:
        msgs = c["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        return _join(msgs[:last])
    if "chosen" in c:
        return _join(c["prompt"])
    return c["text"]


def target_text(c: dict) -> str | None:
    """The trained-on side (last assistant turn / chosen answer / label); None for plain text."""
    if "messages" in c:
        turns = [m["content"] for m in c["messages"] if m["role"] == "assistant"]
        return turns[-1] if turns else ""
    if "chosen" in c:
        return _join(c["chosen"])
    return c.get("label")
