"""Read records from JSONL, JSON, CSV/TSV, Parquet, `datasets` directories and hub ids.

Every loader yields ``(row, record)`` pairs, where ``row`` is the 1-based line number (JSONL,
CSV/TSV: the physical line the record starts on) or the 1-based element/row number (JSON arrays,
Parquet, `datasets`). Large inputs are streamed: JSONL line by line, CSV through the `csv` module,
Parquet one record batch at a time, `datasets` directories through their memory-mapped Arrow
files. A JSON *array* must be parsed whole (the standard library has no streaming JSON parser);
use JSONL for big data.

A malformed line raises :class:`DataError` naming the file, the line and a snippet. With
``skip_bad=True`` the line is written to a rejects JSONL instead (``{"file", "line", "reason", "raw"}``)
and counted in the :class:`LoadReport` passed as ``report``.

A record nested deeper than :data:`MAX_DEPTH` levels is a bad row like any other: the JSON parser
and everything after it (redaction, writing) recurse, so such a row would otherwise crash later.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tunelab.console import escape_controls

__all__ = ["DataError", "LoadReport", "iter_records", "load_records", "SUFFIXES"]

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PARQUET_BATCH = 4096
MAX_DEPTH = 100  # nesting levels a record may have; real data uses fewer than 10
_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")

OnReject = Callable[[int, str, str], None]  # (line, reason, raw text) of each skipped row


class DataError(ValueError):
    """A problem with an input file, located by ``path``, ``line`` (1-based; 0 = whole file)
    and a short ``snippet`` of the offending text."""

    def __init__(self, path: str | os.PathLike, line: int, snippet: str, reason: str):
        self.path = str(path)
        self.line = line
        self.snippet = _snip(snippet)
        self.reason = reason
        where = f"{self.path}:{line}" if line else self.path
        text = f"{where}: {reason}"
        if self.snippet:
            text += f" (near: '{self.snippet}')"
        super().__init__(text)


@dataclass
class LoadReport:
    """Counts filled in by :func:`iter_records` while it reads.

    ``rows_read + rows_rejected + blank_lines`` equals the number of lines of a JSONL file.
    """

    path: str = ""
    rows_read: int = 0
    rows_rejected: int = 0
    blank_lines: int = 0
    rejects_path: str | None = None
    notes: list[str] = field(default_factory=list)
    unused_columns: dict[str, int] = field(default_factory=dict)  # column -> rows it was not read in


def _snip(text: str, width: int = 80) -> str:
    # Printable text stays as written (brackets, backslashes, emoji codes); control characters
    # are shown escaped so a snippet is one line and cannot drive the terminal.
    text = escape_controls(text[: width * 4])  # bound the work on a huge line before escaping
    return text if len(text) <= width else text[: width - 3] + "..."


class _Rejects:
    """Routes bad rows to an exception or, with skip_bad, to a rejects JSONL file."""

    def __init__(
        self,
        path: Path,
        skip_bad: bool,
        rejects_path: str | os.PathLike | None,
        report: LoadReport,
        on_reject: OnReject | None = None,
    ):
        self.path, self.skip_bad, self.report = path, skip_bad, report
        self.rejects_path = Path(rejects_path) if rejects_path else None
        self.on_reject = on_reject
        self._fh: IO[str] | None = None

    def bad(self, line: int, raw: str, reason: str) -> None:
        if not self.skip_bad:
            raise DataError(self.path, line, raw, reason)
        self.report.rows_rejected += 1
        if self.on_reject is not None:
            self.on_reject(line, reason, raw)
        if self.rejects_path is None:
            return
        if self._fh is None:
            self.rejects_path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.rejects_path, "w", encoding="utf-8")  # noqa: SIM115
            self.report.rejects_path = str(self.rejects_path)
        entry = {"file": str(self.path), "line": line, "reason": reason, "raw": raw}
        self._fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def _decode(raw: bytes, first: bool) -> tuple[str | None, str]:
    """Decode one line; returns (text, "") or (None, reason)."""
    if first and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        return raw.decode("utf-8"), ""
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 byte {raw[e.start : e.start + 1]!r} at column {e.start + 1}"


def too_deep(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """True when ``obj`` nests lists/dicts more than ``limit`` levels (checked without recursion)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values() if isinstance(v, (dict, list)))
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value if isinstance(v, (dict, list)))
    return False


class _NonFinite:
    """A ``NaN``/``Infinity`` constant as parsed: not JSON, so the row it is in is rejected."""

    def __init__(self, name: str):
        self.name = name

    def __str__(self) -> str:
        return self.name


class _Duplicated(dict):
    """An object that had a key twice (the standard parser keeps the last value silently)."""

    duplicate = ""


class _Decoder:
    """``json`` with the two leniencies of Python's parser turned into row errors: duplicate keys
    and the ``NaN``/``Infinity`` constants (both are outside JSON, RFC 8259). A lone surrogate
    escape (``"\\ud800"``) is found afterwards: it parses, then fails whoever writes the text."""

    def __init__(self) -> None:
        self.flaws = 0
        self._json = json.JSONDecoder(object_pairs_hook=self._pairs, parse_constant=self._constant)

    def _pairs(self, pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) == len(pairs):
            return obj
        self.flaws += 1
        seen: set[str] = set()
        dup = _Duplicated(obj)
        dup.duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        return dup

    def _constant(self, name: str) -> _NonFinite:
        self.flaws += 1
        return _NonFinite(name)

    def decode(self, text: str) -> Any:
        self.flaws = 0
        return self._json.decode(text)


_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _flaw(obj: Any, escapes: bool) -> str:
    """Why a parsed row is not valid JSON text ("" when it is): a duplicate key, a ``NaN``/``Infinity``
    constant, or (``escapes``: the line has ``\\u`` escapes) a lone surrogate, naming the field."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        name = where or "the row"
        if isinstance(value, _NonFinite):
            return f"field '{where}' is {value.name}, which is not valid JSON; write a number or a string"
        if isinstance(value, _Duplicated):
            return (
                f"key '{value.duplicate}' appears twice in {name}; keep one (JSON readers disagree on which)"
            )
        if escapes and isinstance(value, str) and (bad := _SURROGATE.search(value)):
            code = f"\\u{ord(bad[0]):04x}"
            return (
                f"field '{where}' has a lone surrogate {code} (half of a UTF-16 pair), not valid "
                "Unicode; write the character itself or its full surrogate pair"
            )
        if isinstance(value, dict):
            stack.extend(reversed([(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{where}[{i}]", v) for i, v in enumerate(value)]))
    return ""


def _parse(text: str, decoder: _Decoder) -> tuple[Any, str]:
    """Parse one row; returns (value, "") or (None, reason), also for absurd nesting, duplicate keys,
    ``NaN``/``Infinity`` and lone surrogates."""
    deep = text.count("[") + text.count("{") > MAX_DEPTH  # cheap test first: few rows need the walk
    try:
        obj = decoder.decode(text)
    except RecursionError:
        return None, f"JSON nested more than {MAX_DEPTH} levels deep"
    except ValueError as e:
        return None, f"invalid JSON: {getattr(e, 'msg', e)}"
    if deep and too_deep(obj):
        return None, f"JSON nested more than {MAX_DEPTH} levels deep"
    if decoder.flaws or "\\u" in text:
        reason = _flaw(obj, "\\u" in text)
        if reason:
            return None, reason
    return obj, ""


def _iter_jsonl(path: Path, rej: _Rejects) -> Iterator[tuple[int, dict]]:
    decoder = _Decoder()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            text, reason = _decode(raw, lineno == 1)
            if text is None:
                rej.bad(lineno, raw.decode("utf-8", "replace").rstrip("\r\n"), reason)
                continue
            if not text.strip():
                rej.report.blank_lines += 1
                continue
            obj, reason = _parse(text, decoder)
            if reason:
                rej.bad(lineno, text.rstrip("\r\n"), reason)
                continue
            if not isinstance(obj, dict):
                rej.bad(lineno, text.rstrip("\r\n"), f"expected a JSON object, got {type(obj).__name__}")
                continue
            yield lineno, obj


def _iter_json(path: Path, rej: _Rejects) -> Iterator[tuple[int, dict]]:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        # Many ".json" files are really JSON Lines; read them as such.
        yield from _iter_jsonl(path, rej)
        return
    rej.report.notes.append("JSON array parsed whole (no streaming JSON parser); prefer JSONL for big files")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        snippet = data[data.rfind(b"\n", 0, e.start) + 1 : e.start + 40].decode("utf-8", "replace")
        raise DataError(path, line, snippet, f"invalid UTF-8 byte {data[e.start : e.start + 1]!r}") from None
    decoder = _Decoder()
    try:
        arr = decoder.decode(text)
    except json.JSONDecodeError as e:
        lines = text.splitlines()
        snippet = lines[e.lineno - 1] if 0 < e.lineno <= len(lines) else ""
        raise DataError(path, e.lineno, snippet, f"invalid JSON: {e.msg}") from None
    except RecursionError:
        raise DataError(path, 1, "", f"JSON nested more than {MAX_DEPTH} levels deep") from None
    if not isinstance(arr, list):
        raise DataError(path, 1, text[:80], f"expected a JSON array of objects, got {type(arr).__name__}")
    check = decoder.flaws > 0 or "\\u" in text
    for i, obj in enumerate(arr, 1):
        if isinstance(obj, dict) and too_deep(obj):
            rej.bad(i, "", f"element {i} is nested more than {MAX_DEPTH} levels deep")
        elif isinstance(obj, dict) and check and (reason := _flaw(obj, True)):
            rej.bad(i, json.dumps(obj, ensure_ascii=False, default=str)[:200], f"element {i}: {reason}")
        elif isinstance(obj, dict):
            yield i, obj
        else:
            rej.bad(
                i,
                json.dumps(obj, ensure_ascii=False, default=str)[:200],
                f"element {i} is {type(obj).__name__}, not an object",
            )


def _decoded_lines(fh: IO[bytes], rej: _Rejects, state: list[int]) -> Iterator[str]:
    for lineno, raw in enumerate(fh, 1):
        state[0] = lineno
        text, reason = _decode(raw, lineno == 1)
        if text is None:
            rej.bad(lineno, raw.decode("utf-8", "replace").rstrip("\r\n"), reason)
            continue
        yield text


def _iter_csv(path: Path, rej: _Rejects, delimiter: str) -> Iterator[tuple[int, dict]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    state = [0]  # physical line last consumed by the reader
    with open(path, "rb") as fh:
        reader = csv.reader(_decoded_lines(fh, rej, state), delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataError(path, 1, "", f"unreadable CSV header: {e}") from None
        if len(set(header)) != len(header):
            raise DataError(path, 1, delimiter.join(header), "duplicate column names in header")
        start = state[0] + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                rej.bad(start, "", f"malformed CSV: {e}")
                start = state[0] + 1
                continue
            line, start = start, state[0] + 1
            if not row:
                rej.report.blank_lines += 1
                continue
            if len(row) != len(header):
                rej.bad(line, delimiter.join(row), f"row has {len(row)} fields, header has {len(header)}")
                continue
            yield line, dict(zip(header, row, strict=True))


def _iter_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(path, 0, "", f"unreadable Parquet file: {e}") from None
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


def _iter_dataset(ds: Any) -> Iterator[tuple[int, dict]]:
    row = 0
    for batch in ds.iter(batch_size=1000):
        keys = list(batch)
        for values in zip(*(batch[k] for k in keys), strict=True):
            row += 1
            yield row, dict(zip(keys, values, strict=True))


def _pick_split(dd: Any, split: str | None, where: str) -> Any:
    if split is None:
        split = "train" if "train" in dd else None
    if split not in dd:
        raise DataError(
            where, 0, "", f"choose a split (found: {', '.join(dd)}), e.g. split='{next(iter(dd))}'"
        )
    return dd[split]


def _iter_disk(path: Path, split: str | None) -> Iterator[tuple[int, dict]]:
    if not any((path / m).is_file() for m in _DATASET_MARKERS):
        raise DataError(
            path,
            0,
            "",
            "is a directory, not a data file or a saved dataset (no dataset_info.json); give a file",
        )
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:  # datasets raises several unrelated types for a broken directory
        raise DataError(path, 0, "", f"unreadable saved dataset: {e}") from None
    if isinstance(ds, DatasetDict):
        ds = _pick_split(ds, split, str(path))
    yield from _iter_dataset(ds)


def _iter_hub(name: str, split: str | None) -> Iterator[tuple[int, dict]]:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise DataError(
            name, 0, "", "no such file, and HF_HUB_OFFLINE is set so hub datasets cannot be fetched"
        )
    from datasets import load_dataset

    try:
        ds = load_dataset(name, split=split or "train", streaming=True)
    except Exception as e:  # network, auth and not-found errors all mean "cannot read this"
        raise DataError(name, 0, "", f"not a local file and could not load it from the hub: {e}") from None
    for row, rec in enumerate(ds, 1):
        yield row, dict(rec)


def iter_records(
    path: str | os.PathLike,
    *,
    skip_bad: bool = False,
    rejects_path: str | os.PathLike | None = None,
    report: LoadReport | None = None,
    split: str | None = None,
    on_reject: OnReject | None = None,
) -> Iterator[tuple[int, dict]]:
    """Yield ``(row, record)`` from a data file, directory or hub dataset id.

    ``skip_bad`` writes malformed rows to ``rejects_path`` (if given) instead of raising, and
    calls ``on_reject(line, reason, raw)`` for each; ``report`` is filled with counts as rows are
    read; ``split`` picks a split of a `DatasetDict` directory or hub dataset (default ``train``).
    """
    p = Path(path)
    report = report if report is not None else LoadReport()
    report.path = str(p)
    rej = _Rejects(p, skip_bad, rejects_path, report, on_reject)
    suffix = p.suffix.lower()
    if p.is_dir():
        it = _iter_disk(p, split)
    elif not p.exists():
        if _HUB_ID.match(str(path)) and suffix not in SUFFIXES:
            it = _iter_hub(str(path), split)
        else:
            raise DataError(p, 0, "", "file not found")
    elif suffix in (".jsonl", ".ndjson"):
        it = _iter_jsonl(p, rej)
    elif suffix == ".json":
        it = _iter_json(p, rej)
    elif suffix in (".csv", ".tsv"):
        it = _iter_csv(p, rej, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".parquet":
        it = _iter_parquet(p)
    else:
        raise DataError(p, 0, "", f"unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        for row, rec in it:
            report.rows_read += 1
            yield row, rec
    finally:
        rej.close()


def load_records(path: str | os.PathLike, **kw: Any) -> list[dict]:
    """Read all records of ``path`` into a list (keyword arguments as for :func:`iter_records`)."""
    return [rec for _, rec in iter_records(path, **kw)]
