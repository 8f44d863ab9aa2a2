"""Clean a data file: drop unusable and duplicate rows, redact PII, optionally rebalance classes.

Two streaming passes over the input: the first decides the fate of every row (keeping only
hashes and MinHash signatures in memory), the second writes the kept rows in their original
shape and logs every drop, change and addition with its reason. The summary adds up:
``input_rows == kept + sum(dropped.values())`` and ``output_rows == kept + sum(added.values())``.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data import neardup, pii
from tunelab.data.audit import byte_stats, count_tokens, no_rows_reason
from tunelab.data.canonical import CanonicalChunk, StreamOptions, stream_canonical
from tunelab.data.formats import target_text
from tunelab.data.loaders import DataError, LoadReport, iter_records
from tunelab.data.outputs import atomic_open, check_outputs

__all__ = ["clean", "redact_record"]

REBALANCE = ("under", "over")


def redact_record(value: Any) -> tuple[Any, Counter]:
    """Redact PII in every string of a record (recursively); returns (new value, counts by kind)."""
    counts: Counter = Counter()
    if isinstance(value, str):
        found = pii.find_pii(value)
        if not found:
            return value, counts
        counts.update(f.kind for f in found)
        return pii.redact(value), counts
    if isinstance(value, list):
        out = []
        for v in value:
            nv, c = redact_record(v)
            out.append(nv)
            counts += c
        return out, counts
    if isinstance(value, dict):
        out_d = {}
        for k, v in value.items():
            nv, c = redact_record(v)
            out_d[k] = nv
            counts += c
        return out_d, counts
    return value, counts


@dataclass
class _Pass1:
    """What the first pass keeps: no text, only decisions, labels, hashes and signatures."""

    rows: list[int] = field(default_factory=list)  # row number of every record, in order
    drops: dict[int, dict] = field(default_factory=dict)  # record index -> why it is dropped
    labels: list[str | None] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)  # indices still kept after per-row filters
    hashes: list[int] = field(default_factory=list)  # ... their text hashes
    sigs: list[np.ndarray] = field(default_factory=list)  # ... and MinHash signatures, in order
    fmt: str | None = None


def _decide(
    path: str | os.PathLike,
    fmt: str | None,
    columns: dict[str, str] | None,
    *,
    exact: bool,
    near: bool,
    near_threshold: float,
    min_length: int | None,
    max_length: int | None,
    tokenizer: Any,
    drop_empty_targets: bool,
    skip_bad: bool,
    load: LoadReport,
    rejects_path: Path | None,
) -> tuple[list[int], dict[int, dict], list[str | None], str]:
    """Pass 1: row numbers in order, drop decisions by row index, and labels."""
    p = _Pass1(fmt=fmt)
    records = iter_records(path, skip_bad=skip_bad, report=load, rejects_path=rejects_path)
    for ch in stream_canonical(
        records, fmt, columns, source=str(path), options=StreamOptions(signatures=near)
    ):
        p.fmt = ch.fmt
        keep = _row_filters(ch, p, drop_empty_targets)
        keep = _length_filter(ch, keep, p, (min_length, max_length), tokenizer)
        offset, sel = len(p.rows), np.asarray(keep, dtype=np.intp)
        p.candidates += [offset + ch.index[j] for j in keep]
        p.hashes += ch.hashes[sel].tolist()
        if near and keep:
            p.sigs.append(ch.sigs[sel])
        p.rows += [row for row, _ in ch.records]
    _drop_duplicates(p, exact, near, near_threshold)
    return p.rows, p.drops, p.labels, p.fmt or "text"


def _row_filters(ch: CanonicalChunk, p: _Pass1, drop_empty_targets: bool) -> list[int]:
    """Drop the chunk's rows that do not fit the format (and, if asked, those with an empty
    target); note every record's label. Returns the positions in ``ch.canon`` still kept."""
    offset = len(p.rows)
    labels: list[str | None] = [None] * len(ch.records)
    for k, message in ch.errors:
        p.drops[offset + k] = {"reason": "format_error", "error": message}
    keep = []
    for j, (k, c) in enumerate(zip(ch.index, ch.canon, strict=True)):
        labels[k] = c.get("label")
        t = target_text(c)
        if drop_empty_targets and t is not None and not t.strip():
            p.drops[offset + k] = {"reason": "empty_target"}
        else:
            keep.append(j)
    p.labels += labels
    return keep


def _length_filter(
    ch: CanonicalChunk, keep: list[int], p: _Pass1, bounds: tuple[int | None, int | None], tokenizer: Any
) -> list[int]:
    """Drop kept rows shorter than ``min_length`` or longer than ``max_length`` (words, or tokens
    with a tokenizer); returns the positions still kept."""
    min_length, max_length = bounds
    if (min_length is None and max_length is None) or not keep:
        return keep
    texts = [ch.texts[j] for j in keep]
    n = count_tokens(tokenizer, texts) if tokenizer is not None else byte_stats(texts)["words"]
    offset, still = len(p.rows), []
    for j, length in zip(keep, n.tolist(), strict=True):
        if min_length is not None and length < min_length:
            p.drops[offset + ch.index[j]] = {"reason": "too_short", "length": length}
        elif max_length is not None and length > max_length:
            p.drops[offset + ch.index[j]] = {"reason": "too_long", "length": length}
        else:
            still.append(j)
    return still


def _drop_duplicates(p: _Pass1, exact: bool, near: bool, near_threshold: float) -> None:
    """Drop exact duplicates, then near duplicates among the rest; the first of each is kept."""
    first_of: dict[int, int] = {}
    survivors = []
    for k, h in zip(p.candidates, p.hashes, strict=True):
        if exact and h in first_of:
            p.drops[k] = {"reason": "exact_duplicate", "duplicate_of": p.rows[first_of[h]]}
        else:
            first_of.setdefault(h, k)
            survivors.append(k)
    if near and survivors:
        all_sigs = np.concatenate(p.sigs)
        pos = {k: j for j, k in enumerate(p.candidates)}
        sel = np.array([pos[k] for k in survivors])
        res = neardup.near_duplicates(all_sigs[sel], near_threshold)
        for j in res.redundant_rows():
            first = p.rows[survivors[res.labels[j]]]
            p.drops[survivors[j]] = {"reason": "near_duplicate", "duplicate_of": first}


def _rebalance(
    mode: str, rows: list[int], drops: dict[int, dict], labels: list[str | None], seed: int
) -> dict[int, int]:
    """Under-sampling adds drops; over-sampling returns {row index: extra copies}."""
    by_label: dict[str, list[int]] = {}
    for i, lab in enumerate(labels):
        if i not in drops and lab is not None:
            by_label.setdefault(lab, []).append(i)
    if not by_label:
        return {}
    rng = random.Random(seed)
    extra: Counter = Counter()
    if mode == "under":
        target = min(len(v) for v in by_label.values())
        for lab, idx in sorted(by_label.items()):
            for i in rng.sample(idx, len(idx) - target):
                drops[i] = {"reason": "rebalance_under", "label": lab}
    else:
        target = max(len(v) for v in by_label.values())
        for _lab, idx in sorted(by_label.items()):
            extra.update(rng.choices(idx, k=target - len(idx)))
    return dict(extra)


def check_lengths(min_length: int | None, max_length: int | None) -> None:
    """Length bounds are non-negative and ordered (else every row would silently be dropped)."""
    for name, v in (("--min-length", min_length), ("--max-length", max_length)):
        if v is not None and v < 0:
            raise ValueError(f"{name} must be 0 or more, got {v}")
    if min_length is not None and max_length is not None and min_length > max_length:
        raise ValueError(f"--min-length ({min_length}) is larger than --max-length ({max_length})")


def output_paths(out: Path, changes_path: str | os.PathLike | None, skip_bad: bool) -> dict[str, Path]:
    """Every file ``clean`` writes: the data, the changes log, the summary and (with skip_bad) rejects."""
    paths = {
        "output": out,
        "changes": Path(changes_path) if changes_path else out.with_name(out.name + ".changes.jsonl"),
        "summary": out.with_name(out.name + ".summary.json"),
    }
    if skip_bad:
        paths["rejects"] = out.with_name(out.name + ".rejects.jsonl")
    return paths


def clean(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    changes_path: str | os.PathLike | None = None,
    fmt: str | None = None,
    columns: dict[str, str] | None = None,
    exact: bool = True,
    near: bool = True,
    near_threshold: float = 0.8,
    min_length: int | None = None,
    max_length: int | None = None,
    tokenizer: Any = None,
    redact_pii: bool = True,
    drop_empty_targets: bool = True,
    rebalance: str | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    overwrite: bool = False,
) -> dict:
    """Clean ``path`` into the JSONL file ``out``; log every dropped/changed/added row with its reason
    to ``changes_path`` (default: ``<out>.changes.jsonl``). Lengths are words, or tokens when a
    ``tokenizer`` is given. With ``skip_bad``, unreadable rows go to ``<out>.rejects.jsonl``.
    Outputs are checked first (see :mod:`tunelab.data.outputs`): an input is never overwritten, an
    existing file only with ``overwrite``. Returns the summary (also ``<out>.summary.json``)."""
    if rebalance is not None and rebalance not in REBALANCE:
        raise ValueError(f"--rebalance must be one of {', '.join(REBALANCE)}, got {rebalance!r}")
    check_lengths(min_length, max_length)
    paths = output_paths(Path(out), changes_path, skip_bad)
    check_outputs([path], list(paths.values()), overwrite=overwrite)
    load = LoadReport()
    rows, drops, labels, fmt = _decide(
        path,
        fmt,
        columns,
        exact=exact,
        near=near,
        near_threshold=near_threshold,
        min_length=min_length,
        max_length=max_length,
        tokenizer=tokenizer,
        drop_empty_targets=drop_empty_targets,
        skip_bad=skip_bad,
        load=load,
        rejects_path=paths.get("rejects"),
    )
    if not rows:
        raise DataError(path, 0, "", no_rows_reason(load))
    extra: dict[int, int] = {}
    if rebalance:
        if fmt != "classification":
            raise ValueError(f"--rebalance needs classification data, this file is {fmt}")
        extra = _rebalance(rebalance, rows, drops, labels, seed)
    paths["output"].parent.mkdir(parents=True, exist_ok=True)
    counts = _write(path, paths, drops, extra, redact_pii, skip_bad)
    summary = _summary(path, paths, fmt, len(rows), drops, load, counts)
    with atomic_open(paths["summary"]) as fh:
        fh.write(json.dumps(summary, indent=2) + "\n")
    return summary


def _summary(
    path: str | os.PathLike,
    paths: dict[str, Path],
    fmt: str,
    n_rows: int,
    drops: dict[int, dict],
    load: LoadReport,
    counts: dict[str, Counter],
) -> dict:
    """The summary; it adds up: input = kept + dropped, output = kept + added."""
    dropped: Counter = Counter(d["reason"] for d in drops.values())
    if load.rows_rejected:
        dropped["unreadable"] += load.rows_rejected
    input_rows = n_rows + load.rows_rejected
    kept = input_rows - sum(dropped.values())
    return {
        "input": str(path),
        "output": str(paths["output"]),
        "changes": str(paths["changes"]),
        "rejects": str(paths["rejects"]) if load.rows_rejected else None,
        "format": fmt,
        "input_rows": input_rows,
        "kept": kept,
        "dropped": dict(sorted(dropped.items())),
        "changed": dict(counts["changed"]),
        "added": dict(counts["added"]),
        "output_rows": kept + sum(counts["added"].values()),
    }


def _write(
    path: str | os.PathLike,
    paths: dict[str, Path],
    drops: dict[int, dict],
    extra: dict[int, int],
    redact_pii: bool,
    skip_bad: bool,
) -> dict[str, Counter]:
    """Pass 2: write kept rows in their original shape and log every change, one line per row."""
    changed: Counter = Counter()
    added: Counter = Counter()
    copies: list[tuple[int, int, dict]] = []
    with atomic_open(paths["output"]) as fo, atomic_open(paths["changes"]) as fc:

        def log(entry: dict) -> None:
            fc.write(json.dumps(entry, ensure_ascii=False) + "\n")

        def rejected(line: int, reason: str, raw: str) -> None:
            log({"row": line, "action": "dropped", "reason": "unreadable", "error": reason})

        for i, (row, rec) in enumerate(iter_records(path, skip_bad=skip_bad, on_reject=rejected)):
            if i in drops:
                log({"row": row, "action": "dropped", **drops[i]})
                continue
            if redact_pii:
                rec, counts = redact_record(rec)
                if counts:
                    changed["pii_redacted"] += 1
                    log({"row": row, "action": "changed", "reason": "pii_redacted", "pii": dict(counts)})
            fo.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if i in extra:
                copies.append((i, row, rec))
        for i, row, rec in copies:
            for _ in range(extra[i]):
                fo.write(json.dumps(rec, ensure_ascii=False) + "\n")
                added["rebalance_over"] += 1
                log({"row": row, "action": "added", "reason": "rebalance_over"})
    return {"changed": changed, "added": added}
