"""Split a data file into train / validation / test without leaks.

Rows are first merged into *units* that must stay together: exact duplicates, rows with the
same prompt, near-duplicate clusters (MinHash/LSH, as in the audit) and, for ``by="group"``, rows
sharing the ``key`` value.
Units, not rows, are then assigned to splits: shuffled (random, group), shuffled within each
label (stratified), or in time order (time). Two streaming passes: the first decides, the
second writes each row to its file in its original shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data import neardup
from tunelab.data.audit import no_rows_reason
from tunelab.data.canonical import StreamOptions, stream_canonical
from tunelab.data.loaders import DataError, LoadReport, iter_records
from tunelab.data.outputs import atomic_open, check_output_dir, check_outputs

__all__ = ["SPLIT_NAMES", "STRATEGIES", "split", "parse_ratios", "split_names"]

STRATEGIES = ("random", "stratified", "group", "time")
SPLIT_NAMES = ("train", "validation", "test")


def parse_ratios(text: str | tuple[float, ...] | list[float]) -> tuple[float, ...]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1); two or three positive ratios summing to 1."""
    shown = text if isinstance(text, str) else ",".join(map(str, text))
    problem = f"--ratios must be 2 or 3 positive numbers summing to 1, e.g. 0.8,0.1,0.1; got '{shown}'"
    try:
        vals = tuple(float(x) for x in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        raise ValueError(problem) from None
    bad = any(not v > 0 or v == float("inf") for v in vals)  # "not >" also catches nan
    if not 2 <= len(vals) <= 3 or bad or abs(sum(vals) - 1) > 1e-6:
        raise ValueError(problem)
    return vals


def split_names(n: int) -> tuple[str, ...]:
    """File stems for ``n`` ratios: (train, validation) or (train, validation, test)."""
    return SPLIT_NAMES[:n]


def _timestamp(value: Any, row: int, key: str, path: str) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise DataError(path, row, str(value), f"column '{key}' is not a timestamp (number or ISO 8601)")


def _union(labels: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    # Re-use the neardup union-find on extra edges, starting from existing labels.
    n = len(labels)
    ii = np.concatenate([np.arange(n), i])
    jj = np.concatenate([labels, j])
    return neardup.cluster_labels(n, ii, jj)


def _edges_from_keys(keys: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    first: dict[Any, int] = {}
    i, j = [], []
    for k, key in enumerate(keys):
        f = first.setdefault(key, k)
        if f != k:
            i.append(f)
            j.append(k)
    return np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)


def _cut(units: list[int], sizes: np.ndarray, ratios: tuple[float, ...]) -> dict[int, int]:
    """Assign units in the given order to splits by cumulative row share (unit midpoints)."""
    if not units:
        return {}
    s = sizes[units].astype(float)
    mid = (np.cumsum(s) - s / 2) / s.sum()
    bounds = np.cumsum(ratios)[:-1]
    which = np.searchsorted(bounds, mid, side="right")
    return dict(zip(units, which.tolist(), strict=True))


@dataclass
class _Rows:
    """What the first pass keeps per row: no text, only hashes, keys, labels and signatures."""

    rows: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    prompts: list[Any] = field(default_factory=list)
    keys: list[Any] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    sigs: list[np.ndarray] = field(default_factory=list)


def _key_value(rec: dict, row: int, key: str, by: str, path: str) -> Any:
    if rec.get(key) is None:
        what = f"column '{key}' is null" if key in rec else f"missing key column '{key}'"
        raise DataError(path, row, "", f"{what}; --key needs a value in every row")
    return _timestamp(rec[key], row, key, path) if by == "time" else json.dumps(rec[key])


def _record_text(rec: dict) -> str:
    # A row that does not fit the format is still split: its whole record stands in for its text.
    return json.dumps(rec, sort_keys=True, ensure_ascii=False)


def _keyed(
    records: Iterator[tuple[int, dict]], r: _Rows, key: str, by: str, path: str
) -> Iterator[tuple[int, dict]]:
    """Pass records through, noting each one's ``key`` value. The value is read just after the
    record is handed on, so a bad one fails after the format is detected from the first row and
    before the next row is read, as if each row were handled whole before reading the next."""
    for row, rec in records:
        yield row, rec
        r.keys.append(_key_value(rec, row, key, by, path))


def _read(path: str, fmt: str | None, columns: dict[str, str] | None, by: str, key: str | None) -> _Rows:
    """Pass 1: hash, key and label every row, with MinHash signatures, one chunk at a time."""
    load = LoadReport()
    r = _Rows()
    records: Iterator[tuple[int, dict]] = iter_records(path, report=load)
    if key is not None:
        records = _keyed(records, r, key, by, path)
    options = StreamOptions(prompts=True, fallback=_record_text)
    for ch in stream_canonical(records, fmt, columns, source=path, options=options):
        r.rows += ch.rows
        r.hashes += ch.hashes.tolist()
        # Rows asking the same question stay together too (else the audit reports prompt leaks).
        for h, prompt, row in zip(ch.prompt_hashes.tolist(), ch.prompts, ch.rows, strict=True):
            r.prompts.append(h if prompt.strip() else ("row", row))
        for (_, rec), c in zip(ch.records, ch.canon, strict=True):  # with a fallback, every record
            r.labels.append(json.dumps(rec[key]) if (by == "stratified" and key) else c.get("label"))
        r.sigs.append(ch.sigs)
    if not r.rows:
        raise DataError(path, 0, "", no_rows_reason(load))
    if by == "stratified" and any(lab is None for lab in r.labels):
        raise ValueError("--by stratified needs classification data (a label) or --key COLUMN")
    return r


def _units(r: _Rows, by: str, near_threshold: float) -> np.ndarray:
    """Unit of each row: near-duplicate clusters + exact duplicates + identical prompts + shared keys."""
    all_sigs = np.concatenate(r.sigs) if r.sigs else np.zeros((0, neardup.NUM_PERM), np.uint32)
    unit = neardup.near_duplicates(all_sigs, near_threshold).labels
    for keys in (r.hashes, r.prompts, *([r.keys] if by == "group" else [])):
        unit = _union(unit, *_edges_from_keys(keys))
    return unit


def _assign(unit: np.ndarray, r: _Rows, by: str, seed: int, ratios: tuple[float, ...]) -> np.ndarray:
    """Split index of each row: whole units cut by cumulative share, in the order ``by`` asks."""
    sizes = np.bincount(unit, minlength=len(unit))
    roots = np.flatnonzero(sizes)
    rng = np.random.default_rng(seed)
    assign: dict[int, int] = {}
    if by == "time":
        first_time: dict[int, float] = {}
        for k, u in enumerate(unit.tolist()):
            first_time[u] = min(first_time.get(u, np.inf), r.keys[k])
        assign = _cut(sorted(roots.tolist(), key=lambda u: (first_time[u], u)), sizes, ratios)
    elif by == "stratified":
        by_label: dict[str, list[int]] = {}
        for u in roots.tolist():
            by_label.setdefault(r.labels[u], []).append(u)
        for _lab, us in sorted(by_label.items()):
            assign.update(_cut(rng.permutation(us).tolist(), sizes, ratios))
    else:
        assign = _cut(rng.permutation(roots).tolist(), sizes, ratios)
    return np.array([assign[u] for u in unit.tolist()], dtype=np.int64)


def split(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    ratios: str | tuple[float, ...] = (0.8, 0.1, 0.1),
    by: str = "random",
    key: str | None = None,
    seed: int = 0,
    fmt: str | None = None,
    columns: dict[str, str] | None = None,
    near_threshold: float = 0.8,
    overwrite: bool = False,
) -> dict:
    """Split ``path`` into ``train.jsonl``, ``validation.jsonl`` [, ``test.jsonl``] under ``out_dir``.

    ``by``: random | stratified (by the label, or by ``key``) | group (rows sharing ``key`` stay
    together) | time (``key`` is a timestamp; oldest rows go to train). Returns a summary, also
    written to ``out_dir/split.json``. Outputs are checked before any work: an input is never
    overwritten, an existing file only with ``overwrite`` (see :mod:`tunelab.data.outputs`).
    """
    ratios = _check_strategy(ratios, by, key)
    out = Path(out_dir)
    files = {name: out / f"{name}.jsonl" for name in split_names(len(ratios))}
    check_output_dir(out)
    check_outputs([path], [*files.values(), out / "split.json"], overwrite=overwrite)
    r = _read(str(path), fmt, columns, by, key)
    unit = _units(r, by, near_threshold)
    which = _assign(unit, r, by, seed, ratios)
    out.mkdir(parents=True, exist_ok=True)
    _write(path, files, which)
    n, n_units = len(r.rows), int(np.count_nonzero(np.bincount(unit, minlength=len(unit))))
    summary = {
        "input": str(path),
        "by": by,
        "key": key,
        "seed": seed,
        "ratios": list(ratios),
        "rows": n,
        "units": n_units,
        "rows_in_shared_units": n - n_units,
        "files": {name: str(f) for name, f in files.items()},
        "counts": dict(zip(files, np.bincount(which, minlength=len(files)).tolist(), strict=True)),
    }
    with atomic_open(out / "split.json") as fh:
        fh.write(json.dumps(summary, indent=2) + "\n")
    return summary


def _check_strategy(ratios: str | tuple[float, ...], by: str, key: str | None) -> tuple[float, ...]:
    """The parsed ratios, once ``by`` is known and has the ``key`` it needs."""
    parsed = parse_ratios(ratios)
    if by not in STRATEGIES:
        raise ValueError(f"--by must be one of {', '.join(STRATEGIES)}, got '{by}'")
    if by in ("group", "time") and not key:
        raise ValueError(f"--by {by} needs --key COLUMN")
    return parsed


def _write(path: str | os.PathLike, files: dict[str, Path], which: np.ndarray) -> None:
    """Pass 2: each row to its split's file, in its original shape and order."""
    names = list(files)
    with ExitStack() as stack:
        handles = {name: stack.enter_context(atomic_open(f)) for name, f in files.items()}
        for i, (_row, rec) in enumerate(iter_records(path)):
            handles[names[which[i]]].write(json.dumps(rec, ensure_ascii=False) + "\n")
