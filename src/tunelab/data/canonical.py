"""Canonical rows from data files: read whole (for training) or streamed in chunks (for audit, clean
and split), with the normalised hashes and MinHash signatures that duplicate checks compare.

:func:`read_canonical` loads a whole file into canonical examples; a row that does not fit the
format is an error naming the file and row. :func:`stream_canonical` reads a file once, ``CHUNK``
rows at a time, and yields each chunk's canonical rows with their text hashes (and, on request,
prompt hashes and MinHash signatures); texts are dropped chunk by chunk, so a caller that keeps
only hashes and signatures keeps memory bounded by those, not by the size of the text.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain, islice
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data import neardup
from tunelab.data.formats import (
    FormatError,
    canonical_text,
    detect_file_format,
    prompt_text,
    to_canonical,
    used_columns,
)
from tunelab.data.loaders import DataError, LoadReport, iter_records

__all__ = [
    "CHUNK",
    "LONG_TEXT",
    "CanonicalChunk",
    "normalize_text",
    "count_unused",
    "read_canonical",
    "row_error",
    "stream_canonical",
    "text_hash",
]

CHUNK = 8192  # rows canonicalised, hashed and MinHashed at a time (the texts of one chunk in memory)
LONG_TEXT = 1 << 20  # texts over this many characters are normalised window by window

_SPACES = re.compile(r"\s+")  # the same whitespace as str.split() (both use str.isspace)
_WINDOW = 1 << 16  # characters normalised at a time in a long text


def read_canonical(
    path: str,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    *,
    skip_bad: bool = False,
    rejects_path: Path | None = None,
) -> tuple[list[tuple[int, dict[str, Any]]], LoadReport, str]:
    """Load a data file and map each row to its canonical shape.

    A row that cannot be read or does not fit the format is an error naming the file and row
    (:func:`row_error`, the message ``data audit`` gives for it too); with ``skip_bad`` it is
    counted in the report's ``rows_rejected`` and appended to ``rejects_path`` with its reason.
    Columns the format does not read are counted in the report's ``unused_columns``.
    """
    report = LoadReport()
    rejects = _RejectsLog(path, rejects_path, report)
    records = iter_records(path, skip_bad=skip_bad, report=report, on_reject=rejects.loader)
    out: list[tuple[int, dict[str, Any]]] = []
    detected = None if fmt == "auto" else fmt
    for row, record in records:
        detected = detected or detect_file_format(path, row, record, columns or None)
        try:
            out.append((row, to_canonical(record, detected, columns or None)))
        except FormatError as err:
            if not skip_bad:
                raise row_error(path, row, record, err) from None
            rejects.format(row, record, err)
            continue
        count_unused(report.unused_columns, record, detected, columns)
    if not out:
        raise DataError(
            path,
            0,
            "",
            "no usable rows" + (f" ({report.rows_rejected} rejected)" if report.rows_rejected else ""),
        )
    return out, report, detected or "text"


def row_error(path: str, row: int, record: dict, err: FormatError | str) -> DataError:
    """The error for a row that does not fit its format: ``file:row: reason (near: …)``, one line.
    Training, evaluation and ``data audit`` all report a bad row through this, so they say the same."""
    return DataError(path, row, json.dumps(record, ensure_ascii=False, default=str)[:400], str(err))


def count_unused(counts: dict[str, int], record: dict, fmt: str, columns: dict[str, str] | None) -> None:
    """Count the columns of ``record`` the format does not read (reported, never dropped silently)."""
    for col in set(record) - used_columns(record, fmt, columns or None):
        counts[col] = counts.get(col, 0) + 1


class _RejectsLog:
    """Appends rejected rows (unreadable, or not fitting the format) to one JSONL file, in the
    loader's shape ``{"file", "line", "reason", "raw"}``. Appending lets the train and eval files of
    a run share one rejects file without the second overwriting the first."""

    def __init__(self, path: str, rejects_path: Path | None, report: LoadReport):
        self.path, self.rejects_path, self.report = str(path), rejects_path, report

    def loader(self, line: int, reason: str, raw: str) -> None:
        self._write({"file": self.path, "line": line, "reason": reason, "raw": raw})

    def format(self, row: int, record: dict, err: FormatError) -> None:
        self.report.rows_rejected += 1
        raw = json.dumps(record, ensure_ascii=False, default=str)
        self._write({"file": self.path, "line": row, "reason": str(err), "raw": raw})

    def _write(self, entry: dict) -> None:
        if self.rejects_path is None:
            return
        Path(self.rejects_path).parent.mkdir(parents=True, exist_ok=True)
        with open(self.rejects_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.report.rejects_path = str(self.rejects_path)


def normalize_text(text: str) -> str:
    """Light normalisation for exact-duplicate checks: NFKC, case-folded, whitespace collapsed."""
    if len(text) <= LONG_TEXT:
        return " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    return "".join(_normalized_pieces(text))


def _normalized_pieces(text: str) -> Iterator[str]:
    """:func:`normalize_text` of a long text in pieces, without a list of one string per word (about
    12x the text's size). Pieces end just after whitespace, a starter that NFKC never composes with
    what follows, so normalising piece by piece gives the same text; spaces at piece boundaries
    are collapsed through ``pending``."""
    emitted, pending, start = False, False, 0
    while start < len(text):
        end = min(start + _WINDOW, len(text))
        if end < len(text):
            cut = _SPACES.search(text, end)  # extend to the next whitespace (none: to the end)
            end = cut.start() + 1 if cut else len(text)
        piece = _SPACES.sub(" ", unicodedata.normalize("NFKC", text[start:end]).casefold())
        start = end
        core = piece.strip(" ")
        if not core:
            pending = pending or bool(piece)
            continue
        if emitted and (pending or piece[0] == " "):
            yield " "
        yield core
        emitted, pending = True, piece[-1] == " "


def text_hash(text: str) -> int:
    """64-bit hash of the normalised text (signed, so it fits numpy int64)."""
    h = hashlib.blake2b(digest_size=8)
    if len(text) <= LONG_TEXT:
        h.update(normalize_text(text).encode("utf-8", "surrogatepass"))
    else:
        for piece in _normalized_pieces(text):
            h.update(piece.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest(), "little", signed=True)


def _hashes(texts: list[str]) -> np.ndarray:
    return np.fromiter((text_hash(t) for t in texts), dtype=np.int64, count=len(texts))


@dataclass
class CanonicalChunk:
    """One chunk of a file: the records as read and, for those that fit the format, their canonical
    form, text and hashes. ``index[k]`` is the position in ``records`` of canonical row ``k``."""

    records: list[tuple[int, dict]]
    fmt: str
    index: list[int] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    canon: list[dict] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    errors: list[tuple[int, str]] = field(default_factory=list)  # (position in records, message)
    prompts: list[str] | None = None
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    prompt_hashes: np.ndarray | None = None
    sigs: np.ndarray | None = None


@dataclass(frozen=True)
class StreamOptions:
    """What :func:`stream_canonical` computes besides canonical rows and text hashes."""

    prompts: bool = False  # prompt texts and their hashes
    signatures: bool = True  # MinHash signatures of the texts
    num_perm: int = neardup.NUM_PERM
    ngram: int = neardup.NGRAM
    # A row that does not fit the format is kept as the example ``{}`` with this text (and prompt)
    # instead of only being listed in ``errors``; None: it is only listed.
    fallback: Callable[[dict], str] | None = None


def stream_canonical(
    records: Iterable[tuple[int, dict]],
    fmt: str | None,
    columns: dict[str, str] | None,
    *,
    source: str = "<records>",
    chunk: int | None = None,
    options: StreamOptions = StreamOptions(),
) -> Iterator[CanonicalChunk]:
    """Chunks of ``chunk`` (default :data:`CHUNK`) ``(row, record)`` pairs, canonicalised. With
    ``fmt`` None the format is detected from the first record, as soon as it is read (so a file
    whose first row names no known column fails there, before any later row is read)."""
    it = iter(records)
    first = next(it, None)
    if first is None:
        return
    if fmt is None:
        fmt = detect_file_format(source, first[0], first[1], columns)
    it = chain([first], it)
    size = chunk or CHUNK  # read at call time, so one setting changes every caller
    while part := list(islice(it, size)):
        yield _canonical_chunk(part, fmt, columns, options)


def _canonical_chunk(
    records: list[tuple[int, dict]], fmt: str, columns: dict[str, str] | None, opt: StreamOptions
) -> CanonicalChunk:
    ch = CanonicalChunk(records, fmt)
    prompts: list[str] = []
    for k, (row, rec) in enumerate(records):
        try:
            c = to_canonical(rec, fmt, columns)
            text, prompt = canonical_text(c), (prompt_text(c) if opt.prompts else "")
        except FormatError as e:
            ch.errors.append((k, str(e)))
            if opt.fallback is None:
                continue
            c, text = {}, opt.fallback(rec)
            prompt = text
        ch.index.append(k)
        ch.rows.append(row)
        ch.canon.append(c)
        ch.texts.append(text)
        prompts.append(prompt)
    ch.hashes = _hashes(ch.texts)
    if opt.prompts:
        ch.prompts, ch.prompt_hashes = prompts, _hashes(prompts)
    if opt.signatures:
        ch.sigs = neardup.minhash(ch.texts, num_perm=opt.num_perm, ngram=opt.ngram)
    return ch
