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
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data import neardup, pii
from tunelab.data.audit import byte_stats, count_tokens, text_hash
from tunelab.data.formats import FormatError, canonical_text, detect_format, target_text, to_canonical
from tunelab.data.loaders import LoadReport, iter_records

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
) -> tuple[list[int], dict[int, dict], list[str | None], str]:
    """Pass 1: row numbers in order, drop decisions by row index, and labels."""
    rows: list[int] = []
    drops: dict[int, dict] = {}
    labels: list[str | None] = []
    hashes: list[int] = []
    sigs: list[np.ndarray] = []
    candidates: list[int] = []  # indices still kept after the per-row filters
    texts: list[str] = []
    idx_buf: list[int] = []

    def flush() -> None:
        if not texts:
            return
        if min_length is not None or max_length is not None:
            n = count_tokens(tokenizer, texts) if tokenizer is not None else byte_stats(texts)["words"]
            for k, length in zip(list(idx_buf), n.tolist(), strict=True):
                if min_length is not None and length < min_length:
                    drops[k] = {"reason": "too_short", "length": length}
                elif max_length is not None and length > max_length:
                    drops[k] = {"reason": "too_long", "length": length}
        keep = [j for j, k in enumerate(idx_buf) if k not in drops]
        if near and keep:
            sigs.append(neardup.minhash([texts[j] for j in keep]))
        for j in keep:
            candidates.append(idx_buf[j])
            hashes.append(text_hash(texts[j]))
        texts.clear()
        idx_buf.clear()

    for i, (row, rec) in enumerate(iter_records(path, skip_bad=skip_bad, report=load)):
        rows.append(row)
        if fmt is None:
            fmt = detect_format(rec, columns)
        try:
            c = to_canonical(rec, fmt, columns)
        except FormatError as e:
            drops[i] = {"reason": "format_error", "error": str(e)}
            labels.append(None)
            continue
        labels.append(c.get("label"))
        t = target_text(c)
        if drop_empty_targets and t is not None and not t.strip():
            drops[i] = {"reason": "empty_target"}
            continue
        texts.append(canonical_text(c))
        idx_buf.append(i)
        if len(texts) >= 8192:
            flush()
    flush()
    first_of: dict[int, int] = {}
    survivors = []
    for k, h in zip(candidates, hashes, strict=True):
        if exact and h in first_of:
            drops[k] = {"reason": "exact_duplicate", "duplicate_of": rows[first_of[h]]}
        else:
            first_of.setdefault(h, k)
            survivors.append(k)
    if near and survivors:
        all_sigs = np.concatenate(sigs)
        pos = {k: j for j, k in enumerate(candidates)}
        sel = np.array([pos[k] for k in survivors])
        res = neardup.near_duplicates(all_sigs[sel], near_threshold)
        for j in res.redundant_rows():
            drops[survivors[j]] = {"reason": "near_duplicate", "duplicate_of": rows[survivors[res.labels[j]]]}
    return rows, drops, labels, fmt or "text"


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
) -> dict:
    """Clean ``path`` into the JSONL file ``out``; log every dropped/changed/added row with its reason
    to ``changes_path`` (default: ``<out>.changes.jsonl``). Lengths are words, or tokens when a
    ``tokenizer`` is given. Returns the summary (also written to ``<out>.summary.json``)."""
    if rebalance is not None and rebalance not in REBALANCE:
        raise ValueError(f"rebalance must be one of {', '.join(REBALANCE)}, got {rebalance!r}")
    out = Path(out)
    changes_path = Path(changes_path) if changes_path else out.with_name(out.name + ".changes.jsonl")
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
    )
    extra: dict[int, int] = {}
    if rebalance:
        if fmt != "classification":
            raise ValueError(f"rebalancing needs classification data, this file is {fmt}")
        extra = _rebalance(rebalance, rows, drops, labels, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    dropped: Counter = Counter(d["reason"] for d in drops.values())
    changed: Counter = Counter()
    added: Counter = Counter()
    copies: list[tuple[int, int, dict]] = []
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fo, open(changes_path, "w", encoding="utf-8") as fc:

        def log(entry: dict) -> None:
            fc.write(json.dumps(entry, ensure_ascii=False) + "\n")

        if load.rows_rejected:
            log({"row": None, "action": "dropped", "reason": "unreadable", "count": load.rows_rejected})
        for i, (row, rec) in enumerate(iter_records(path, skip_bad=skip_bad)):
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
    os.replace(tmp, out)
    if load.rows_rejected:
        dropped["unreadable"] += load.rows_rejected
    input_rows = len(rows) + load.rows_rejected
    kept = input_rows - sum(dropped.values())
    summary = {
        "input": str(path),
        "output": str(out),
        "changes": str(changes_path),
        "format": fmt,
        "input_rows": input_rows,
        "kept": kept,
        "dropped": dict(sorted(dropped.items())),
        "changed": dict(changed),
        "added": dict(added),
        "output_rows": kept + sum(added.values()),
    }
    out.with_name(out.name + ".summary.json").write_text(
        json.dumps(summary, indent=2) + "\n", encoding="utf-8"
    )
    return summary
