"""`tunelab data convert`: any supported input written as canonical JSONL or in another tool's format.

Every row goes through the one reading path (:func:`tunelab.data.formats.to_canonical`), then is
written in the target shape:

- ``canonical``: the canonical row itself (see :mod:`tunelab.data.formats`);
- ``openai``: OpenAI fine-tuning JSONL (``messages`` with ``tool_calls`` arguments as JSON strings;
  preference as ``input`` / ``preferred_output`` / ``non_preferred_output``);
- ``sharegpt``: LLaMA-Factory's ShareGPT (``conversations`` of from/value, ``function_call`` and
  ``observation`` turns, ``system`` and ``tools`` columns; preference with one ``chosen``/``rejected``
  message; unpaired with ``kto_tag``);
- ``alpaca``: LLaMA-Factory's Alpaca (``instruction``/``input``/``output``, ``system``, ``history``;
  ``chosen``/``rejected``; ``kto_tag``).

A row the target cannot express (a preference row as alpaca chat, a tool call as alpaca) and a row
that does not fit its format are not written: each is counted and written to ``OUT.rejects.jsonl``
as ``{"file", "line", "reason", "record"}`` (unreadable lines, with ``skip_bad``, as ``"raw"``).
The output is written atomically and never over an input (see :mod:`tunelab.data.outputs`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from tunelab.data.audit import no_rows_reason
from tunelab.data.formats import FORMATS, KIND, FormatError, detect_file_format, to_canonical
from tunelab.data.loaders import DataError, LoadReport, iter_records
from tunelab.data.outputs import atomic_open, check_outputs

__all__ = ["TARGETS", "ConvertError", "convert", "from_canonical", "rejects_path"]

TARGETS = ("canonical", "sharegpt", "openai", "alpaca")


class ConvertError(ValueError):
    """A canonical row that the target format cannot express."""


def rejects_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".rejects.jsonl")


# ---- canonical -> OpenAI -------------------------------------------------------------------------


def _openai_message(m: dict) -> dict:
    out = dict(m)
    if "tool_calls" in m:
        out["tool_calls"] = [
            {**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
            for c in m["tool_calls"]
        ]
    return out


def _to_openai(c: dict, kind: str) -> dict:
    tools = {"tools": c["tools"]} if "tools" in c else {}
    if kind == "chat":
        return {"messages": [_openai_message(m) for m in c["messages"]], **tools}
    if kind == "preference":
        return {
            "input": {"messages": [_openai_message(m) for m in c["prompt"]], **tools},
            "preferred_output": [_openai_message(m) for m in c["chosen"]],
            "non_preferred_output": [_openai_message(m) for m in c["rejected"]],
        }
    raise ConvertError(f"OpenAI fine-tuning has no {kind} format (only chat and preference)")


# ---- canonical -> ShareGPT -----------------------------------------------------------------------

_FROM = {"user": "human", "assistant": "gpt", "system": "system", "tool": "observation"}


def _sharegpt_message(m: dict) -> dict:
    extra = {k: m[k] for k in ("tool_call_id", "name", "reasoning_content", "weight") if k in m}
    if "tool_calls" not in m:
        return {"from": _FROM[m["role"]], "value": m["content"], **extra}
    if m["content"]:
        raise ConvertError("ShareGPT has no turn with both text and a tool call (use --to openai)")
    calls = [{**({"id": c["id"]} if "id" in c else {}), **c["function"]} for c in m["tool_calls"]]
    value = json.dumps(calls[0] if len(calls) == 1 else calls, ensure_ascii=False)
    return {"from": "function_call", "value": value, **extra}


def _sharegpt_turns(messages: list[dict]) -> tuple[dict, list[dict]]:
    """A leading system message becomes the ``system`` column, as LLaMA-Factory writes it."""
    if messages and messages[0]["role"] == "system":
        return {"system": messages[0]["content"]}, [_sharegpt_message(m) for m in messages[1:]]
    return {}, [_sharegpt_message(m) for m in messages]


def _one(messages: list[dict], field: str, target: str) -> dict:
    if len(messages) != 1:
        raise ConvertError(f"{target} holds one {field} message; this row has {len(messages)}")
    return messages[0]


def _to_sharegpt(c: dict, kind: str) -> dict:
    tools = {"tools": json.dumps(c["tools"], ensure_ascii=False)} if "tools" in c else {}
    if kind == "chat":
        system, turns = _sharegpt_turns(c["messages"])
        return {"conversations": turns, **system, **tools}
    if kind == "preference":
        system, turns = _sharegpt_turns(c["prompt"])
        chosen = _sharegpt_message(_one(c["chosen"], "chosen", "ShareGPT preference"))
        rejected = _sharegpt_message(_one(c["rejected"], "rejected", "ShareGPT preference"))
        return {"conversations": turns, "chosen": chosen, "rejected": rejected, **system, **tools}
    if kind == "unpaired":
        _one(c["completion"], "completion", "ShareGPT KTO")
        system, turns = _sharegpt_turns(c["prompt"] + c["completion"])
        return {"conversations": turns, "kto_tag": c["label"], **system, **tools}
    raise ConvertError(f"ShareGPT has no {kind} format (only chat, preference and unpaired)")


# ---- canonical -> Alpaca -------------------------------------------------------------------------


def _plain(m: dict) -> str:
    extra = [k for k in ("tool_calls", "tool_call_id", "name", "reasoning_content", "weight") if k in m]
    if m["role"] == "tool" or extra:
        raise ConvertError(f"Alpaca has no place for {', '.join(extra) or 'tool results'} (use --to openai)")
    return m["content"]


def _alpaca_prompt(prompt: list[dict]) -> dict:
    """system?, then [user, assistant] pairs as ``history``, then the last user turn."""
    out: dict[str, Any] = {}
    if prompt and prompt[0]["role"] == "system":
        out["system"], prompt = _plain(prompt[0]), prompt[1:]
    roles = [m["role"] for m in prompt]
    if not prompt or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise ConvertError("Alpaca needs alternating user/assistant turns that end with a user turn")
    pairs = [[_plain(prompt[i]), _plain(prompt[i + 1])] for i in range(0, len(prompt) - 1, 2)]
    return {"instruction": _plain(prompt[-1]), "input": "", **out, **({"history": pairs} if pairs else {})}


def _to_alpaca(c: dict, kind: str) -> dict:
    if "tools" in c:
        raise ConvertError("Alpaca has no tools column (use --to sharegpt or openai)")
    if kind == "chat":
        messages = c["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ConvertError("Alpaca needs the conversation to end with an assistant turn")
        return {**_alpaca_prompt(messages[:-1]), "output": _plain(messages[-1])}
    if kind == "preference":
        chosen = _plain(_one(c["chosen"], "chosen", "Alpaca preference"))
        rejected = _plain(_one(c["rejected"], "rejected", "Alpaca preference"))
        return {**_alpaca_prompt(c["prompt"]), "chosen": chosen, "rejected": rejected}
    if kind == "unpaired":
        output = _plain(_one(c["completion"], "completion", "Alpaca KTO"))
        return {**_alpaca_prompt(c["prompt"]), "output": output, "kto_tag": c["label"]}
    raise ConvertError(f"Alpaca has no {kind} format (only chat, preference and unpaired)")


_WRITERS: dict[str, Callable[[dict, str], dict]] = {
    "canonical": lambda c, kind: c,
    "openai": _to_openai,
    "sharegpt": _to_sharegpt,
    "alpaca": _to_alpaca,
}


def from_canonical(c: dict, kind: str, to: str) -> dict:
    """One canonical row of ``kind`` in the ``to`` format; :class:`ConvertError` if it has none."""
    return _WRITERS[to](c, kind)


# ---- the command -----------------------------------------------------------------------------------


class _Rejects:
    """OUT.rejects.jsonl, opened (atomically) at the first rejected row only."""

    def __init__(self, path: Path, stack: ExitStack):
        self.path, self.stack, self.n = path, stack, 0
        self._fh: IO[str] | None = None

    def add(self, entry: dict) -> None:
        if self._fh is None:
            self._fh = self.stack.enter_context(atomic_open(self.path))
        self.n += 1
        self._fh.write(json.dumps(entry, ensure_ascii=False) + "\n")


def convert(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    to: str = "canonical",
    fmt: str | None = None,
    columns: dict[str, str] | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write ``path`` to the JSONL file ``out`` in the ``to`` format; returns the summary.

    ``fmt`` None detects the format from the first row. Rows that do not fit the format or that
    ``to`` cannot express go to ``OUT.rejects.jsonl`` (written only when there are some; an old one
    is removed with ``overwrite``), with ``skip_bad`` so do unreadable lines.
    """
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got '{to}'")
    fmt = None if fmt == "auto" else fmt
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)} (or auto), got '{fmt}'")
    out, rejects = Path(out), rejects_path(out)
    check_outputs([path], [out, rejects], overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = LoadReport()
    with ExitStack() as stack:
        rej = _Rejects(rejects, stack)

        def unreadable(line: int, reason: str, raw: str) -> None:
            rej.add({"file": str(path), "line": line, "reason": reason, "raw": raw})

        records = iter_records(path, skip_bad=skip_bad, report=load, on_reject=unreadable)
        with atomic_open(out) as fh:
            written, fmt = _write_rows(records, fh, rej, path, fmt, columns, to)
            if not load.rows_read:  # raised inside: no output and no rejects file are left
                raise DataError(path, 0, "", no_rows_reason(load))
    if rej.n == 0 and overwrite:
        rejects.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
    return {
        "input": str(path),
        "output": str(out),
        "format": fmt,
        "to": to,
        "rows_read": load.rows_read + load.rows_rejected,
        "rows_written": written,
        "rows_rejected": rej.n,
        "rejects": str(rejects) if rej.n else None,
    }


def _write_rows(
    records, fh: IO[str], rej: _Rejects, path, fmt: str | None, columns, to: str
) -> tuple[int, str | None]:
    written = 0
    for line, record in records:
        if fmt is None:
            fmt = detect_file_format(str(path), line, record, columns)
        try:
            row = from_canonical(to_canonical(record, fmt, columns), KIND[fmt], to)
        except (FormatError, ConvertError) as e:
            rej.add({"file": str(path), "line": line, "reason": str(e), "record": record})
            continue
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        written += 1
    return written, fmt
