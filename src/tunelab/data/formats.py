"""Data formats: detect them from column names and map rows to one canonical shape per kind.

Canonical rows (one per kind; ``KIND[fmt]`` gives a format's kind)::

    text            {"text": str}
    chat            {"messages": [msg, ...], "tools"?: [tool, ...]}
    preference      {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs], "tools"?: [...]}
    unpaired        {"prompt": [msgs], "completion": [msgs], "label": bool, "tools"?: [...]}
    prompt          {"prompt": [msgs], "tools"?: [...]}
    classification  {"text": str, "label": str}

A canonical message is ``{"role", "content"}`` plus, where given, ``tool_calls`` (assistant; each
``{"type": "function", "function": {"name", "arguments": dict}}``, with ``id`` when the data had
one), ``tool_call_id``/``name`` (tool), ``reasoning_content`` (assistant) and ``weight`` (assistant,
0 or 1; absent means 1). A tool is ``{"type": "function", "function": {...}}``. Canonical rows are a
fixed point: detecting and canonicalising a canonical row gives it back unchanged.

``columns`` maps a canonical field to the column that holds it, as in a recipe's
``data.columns: {instruction: question}`` (read ``instruction`` from the ``question`` column); the
keys ``role``, ``content`` and ``weight`` name the keys inside each message instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = [
    "FORMATS",
    "KIND",
    "REQUIRED",
    "OPTIONAL",
    "FormatError",
    "detect_format",
    "detect_file_format",
    "to_canonical",
    "used_columns",
    "rows_to_canonical",
    "iter_canonical",
    "canonical_text",
    "prompt_text",
    "target_text",
]

FORMATS = (
    "text",
    "instruction",
    "chat",
    "preference",
    "unpaired",
    "prompt",
    "prompt_completion",
    "classification",
)
KIND = {
    "text": "text",
    "instruction": "chat",
    "chat": "chat",
    "preference": "preference",
    "unpaired": "unpaired",
    "prompt": "prompt",
    "prompt_completion": "chat",
    "classification": "classification",
}

# Columns that stand for one canonical field, in the order they are looked for: ShareGPT's
# `conversations`, TRL's `chosen_messages`, OpenAI's `preferred_output`, LLaMA-Factory's `kto_tag`.
ALIASES: dict[str, tuple[str, ...]] = {
    "messages": ("messages", "conversations"),
    "chosen": ("chosen", "chosen_messages", "preferred_output"),
    "rejected": ("rejected", "rejected_messages", "non_preferred_output"),
    "label": ("label", "kto_tag"),
    "tools": ("tools", "functions"),  # `functions`: OpenAI's legacy function-calling fine-tuning data
}
# Field sets per format (a field may be given by any of its ALIASES).
REQUIRED: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "instruction": ("instruction", "output"),
    "chat": ("messages",),
    "preference": ("chosen", "rejected"),
    "unpaired": ("label",),  # with prompt+completion or messages
    "prompt": ("prompt",),
    "prompt_completion": ("prompt", "completion"),
    "classification": ("text", "label"),
}
OPTIONAL: dict[str, tuple[str, ...]] = {
    "text": (),
    "instruction": ("input", "system", "history"),
    "chat": ("system", "tools"),
    "preference": ("prompt", "input", "messages", "instruction", "system", "history", "tools"),
    "unpaired": (
        "prompt",
        "completion",
        "messages",
        "instruction",
        "input",
        "history",
        "output",
        "system",
        "tools",
    ),
    "prompt": ("system", "tools"),
    "prompt_completion": ("system", "tools"),
    "classification": (),
}
_NEEDS = {
    "text": "text",
    "instruction": "instruction, output (optional: input, system, history)",
    "chat": "messages (role/content) or conversations (ShareGPT from/value) (optional: tools, system)",
    "preference": "chosen, rejected (optional: prompt) or chosen_messages, rejected_messages or "
    "input, preferred_output, non_preferred_output",
    "unpaired": "label or kto_tag (true/false) with prompt and completion, messages, or instruction and output",
    "prompt": "prompt alone",
    "prompt_completion": "prompt, completion",
    "classification": "text, label",
}
# Most specific first: {"text", "label"} is classification, not text; a label beside a
# conversation is an unpaired preference (KTO), never dropped.
_PRECEDENCE = (
    "preference",
    "unpaired",
    "prompt_completion",
    "chat",
    "instruction",
    "classification",
    "prompt",
    "text",
)
_ROLES = {"system", "user", "assistant", "tool"}
# Speaker names (ShareGPT `from`, or a `role`) and the canonical role each stands for.
_SPEAKERS = {
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
    "function_call": "assistant",  # LLaMA-Factory: the value is the call as JSON
}
_WEIGHT_KEYS = ("weight", "loss_weight", "train", "training")
_REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


class FormatError(ValueError):
    """Data does not fit a format. ``field`` names the missing or bad canonical field, if any."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def _column(field: str, names: Iterable[str], mapping: dict[str, str] | None) -> str:
    """The column holding ``field``: the mapped one, else the first of its aliases present."""
    aliases = ALIASES.get(field, (field,))
    for name in aliases:
        if name in (mapping or {}):
            return mapping[name]  # type: ignore[index]
    return next((name for name in aliases if name in names), field)


def _has(field: str, names: set[str], mapping: dict[str, str] | None) -> bool:
    return _column(field, names, mapping) in names


def _matches(fmt: str, names: set[str], mapping: dict[str, str] | None) -> bool:
    if fmt == "unpaired":
        pair = _has("prompt", names, mapping) and _has("completion", names, mapping)
        alpaca = _has("instruction", names, mapping) and _has("output", names, mapping)
        return _has("label", names, mapping) and (pair or alpaca or _has("messages", names, mapping))
    return all(_has(f, names, mapping) for f in REQUIRED[fmt])


def detect_format(columns: Iterable[str], mapping: dict[str, str] | None = None) -> str:
    """Return the first format (most specific first) whose fields are all present in ``columns``.

    ``mapping`` is the recipe's ``data.columns`` (canonical field -> column). Raises
    :class:`FormatError` listing the columns found and what each format needs.
    """
    names = set(columns)
    for fmt in _PRECEDENCE:
        if _matches(fmt, names, mapping):
            return fmt
    needs = []
    for fmt in FORMATS:
        fields = [a for f in REQUIRED[fmt] + OPTIONAL[fmt] for a in ALIASES.get(f, (f,))]
        have = sorted({f for f in fields if f not in ("system", "tools") and _has(f, names, mapping)})
        needs.append(f"{fmt}: needs {_NEEDS[fmt]}" + (f" (has {', '.join(have)})" if have else ""))
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


class _Row:
    """One record being canonicalised: reads fields through ``columns`` and notes each column read,
    so :func:`used_columns` can tell which columns a format uses."""

    def __init__(self, row: dict, columns: dict[str, str] | None):
        if not isinstance(row, dict):
            raise FormatError(f"a row must be a JSON object, got {type(row).__name__}")
        self.row, self.columns, self.used = row, dict(columns or {}), set()

    def col(self, field: str) -> str:
        return _column(field, self.row, self.columns)

    def has(self, field: str) -> bool:
        return self.row.get(self.col(field)) is not None

    def get(self, field: str, required: bool = True) -> Any:
        col = self.col(field)
        if col in self.row:
            self.used.add(col)
        value = self.row.get(col)
        if value is None and required:
            where = f" (read from column '{col}')" if col != field else ""
            if col in self.row:
                raise FormatError(f"field '{field}'{where} is null; give it a value or drop the row", field)
            raise FormatError(
                f"missing required field '{field}'{where}; row has: {', '.join(self.row) or '(none)'}", field
            )
        return value

    def key(self, name: str) -> str | None:
        """The message key mapped for ``role``, ``content`` or ``weight`` (None: the usual ones)."""
        return self.columns.get(name)


def _text(value: Any, field: str) -> str:
    """A text field as a string. Content parts (OpenAI's ``{"type": "text", "text": ...}``,
    LLaMA-Factory v1's ``{"type": "text", "value": ...}``) are joined; a number or boolean is a row
    error, never read as its spelling (``42`` would train as ``"42"``, ``true`` as ``"True"``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        return "".join(_text_part(p, f"{field}[{i}]") for i, p in enumerate(value))
    if isinstance(value, bool):
        raise FormatError(
            f"field '{field}' is a boolean ({str(value).lower()}), not text; write it as a string "
            f'("{str(value).lower()}") or fix the column',
            field,
        )
    if isinstance(value, (int, float)):
        raise FormatError(
            f"field '{field}' is a number ({value!r}), not text; write it as a string "
            f'("{value!r}") or fix the column',
            field,
        )
    raise FormatError(f"field '{field}' must be a string, got {type(value).__name__}", field)


def _text_part(part: dict, where: str) -> str:
    kind = part.get("type", "text")
    key = next((k for k in ("text", "value") if k in part), None)
    if kind == "text" and key is not None and isinstance(part[key], str):
        return part[key]
    if kind == "text":
        raise FormatError(
            f"{where} is a text part without a 'text' (or LLaMA-Factory 'value') string; "
            'write {"type": "text", "text": "..."}',
            where.split("[")[0],
        )
    raise FormatError(
        f"{where} is a content part of type {kind!r}, which cannot be trained on as text; "
        "keep text, reasoning and tool_call parts only",
        where.split("[")[0],
    )


_V1_PARTS = ("reasoning", "tool_call", "tool_calls")


def _v1_parts(parts: list, where: str) -> tuple[list, dict]:
    """LLaMA-Factory v1 message content: its text parts, and its ``reasoning`` and ``tool_call``
    parts (each value a JSON call ``{"name", "arguments"}``) as canonical fields."""
    text, reasoning, calls = [], [], []
    for i, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "reasoning":
            reasoning.append(_text(p.get("value"), f"{where}.content[{i}].value"))
        elif kind in ("tool_call", "tool_calls"):
            value = p.get("value")
            value = (
                _json(value, f"{where}.content[{i}]", "the tool call") if isinstance(value, str) else value
            )
            calls += _tool_calls(value, f"{where}.content[{i}]")
        else:
            text.append(p)
    extra: dict[str, Any] = {"reasoning_content": "".join(reasoning)} if reasoning else {}
    return text, extra | ({"tool_calls": calls} if calls else {})


def _json(value: str, where: str, what: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise FormatError(
            f"{where}: {what} must be valid JSON, got {value[:60]!r} ({e.msg} at char {e.pos})"
        ) from None


def _arguments(value: Any, where: str) -> dict:
    """A tool call's arguments as a dict: OpenAI gives a JSON string, LLaMA-Factory an object."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = _json(value, where, "the arguments")
    if not isinstance(value, dict):
        raise FormatError(f"{where}: the arguments must be a JSON object, got {type(value).__name__}")
    return value


def _tool_call(call: Any, where: str) -> dict:
    """One call, OpenAI's ``{"id", "type", "function": {"name", "arguments"}}`` or a bare
    ``{"name", "arguments"}`` (LLaMA-Factory, Hermes), as a canonical tool call."""
    if not isinstance(call, dict):
        raise FormatError(f"{where} must be an object with a function name and arguments")
    fn = call.get("function", call)
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise FormatError(f"{where} has no function name")
    out: dict[str, Any] = {"type": "function", "function": {"name": name}}
    out["function"]["arguments"] = _arguments(fn.get("arguments"), f"{where} ({name})")
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tool_calls(value: Any, where: str) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise FormatError(f"{where} must be a non-empty list of tool calls")
    return [_tool_call(c, f"{where}[{j}]") for j, c in enumerate(value)]


def _tools(value: Any, field: str = "tools") -> dict:
    """``{"tools": [...]}`` for a row's tool schemas (a list, or a JSON string of one, as
    LLaMA-Factory writes it); ``{}`` when there are none. Bare function schemas are wrapped in
    ``{"type": "function", "function": ...}``, the shape chat templates read."""
    if value is None or value == "" or value == []:
        return {}
    if isinstance(value, str):
        value = _json(value, field, "the tool list")
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise FormatError(
            f"field '{field}' must be a list of tool schemas, got {type(value).__name__}", field
        )
    tools = []
    for i, t in enumerate(value):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        if not isinstance(fn, dict) and isinstance(t, dict):
            fn = {k: v for k, v in t.items() if k != "type"}  # a flat schema: {"type", "name", ...}
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise FormatError(f"{field}[{i}] must be a function schema with a name", field)
        tools.append({"type": "function", "function": fn})
    return {"tools": tools} if tools else {}


def _row_tools(r: _Row) -> dict:
    return _tools(r.get("tools", required=False), r.col("tools"))


def _weight(m: dict, role: str, where: str, key: str | None) -> dict:
    """``{"weight": 0|1}`` from any common spelling; ``{}`` when the message has none."""
    keys = (key,) if key else _WEIGHT_KEYS
    found = next(((k, m[k]) for k in keys if m.get(k) is not None), None)
    if found is None:
        return {}
    k, v = found
    if isinstance(v, bool) or (isinstance(v, (int, float)) and v in (0, 1)):
        w = int(v)
    elif isinstance(v, str) and v.strip().lower() in ("true", "false", "0", "1"):
        w = int(v.strip().lower() in ("true", "1"))
    else:
        raise FormatError(
            f"{where}.{k} must be 0 or 1 (0: no loss on this message), got {v!r}; weights in between are "
            "not supported",
            "weight",
        )
    if role == "assistant":
        return {"weight": w}
    if w == 0:
        return {}  # no loss on a non-assistant message is what happens anyway
    raise FormatError(
        f"{where}.{k} asks for loss on a {role} message, which has no effect: only assistant turns "
        "are trained; remove it",
        "weight",
    )


def _speaker(m: dict, where: str, key: str | None) -> tuple[str, str]:
    """(role, the speaker name as written) of a message: `role`, ShareGPT `from` or a mapped key."""
    keys = (key,) if key else ("role", "from")
    name = next((m[k] for k in keys if k in m), None)
    if name is None:
        need = f"'{key}'" if key else "role/content (or ShareGPT from/value)"
        raise FormatError(f"{where} needs {need}; it has: {', '.join(map(str, m)) or '(none)'}")
    role = _SPEAKERS.get(str(name).lower()) if isinstance(name, str) else None
    if role is None:
        kind = "ShareGPT speaker" if "from" in m and not key else "role"
        raise FormatError(
            f"{where} has unknown {kind} {name!r}; expected one of {', '.join(sorted(_SPEAKERS))}"
        )
    return role, name.lower()


def _message(m: Any, where: str, keys: dict[str, str | None]) -> dict:
    if not isinstance(m, dict):
        raise FormatError(f"{where} must be an object with role/content")
    role, name = _speaker(m, where, keys["role"])
    ckeys = (keys["content"],) if keys["content"] else ("content", "value")
    raw = next((m[k] for k in ckeys if m.get(k) is not None), None)
    if name == "function_call":  # LLaMA-Factory: the value is {"name", "arguments"} (or a list) as JSON
        calls = _json(raw, where, "the function_call value") if isinstance(raw, str) else raw
        out: dict[str, Any] = {"role": "assistant", "content": "", "tool_calls": _tool_calls(calls, where)}
    else:
        parts: dict[str, Any] = {}
        if isinstance(raw, list) and any(isinstance(p, dict) and p.get("type") in _V1_PARTS for p in raw):
            raw, parts = _v1_parts(raw, where)
        out = {"role": role, "content": "" if raw is None else _text(raw, f"{where}.content")}
        if parts and role != "assistant":
            raise FormatError(
                f"{where} is a {role} message with reasoning or tool-call parts; only assistant turns have them"
            )
        out.update(parts)
    # `function_call` on a message: OpenAI's legacy single call, {"name", "arguments"}.
    key = next((k for k in ("tool_calls", "function_call") if m.get(k) is not None), None)
    if key is not None and "tool_calls" not in out:
        if role != "assistant":
            raise FormatError(f"{where} is a {role} message with {key}; only assistant turns call tools")
        out["tool_calls"] = _tool_calls(m[key], f"{where}.{key}")
    if role == "tool":
        out.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
    reasoning = next((k for k in _REASONING_KEYS if m.get(k) is not None), None)
    if reasoning is not None:
        if role != "assistant":
            raise FormatError(f"{where} is a {role} message with {reasoning}; only assistant turns reason")
        out["reasoning_content"] = _text(m[reasoning], f"{where}.{reasoning}")
    out.update(_weight(m, role, where, keys["weight"]))
    return out


def _messages(value: Any, field: str, r: _Row) -> list[dict]:
    if not isinstance(value, list):
        raise FormatError(f"field '{field}' must be a list of messages, got {type(value).__name__}", field)
    keys = {k: r.key(k) for k in ("role", "content", "weight")}
    return [_message(m, f"{field}[{i}]", keys) for i, m in enumerate(value)]


def _as_turns(value: Any, field: str, role: str, r: _Row) -> list[dict]:
    """A string is one message of ``role``; a message object a list of one; a list is messages."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    return _messages(value, field, r)


def _check(*parts: tuple[str, list[dict]]) -> None:
    """Hostile turns, checked over a whole conversation (prompt then answer): an empty assistant
    turn, and a tool result that answers no assistant tool call."""
    flat = [(f"{field}[{i}]", m) for field, msgs in parts for i, m in enumerate(msgs)]
    for n, (where, m) in enumerate(flat):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise FormatError(
                f"{where} is an empty assistant turn (no content and no tool calls); "
                "write the answer or drop the row",
                where.split("[")[0],
            )
        if m["role"] == "tool":
            j = n - 1
            while j >= 0 and flat[j][1]["role"] == "tool":
                j -= 1
            calls = flat[j][1].get("tool_calls") if j >= 0 and flat[j][1]["role"] == "assistant" else None
            if not calls:
                raise FormatError(
                    f"{where} is a tool result with no preceding assistant tool call; "
                    "put the assistant turn that calls the tool before it",
                    where.split("[")[0],
                )
            ids = [c["id"] for c in calls if "id" in c]
            if "tool_call_id" in m and ids and m["tool_call_id"] not in ids:
                raise FormatError(
                    f"{where} answers tool call id {m['tool_call_id']!r}, but the calls before it "
                    f"have ids {', '.join(map(repr, ids))}",
                    where.split("[")[0],
                )


def _with_system(r: _Row, messages: list[dict]) -> list[dict]:
    """A row-level ``system`` column becomes a leading system message."""
    system = r.get("system", required=False)
    if system is None or system == "":
        return messages
    if messages and messages[0]["role"] == "system":
        raise FormatError(
            "the row has a 'system' column and its messages start with a system message; keep one", "system"
        )
    return [{"role": "system", "content": _text(system, "system")}, *messages]


def _needs_assistant(messages: list[dict], field: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise FormatError(f"field '{field}' has no assistant turn to train on", field)


def _alpaca_prompt(r: _Row) -> list[dict]:
    """system?, the `history` pairs ([[user, assistant], ...]), then instruction + input."""
    instruction = _text(r.get("instruction"), "instruction")
    extra = r.get("input", required=False)
    extra = _text(extra, "input") if extra is not None else ""
    messages = []
    history = r.get("history", required=False) or []
    if not isinstance(history, list):
        raise FormatError("field 'history' must be a list of [user, assistant] pairs", "history")
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise FormatError(f"history[{i}] must be a [user, assistant] pair", "history")
        messages.append({"role": "user", "content": _text(pair[0], f"history[{i}][0]")})
        messages.append({"role": "assistant", "content": _text(pair[1], f"history[{i}][1]")})
    messages.append({"role": "user", "content": instruction + ("\n\n" + extra if extra.strip() else "")})
    return messages


def _instruction(r: _Row) -> dict:
    prompt = _alpaca_prompt(r)
    answer = [{"role": "assistant", "content": _text(r.get("output"), "output")}]
    _check(("history", prompt[:-1]), ("output", answer))
    return {"messages": _with_system(r, prompt + answer)}


def _chat(r: _Row) -> dict:
    field = r.col("messages")
    messages = _messages(r.get("messages"), field, r)
    _check((field, messages))
    return {"messages": _with_system(r, messages), **_row_tools(r)}


def _openai_input(r: _Row) -> tuple[list[dict], dict]:
    """OpenAI preference data: ``input`` is ``{"messages": [...], "tools"?: [...]}``."""
    value = r.get("input")
    if not isinstance(value, dict) or not isinstance(value.get("messages"), list):
        raise FormatError(
            "field 'input' must be an object with a 'messages' list (OpenAI preference data)", "input"
        )
    return _messages(value["messages"], "input.messages", r), _tools(value.get("tools"), "input.tools")


def _pref_prompt(r: _Row) -> tuple[list[dict] | None, str, dict]:
    """The prompt of a preference row from whichever shape it has (None: implicit), the field it
    came from (for error messages), and the row's tools."""
    tools = _row_tools(r)
    if r.has("prompt"):
        return _as_turns(r.get("prompt"), r.col("prompt"), "user", r), r.col("prompt"), tools
    if isinstance(r.row.get(r.col("input")), dict):
        messages, input_tools = _openai_input(r)
        return messages, "input.messages", tools or input_tools
    if r.has("messages"):  # ShareGPT preference: the conversation so far
        return _messages(r.get("messages"), r.col("messages"), r), r.col("messages"), tools
    if r.has("instruction"):  # Alpaca preference (LLaMA-Factory)
        return _alpaca_prompt(r), "history", tools
    return None, "prompt", tools


def _implicit_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The shared prefix of both conversations up to the last non-assistant turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    if n == 0:
        raise FormatError(
            "missing required field 'prompt' (and chosen/rejected share no prompt turns)", "prompt"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _preference(r: _Row) -> dict:
    cf, rf = r.col("chosen"), r.col("rejected")
    chosen = _as_turns(r.get("chosen"), cf, "assistant", r)
    rejected = _as_turns(r.get("rejected"), rf, "assistant", r)
    prompt, pf, tools = _pref_prompt(r)
    if prompt is None:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
    else:
        # Some datasets repeat the prompt at the head of chosen/rejected; strip it.
        n = len(prompt)
        if n and chosen[:n] == prompt and rejected[:n] == prompt:
            chosen, rejected = chosen[n:], rejected[n:]
    _check((pf, prompt), (cf, chosen))
    _check((pf, prompt), (rf, rejected))
    _needs_assistant(chosen, cf)
    _needs_assistant(rejected, rf)
    if chosen == rejected:
        raise FormatError(
            f"'{cf}' and '{rf}' are identical; a preference pair needs two different answers", "rejected"
        )
    return {"prompt": _with_system(r, prompt), "chosen": chosen, "rejected": rejected, **tools}


def _bool_label(value: Any, field: str) -> bool:
    """An unpaired preference label: true (desirable) or false; 0/1 and "true"/"false" accepted."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise FormatError(
        f"field '{field}' must be true or false (is the answer desirable?) in unpaired preference data, "
        f"got {value!r}; if this column is not a preference label, set the format (--format / "
        "data.format, e.g. chat)",
        "label",
    )


def _unpaired(r: _Row) -> dict:
    """TRL's unpaired preference (KTO): prompt/completion/label, or messages + label, where the
    completion is the last assistant turn and the prompt every turn before it; LLaMA-Factory's
    Alpaca KTO rows (instruction/input/output + kto_tag) too."""
    label = _bool_label(r.get("label"), r.col("label"))
    if r.has("messages") and not r.has("prompt"):
        prompt, completion, pf, cf = _split_last_turn(r)
    elif r.has("instruction") and not r.has("prompt"):
        prompt, pf, cf = _alpaca_prompt(r), "instruction", r.col("output")
        completion = [{"role": "assistant", "content": _text(r.get("output"), "output")}]
    else:
        pf, cf = r.col("prompt"), r.col("completion")
        prompt = _as_turns(r.get("prompt"), pf, "user", r)
        completion = _as_turns(r.get("completion"), cf, "assistant", r)
    if not prompt:
        raise FormatError("an unpaired preference row needs a prompt before the rated answer", "prompt")
    _check((pf, prompt), (cf, completion))
    _needs_assistant(completion, cf)
    tools = _row_tools(r)
    return {"prompt": _with_system(r, prompt), "completion": completion, "label": label, **tools}


def _split_last_turn(r: _Row) -> tuple[list[dict], list[dict], str, str]:
    field = r.col("messages")
    messages = _messages(r.get("messages"), field, r)
    if not messages or messages[-1]["role"] != "assistant":
        raise FormatError(f"field '{field}' must end with the assistant turn that the label rates", field)
    return messages[:-1], messages[-1:], field, field


def _prompt_only(r: _Row) -> dict:
    field = r.col("prompt")
    prompt = _as_turns(r.get("prompt"), field, "user", r)
    if not prompt:
        raise FormatError(f"field '{field}' is an empty list of messages", field)
    _check((field, prompt))
    return {"prompt": _with_system(r, prompt), **_row_tools(r)}


def _prompt_completion(r: _Row) -> dict:
    """TRL prompt-completion (strings or message lists) as one conversation."""
    pf, cf = r.col("prompt"), r.col("completion")
    prompt = _as_turns(r.get("prompt"), pf, "user", r)
    completion = _as_turns(r.get("completion"), cf, "assistant", r)
    _check((pf, prompt), (cf, completion))
    _needs_assistant(completion, cf)
    return {"messages": _with_system(r, prompt + completion), **_row_tools(r)}


def _classification(r: _Row) -> dict:
    text = _text(r.get("text"), "text")
    label = r.get("label")
    if isinstance(label, bool):
        # true/false is how unpaired preference (KTO) data marks answers; never guess it is a class.
        raise FormatError(
            f"field 'label' is {str(label).lower()} (a boolean); a classifier needs class names "
            '(write "true"/"false" as strings), and unpaired preference data needs prompt and '
            "completion (or messages) columns beside the label",
            "label",
        )
    if isinstance(label, int):  # class ids (0, 1, 2, ...) are labels as they are, not text to train on
        return {"text": text, "label": str(label)}
    return {"text": text, "label": _text(label, "label")}


_CANONICAL: dict[str, Callable[[_Row], dict]] = {
    "text": lambda r: {"text": _text(r.get("text"), "text")},
    "instruction": _instruction,
    "chat": _chat,
    "preference": _preference,
    "unpaired": _unpaired,
    "prompt": _prompt_only,
    "prompt_completion": _prompt_completion,
    "classification": _classification,
}


def to_canonical(row: dict, fmt: str, columns: dict[str, str] | None = None) -> dict:
    """Map one record to the canonical shape of ``fmt``'s kind (see the module docstring).

    Raises :class:`FormatError` naming the missing or malformed field; callers add file and line.
    """
    if fmt not in _CANONICAL:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return _CANONICAL[fmt](_Row(row, columns))


def used_columns(row: dict, fmt: str, columns: dict[str, str] | None = None) -> set[str]:
    """The top-level columns of ``row`` that ``fmt`` reads; callers report the rest as unused.

    For a row that does not fit the format, every column the format could read counts as used."""
    if fmt not in _CANONICAL:
        raise FormatError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    r = _Row(row, columns)
    try:
        _CANONICAL[fmt](r)
    except FormatError:
        fields = [a for f in REQUIRED[fmt] + OPTIONAL[fmt] for a in ALIASES.get(f, (f,))]
        r.used |= {r.columns.get(f, f) for f in fields}
    return r.used & set(row)


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


def _message_text(m: dict) -> str:
    """All the text of a message: reasoning, content, and each tool call as name + arguments."""
    parts = [m["reasoning_content"]] if m.get("reasoning_content") else []
    parts.append(m["content"])
    for call in m.get("tool_calls", ()):
        fn = call["function"]
        parts.append(f"{fn['name']} {json.dumps(fn['arguments'], ensure_ascii=False, sort_keys=True)}")
    return "\n".join(p for p in parts if p) if len(parts) > 1 else parts[0]


def _join(messages: list[dict]) -> str:
    return "\n".join(_message_text(m) for m in messages)


def canonical_text(c: dict) -> str:
    """All text of a canonical record, as compared by dedup and leakage checks."""
    if "messages" in c:
        return _join(c["messages"])
    if "chosen" in c:
        return "\n".join((_join(c["prompt"]), _join(c["chosen"]), _join(c["rejected"])))
    if "completion" in c:
        return "\n".join((_join(c["prompt"]), _join(c["completion"])))
    if "prompt" in c:
        return _join(c["prompt"])
    return c["text"]


def prompt_text(c: dict) -> str:
    """The input side of a canonical record (everything before the last assistant turn)."""
    if "messages" in c:
        msgs = c["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=len(msgs))
        return _join(msgs[:last])
    if "prompt" in c:
        return _join(c["prompt"])
    return c["text"]


def target_text(c: dict) -> str | None:
    """The trained-on side (last assistant turn / chosen answer / rated completion / label); None
    where nothing is a target (plain text, a prompt-only row)."""
    if "messages" in c:
        turns = [_message_text(m) for m in c["messages"] if m["role"] == "assistant"]
        return turns[-1] if turns else ""
    if "chosen" in c:
        return _join(c["chosen"])
    if "completion" in c:
        return _join(c["completion"])
    return c.get("label")
