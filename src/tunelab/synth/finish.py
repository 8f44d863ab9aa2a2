"""The closing audit every data-making command runs on what it made, before anything is written.

Generated rows are checked with the audit's own machinery (canonical text and hashes, MinHash from
:mod:`tunelab.data.neardup`, the PII scanner, the leakage test against an eval file) and every row
the audit would flag is dropped, so a command never counts, or writes, a row that ``data audit``
would then complain about. Checks, in order (a row is dropped for the first that fires):

- ``format_error``: the row does not fit its data format;
- ``empty_output``: the trained-on side (answer, chosen or rejected reply, label) is blank;
- ``control_chars`` / ``replacement_char`` / ``mojibake`` / ``too_short``: what the audit's hygiene
  check flags (a control character, U+FFFD, UTF-8 read as Latin-1, fewer than three words);
- ``pii``: an e-mail address, phone number, card number, IP address or IBAN in the text;
- ``eval_leak``: the row's text or prompt equals an ``--eval`` row's, or is a MinHash near-duplicate
  of one (``kind`` says which);
- ``exact_duplicate`` / ``near_duplicate``: the same (or nearly the same) text as an earlier kept row.

Kept rows go to the output (atomically; an input is never overwritten); every dropped row, those
the command's own filters dropped included, goes with its reason to ``OUT.rejects.jsonl`` beside it.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from tunelab.console import make_console
from tunelab.data import neardup, pii
from tunelab.data.audit import SHORT_WORDS, byte_stats
from tunelab.data.canonical import StreamOptions, stream_canonical
from tunelab.data.formats import target_text
from tunelab.data.loaders import iter_records
from tunelab.data.outputs import atomic_open, check_outputs

NEAR_THRESHOLD = 0.8  # the audit's default MinHash similarity for "near duplicate"


def rejects_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".rejects.jsonl")


def check_paths(
    out: str | os.PathLike,
    inputs: Sequence[str | os.PathLike | None],
    *,
    overwrite: bool,
    eval_path: str | os.PathLike | None = None,
) -> None:
    """Before any model call: the output and its rejects file may be written (never over an input),
    and the eval file, if any, can be read (so a typo fails now, not after the generation)."""
    check_outputs([p for p in (*inputs, eval_path) if p], [out, rejects_path(out)], overwrite=overwrite)
    if eval_path:
        _canonicalise(iter_records(eval_path), str(eval_path))


@dataclass
class _Canon:
    """The audit's view of a set of rows: canonical form, hashes and MinHash signatures, by position."""

    canon: dict[int, dict] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)
    hashes: dict[int, int] = field(default_factory=dict)
    prompt_hashes: dict[int, int] = field(default_factory=dict)
    sigs: dict[int, np.ndarray] = field(default_factory=dict)


def _canonicalise(records: Iterable[tuple[int, dict]], source: str) -> _Canon:
    out = _Canon()
    for ch in stream_canonical(records, None, None, source=source, options=StreamOptions(prompts=True)):
        for k, message in ch.errors:
            out.errors[ch.records[k][0]] = message
        for j, row in enumerate(ch.rows):
            out.canon[row], out.texts[row] = ch.canon[j], ch.texts[j]
            out.hashes[row] = int(ch.hashes[j])
            out.prompt_hashes[row] = int(ch.prompt_hashes[j])  # type: ignore[index]
            out.sigs[row] = ch.sigs[j]  # type: ignore[index]
    return out


def _is_empty(c: dict) -> bool:
    if "chosen" in c:  # a pair needs both replies
        return not target_text(c).strip() or not target_text({"chosen": c["rejected"]}).strip()
    target = target_text(c)
    return target is not None and not target.strip()


TARGET_FIELDS = ("output", "completion", "label", "chosen", "rejected", "response")


def _blank_target(record: dict) -> bool:
    """A blank answer column; canonicalising calls it a format error, the audit an empty output."""
    return any(isinstance(record.get(k), str) and not record[k].strip() for k in TARGET_FIELDS)


def _row_checks(rows: Sequence[dict], view: _Canon, drops: dict[int, dict]) -> None:
    """Format errors, empty outputs and PII, row by row."""
    for row, message in view.errors.items():
        blank = _blank_target(rows[row])
        drops[row] = {"reason": "empty_output"} if blank else {"reason": "format_error", "error": message}
    for row, c in view.canon.items():
        if _is_empty(c):
            drops[row] = {"reason": "empty_output"}
    _hygiene_checks(view, drops)
    rows = [r for r in view.texts if r not in drops]
    for k, matches in pii.scan([view.texts[r] for r in rows]):
        drops[rows[k]] = {"reason": "pii", "kinds": sorted({m.kind for m in matches})}


HYGIENE = ("control_chars", "replacement_char", "mojibake", "too_short")  # the audit's hygiene keys


def _hygiene_checks(view: _Canon, drops: dict[int, dict]) -> None:
    """Text the audit flags under ``hygiene``: control characters, U+FFFD, mojibake, fewer than
    ``SHORT_WORDS`` words (``too_long`` is relative to the file's median, so it is reported only)."""
    rows = [r for r in view.texts if r not in drops]
    stats = byte_stats([view.texts[r] for r in rows])
    hits = {
        "control_chars": stats["control"],
        "replacement_char": stats["replacement"],
        "mojibake": stats["mojibake"],
        "too_short": stats["words"] < SHORT_WORDS,
    }
    for k, r in enumerate(rows):
        reason = next((name for name in HYGIENE if hits[name][k]), None)
        if reason is not None:
            drops[r] = {"reason": reason}


def _leak_checks(view: _Canon, ev: _Canon, drops: dict[int, dict], threshold: float) -> None:
    """Rows whose text or prompt equals an eval row's, or that are near-duplicates of one."""
    eval_rows = {h: r for r, h in _first_rows(ev.hashes)}
    eval_prompts = {h: r for r, h in _first_rows(ev.prompt_hashes)}
    rows = [r for r in view.texts if r not in drops]
    for r in rows:
        if view.hashes[r] in eval_rows:
            drops[r] = {"reason": "eval_leak", "kind": "exact", "eval_row": eval_rows[view.hashes[r]]}
        elif view.texts[r].strip() and view.prompt_hashes[r] in eval_prompts:
            drops[r] = {
                "reason": "eval_leak",
                "kind": "prompt",
                "eval_row": eval_prompts[view.prompt_hashes[r]],
            }
    rows = [r for r in rows if r not in drops]
    eval_order = list(ev.sigs)
    if not rows or not eval_order:
        return
    a = np.stack([view.sigs[r] for r in rows])
    i, j, sim = neardup.cross_duplicates(a, np.stack([ev.sigs[r] for r in eval_order]), threshold)
    for k in np.argsort(-sim, kind="stable"):
        drops.setdefault(
            rows[i[k]],
            {
                "reason": "eval_leak",
                "kind": "near",
                "eval_row": eval_order[j[k]],
                "similarity": round(float(sim[k]), 3),
            },
        )


def _first_rows(values: dict[int, int]) -> list[tuple[int, int]]:
    """(row, hash) pairs, last row first, so a dict built from them keeps each hash's first row."""
    return sorted(values.items(), reverse=True)


def _duplicate_checks(view: _Canon, drops: dict[int, dict], threshold: float) -> None:
    """Exact, then near duplicates among the rows still kept; the first of each group stays."""
    first_of: dict[int, int] = {}
    survivors = []
    for r in sorted(view.texts):
        if r in drops:
            continue
        if view.hashes[r] in first_of:
            drops[r] = {"reason": "exact_duplicate", "duplicate_of": first_of[view.hashes[r]]}
        else:
            first_of[view.hashes[r]] = r
            survivors.append(r)
    if len(survivors) < 2:
        return
    result = neardup.near_duplicates(np.stack([view.sigs[r] for r in survivors]), threshold)
    for k in result.redundant_rows():
        drops[survivors[k]] = {"reason": "near_duplicate", "duplicate_of": survivors[result.labels[k]]}


def audit_drops(
    rows: Sequence[dict],
    *,
    eval_path: str | os.PathLike | None = None,
    near_threshold: float = NEAR_THRESHOLD,
) -> dict[int, dict]:
    """What the audit would drop: {position in ``rows``: {"reason": ..., details}}."""
    view = _canonicalise(((i, r) for i, r in enumerate(rows)), "<generated rows>")
    drops: dict[int, dict] = {}
    _row_checks(rows, view, drops)
    if eval_path:
        ev = _canonicalise(iter_records(eval_path), str(eval_path))
        _leak_checks(view, ev, drops, near_threshold)
    _duplicate_checks(view, drops, near_threshold)
    return drops


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def finish(
    rows: Sequence[dict],
    out_path: str | os.PathLike,
    *,
    eval_path: str | os.PathLike | None = None,
    kind: str,
    dropped: Sequence[dict] = (),
    inputs: Sequence[str | os.PathLike | None] = (),
    near_threshold: float = NEAR_THRESHOLD,
    limit: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Audit ``rows``, write the kept ones to ``out_path`` and every drop to ``OUT.rejects.jsonl``.

    Call :func:`check_paths` before generating: this refuses to write over an input, but replaces
    an existing output (the command has checked ``--overwrite`` by then).

    ``dropped`` are the rows the command's own filters already dropped (each a dict with a
    ``reason``); they are counted and written to the rejects file too. ``limit`` keeps at most that
    many rows (the first clean ones). Returns the summary and
    prints it as a table of kept/dropped by reason.
    """
    out = Path(out_path)
    check_outputs([p for p in (*inputs, eval_path) if p], [out, rejects_path(out)], overwrite=True)
    drops = audit_drops(rows, eval_path=eval_path, near_threshold=near_threshold)
    clean = [i for i in range(len(rows)) if i not in drops]
    # With a limit (``--n``), rows after the limit-th clean one were made but are not needed: neither
    # kept nor counted as dropped.
    cut = clean[limit - 1] + 1 if limit is not None and len(clean) > limit else len(rows)
    kept = [rows[i] for i in clean if i < cut]
    audit_rejects = [{"stage": "audit", **drops[i], "row": rows[i]} for i in sorted(drops) if i < cut]
    rejects = [{"stage": kind, **entry} for entry in dropped] + audit_rejects
    _write_jsonl(out, kept)
    _write_jsonl(rejects_path(out), rejects)
    summary = {
        "command": kind,
        "output": str(out),
        "rejects": str(rejects_path(out)),
        "kept": len(kept),
        "dropped": dict(sorted(Counter(str(e["reason"]) for e in rejects).items())),
        "dropped_by": _by_stage(rejects),
    }
    print_summary(console or make_console(), summary)
    return summary


def _by_stage(rejects: list[dict]) -> dict[str, dict[str, int]]:
    """{stage: {reason: count}}: the command's own filters, then the closing audit."""
    out: dict[str, Counter] = {}
    for entry in rejects:
        out.setdefault(str(entry["stage"]), Counter())[str(entry["reason"])] += 1
    return {stage: dict(sorted(counts.items())) for stage, counts in out.items()}


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    """kept, then dropped by stage and reason, e.g. ``dropped (audit): eval_leak  3``."""
    table = Table(title=f"{summary['command']}: {summary['output']}", title_justify="left")
    table.add_column("rows")
    table.add_column("count", justify="right")
    table.add_row("kept", str(summary["kept"]))
    for stage, counts in summary["dropped_by"].items():
        for reason, count in counts.items():
            table.add_row(f"dropped ({stage}): {reason}", str(count))
    console.print(table)
