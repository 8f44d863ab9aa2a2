"""Audit a training file (and its eval files) for the problems that silently spoil fine-tuning.

The audit streams the file once, in chunks, keeping per row only a few numbers (hashes, lengths)
and a MinHash signature (4 bytes x ``num_perm``); texts are dropped chunk by chunk, so memory is
bounded by the signatures, not by the size of the text. The report is a plain JSON-able dict
whose schema is documented in ``docs/data.md`` and versioned by ``schema_version``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunelab.data import neardup, pii
from tunelab.data.canonical import (
    LONG_TEXT,
    CanonicalChunk,
    StreamOptions,
    count_unused,
    normalize_text,
    stream_canonical,
    text_hash,
)
from tunelab.data.formats import canonical_text, target_text
from tunelab.data.loaders import DataError, LoadReport, iter_records

__all__ = [
    "SCHEMA_VERSION",
    "audit",
    "audit_records",
    "blocking_problems",
    "normalize_text",
    "text_hash",
    "count_tokens",
    "byte_stats",
]

SCHEMA_VERSION = 1
EXAMPLES = 5
LISTED = 100  # rejected rows listed with their reasons in the report (all are counted)
SHORT_WORDS = 3  # a full example with fewer words than this is a "too short" outlier
LONG_FACTOR = 10  # ... and one longer than this many times the median is "too long"
TOKEN_TEXT = 1 << 20  # token counts of longer texts are estimated from this many leading characters

Progress = Callable[[str, int], None]


_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
_CONTROL = np.zeros(256, dtype=bool)
_CONTROL[[*range(0, 9), 11, 12, *range(14, 32), 127]] = True


def _flags(u: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte-wise control / mojibake / U+FFFD flags of ``u[:n]`` (``u`` has 3 bytes of lookahead)."""
    bad = _CONTROL[u[:n]]
    bad |= (u[:n] == 0xC2) & (u[1 : n + 1] >= 0x80) & (u[1 : n + 1] <= 0x9F)  # C1 controls
    moj = (u[:n] == 0xC3) & ((u[1 : n + 1] == 0x82) | (u[1 : n + 1] == 0x83)) & (u[2 : n + 2] == 0xC2)  # "Ã©"
    moj |= (u[:n] == 0xC3) & (u[1 : n + 1] == 0xA2) & (u[2 : n + 2] == 0xE2) & (u[3 : n + 3] == 0x82)  # "â€"
    rep = (u[:n] == 0xEF) & (u[1 : n + 1] == 0xBF) & (u[2 : n + 2] == 0xBD)
    return bad, moj, rep


def _long_stats(text: str) -> tuple[int, bool, bool, bool, float]:
    """:func:`byte_stats` of one long text, a window of ``LONG_TEXT`` bytes at a time (bounded memory)."""
    b = text.encode("utf-8", "surrogatepass")
    u = np.frombuffer(b, dtype=np.uint8)
    n = len(u)
    words = high = 0
    control = mojibake = replacement = False
    for s in range(0, n, LONG_TEXT):
        m = min(LONG_TEXT, n - s)
        seg = u[s : s + m + 3]
        if len(seg) < m + 3:
            seg = np.concatenate([seg, np.zeros(m + 3 - len(seg), np.uint8)])
        ns = ~_SPACE[seg[:m]]
        start = ns.copy()
        start[1:] &= ~ns[:-1]
        start[0] &= s == 0 or bool(_SPACE[u[s - 1]])  # a word continued from the previous window
        words += int(start.sum())
        bad, moj, rep = _flags(seg, m)
        control, mojibake, replacement = control or bad.any(), mojibake or moj.any(), replacement or rep.any()
        high += int((seg[:m] >= 0x80).sum())
    return words, bool(control), bool(mojibake), bool(replacement), high / max(n, 1)


def byte_stats(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Per text, computed on UTF-8 bytes in numpy: ``words`` (whitespace-separated), ``control``
    (C0/C1 control characters other than tab and newlines), ``mojibake`` (UTF-8 decoded as
    Latin-1/cp1252, e.g. ``Ã©``, ``â€™``), ``replacement`` (U+FFFD) and ``non_ascii`` (share of bytes).
    Texts over ``LONG_TEXT`` characters are measured window by window, so memory stays bounded."""
    keys = ("words", "control", "mojibake", "replacement", "non_ascii")
    texts_in = texts
    long_rows = [i for i, t in enumerate(texts) if len(t) > LONG_TEXT]
    if long_rows:
        texts = [t if len(t) <= LONG_TEXT else "" for t in texts]
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for start in range(0, len(texts), 2048):
        block = [t.encode("utf-8", "surrogatepass") for t in texts[start : start + 2048]]
        lens = np.fromiter((len(b) + 1 for b in block), dtype=np.int64, count=len(block))
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        u = np.frombuffer(b"\n".join(block) + b"\n\0\0\0\0", dtype=np.uint8)
        n = int(lens.sum())
        ns = ~_SPACE[u[:n]]
        word_start = ns.copy()
        word_start[1:] &= ~ns[:-1]
        out["words"].append(np.add.reduceat(word_start, starts, dtype=np.int64))
        bad, moj, rep = _flags(u, n)
        out["control"].append(np.logical_or.reduceat(bad, starts))
        out["mojibake"].append(np.logical_or.reduceat(moj, starts))
        out["replacement"].append(np.logical_or.reduceat(rep, starts))
        hi = np.add.reduceat(u[:n] >= 0x80, starts, dtype=np.int64)
        out["non_ascii"].append(hi / np.maximum(lens - 1, 1))
    res = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in out.items()}
    for i in long_rows:
        for k, v in zip(keys, _long_stats(texts_in[i]), strict=True):
            res[k][i] = v
    return res


def count_tokens(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    """Token counts of ``texts`` without special tokens. ``tokenizer`` is a Hugging Face tokenizer
    (batched, fast) or any callable mapping a string to a sequence of tokens.

    A text over ``TOKEN_TEXT`` characters is not tokenised whole: its count is estimated from its
    first ``TOKEN_TEXT`` characters, scaled by its length (time and memory stay bounded)."""
    scale = np.array([max(1.0, len(t) / TOKEN_TEXT) for t in texts])
    if (scale > 1).any():
        texts = [t[:TOKEN_TEXT] for t in texts]
        return np.rint(_count_tokens(tokenizer, texts) * scale).astype(np.int64)
    return _count_tokens(tokenizer, texts)


def _count_tokens(tokenizer: Any, texts: Sequence[str]) -> np.ndarray:
    if any(c.__name__ == "PreTrainedTokenizerBase" for c in type(tokenizer).__mro__):
        out = np.empty(len(texts), dtype=np.int64)
        for s in range(0, len(texts), 1024):
            ids = tokenizer(list(texts[s : s + 1024]), add_special_tokens=False)["input_ids"]
            out[s : s + len(ids)] = [len(x) for x in ids]
        return out
    if hasattr(tokenizer, "encode") and not callable(tokenizer):
        return np.fromiter((len(tokenizer.encode(t)) for t in texts), dtype=np.int64, count=len(texts))
    return np.fromiter((len(tokenizer(t)) for t in texts), dtype=np.int64, count=len(texts))


@dataclass
class _Rows:
    """Per-row numbers kept while streaming (texts are not kept)."""

    row: list[np.ndarray] = field(default_factory=list)
    hash: list[np.ndarray] = field(default_factory=list)
    prompt_hash: list[np.ndarray] = field(default_factory=list)
    sigs: list[np.ndarray] = field(default_factory=list)
    empty_text: list[np.ndarray] = field(default_factory=list)

    def add(self, ch: CanonicalChunk) -> None:
        self.row.append(np.asarray(ch.rows, dtype=np.int64))
        self.hash.append(ch.hashes)
        self.prompt_hash.append(ch.prompt_hashes)
        self.empty_text.append(
            np.fromiter((not t.strip() for t in ch.texts), dtype=bool, count=len(ch.texts))
        )
        self.sigs.append(ch.sigs)

    def arrays(self, num_perm: int) -> dict[str, np.ndarray]:
        cat = {
            "row": np.concatenate(self.row) if self.row else np.zeros(0, np.int64),
            "hash": np.concatenate(self.hash) if self.hash else np.zeros(0, np.int64),
            "prompt_hash": np.concatenate(self.prompt_hash) if self.prompt_hash else np.zeros(0, np.int64),
            "empty_text": np.concatenate(self.empty_text) if self.empty_text else np.zeros(0, bool),
        }
        cat["sigs"] = np.concatenate(self.sigs) if self.sigs else np.zeros((0, num_perm), np.uint32)
        return cat


@dataclass
class _Settings:
    fmt: str | None
    columns: dict[str, str] | None
    tokenizer: Any
    max_length: int | None
    near_threshold: float
    num_perm: int
    ngram: int


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _problem(v: Any) -> str | None:
    if v is None:
        return "missing"
    if isinstance(v, (str, list, dict)) and not v:
        return "empty"
    if isinstance(v, str) and not v.strip():
        return "whitespace"
    return None


class _TrainStats:
    """Accumulates every per-file finding of the training file while it streams past."""

    def __init__(self, s: _Settings):
        self.s = s
        self.kept = _Rows()
        self.n = 0
        self.fmt_errors: list[dict] = []
        self.n_fmt_errors = 0
        self.unused: dict[str, int] = {}
        self.col_counts: dict[str, Counter] = {}
        self.col_examples: dict[str, list[int]] = {}
        self.shapes: dict[tuple, int] = {}  # (column, type) signature -> id
        self.shape_id: list[np.ndarray] = []
        self.all_rows: list[np.ndarray] = []
        self.lengths: list[np.ndarray] = []
        self.words: list[np.ndarray] = []
        self.hyg: dict[str, list[int]] = {k: [] for k in ("control", "mojibake", "replacement", "short")}
        self.hyg_n: Counter = Counter()
        self.pii_n: dict[str, Counter] = {k: Counter() for k in pii.PII_KINDS}
        self.pii_rows: dict[str, list[int]] = {k: [] for k in pii.PII_KINDS}
        self.pii_examples: dict[str, list[dict]] = {k: [] for k in pii.PII_KINDS}
        self.labels: Counter = Counter()
        self.found: dict[str, list[int]] = {k: [] for k in ("pref_equal", "empty_target", "over", "cut")}
        self.found_n: Counter = Counter()

    def _note(self, key: str, rows: list[int], idx: Iterable[int]) -> None:
        idx = list(idx)
        self.found_n[key] += len(idx)
        ex = self.found[key]
        ex += [rows[i] for i in idx[: max(0, EXAMPLES - len(ex))]]

    def raw(self, chunk: list[tuple[int, dict]]) -> None:
        """Completeness and schema bookkeeping on the raw records."""
        ids = np.empty(len(chunk), dtype=np.int32)
        for k, (row, rec) in enumerate(chunk):
            shape = tuple(sorted((col, _kind(v)) for col, v in rec.items()))
            ids[k] = self.shapes.setdefault(shape, len(self.shapes))
            for col, v in rec.items():
                problem = _problem(v)
                if problem:
                    self.col_counts.setdefault(col, Counter())[problem] += 1
                    ex = self.col_examples.setdefault(col, [])
                    if len(ex) < EXAMPLES:
                        ex.append(row)
        self.shape_id.append(ids)
        self.all_rows.append(np.fromiter((r for r, _ in chunk), dtype=np.int64, count=len(chunk)))

    def format_errors(self, ch: CanonicalChunk) -> None:
        """Rows that do not fit the format: counted, the first few kept as examples; columns the
        format does not read are counted per column."""
        self.n_fmt_errors += len(ch.errors)
        for k, message in ch.errors[: max(0, LISTED - len(self.fmt_errors))]:
            self.fmt_errors.append({"row": ch.records[k][0], "error": message})
        for k in ch.index:
            count_unused(self.unused, ch.records[k][1], ch.fmt, self.s.columns)

    def canonical(self, ch: CanonicalChunk) -> None:
        rows, canon, texts, prompts = ch.rows, ch.canon, ch.texts, ch.prompts
        targets = [target_text(c) for c in canon]
        self.kept.add(ch)
        self._lengths(rows, canon, prompts, targets, ch.fmt, texts)
        self._hygiene(rows, texts)
        self._pii(rows, texts)
        self._targets(rows, canon, targets, ch.fmt)

    def _measure(self, texts: Sequence[str]) -> np.ndarray:
        if self.s.tokenizer is not None:
            return count_tokens(self.s.tokenizer, texts)
        return byte_stats(texts)["words"]

    def _lengths(self, rows, canon, prompts, targets, fmt, texts) -> None:
        if fmt in ("text", "classification"):
            total = self._measure(texts)
            prompt = np.zeros_like(total)
        elif fmt == "preference":
            prompt = self._measure(prompts)
            chosen = self._measure(["\n".join(m["content"] for m in c["chosen"]) for c in canon])
            rejected = self._measure(["\n".join(m["content"] for m in c["rejected"]) for c in canon])
            total = prompt + np.maximum(chosen, rejected)
        else:
            prompt = self._measure(prompts)
            total = prompt + self._measure([t or "" for t in targets])
        self.lengths.append(total)
        if self.s.max_length:
            self._note("over", rows, np.flatnonzero(total > self.s.max_length))
            if fmt not in ("text", "classification"):
                # Truncation keeps the start: a prompt that fills the window leaves no response.
                self._note("cut", rows, np.flatnonzero(prompt >= self.s.max_length))

    def _hygiene(self, rows: list[int], texts: list[str]) -> None:
        st = byte_stats(texts)
        for key in ("control", "mojibake", "replacement"):
            hits = np.flatnonzero(st[key])
            self.hyg_n[key] += len(hits)
            self.hyg[key] += [rows[i] for i in hits[: max(0, EXAMPLES - len(self.hyg[key]))]]
        self.hyg_n["non_ascii"] += int((st["non_ascii"] > 0.5).sum())
        short = np.flatnonzero(st["words"] < SHORT_WORDS)
        self.hyg_n["short"] += len(short)
        self.hyg["short"] += [rows[i] for i in short[: max(0, EXAMPLES - len(self.hyg["short"]))]]
        self.words.append(st["words"])

    def _pii(self, rows: list[int], texts: list[str]) -> None:
        for i, found in pii.scan(texts):
            kinds = Counter(f.kind for f in found)
            for kind, n in kinds.items():
                self.pii_n[kind]["occurrences"] += n
                self.pii_n[kind]["rows"] += 1
                self.pii_rows[kind].append(rows[i])
            for f in found:
                if len(self.pii_examples[f.kind]) < EXAMPLES:
                    self.pii_examples[f.kind].append({"row": rows[i], "masked": f.masked})

    def _targets(self, rows, canon, targets, fmt) -> None:
        if fmt == "classification":
            self.labels.update(c["label"] for c in canon)
        if fmt == "preference":
            same = [
                k
                for k, c in enumerate(canon)
                if normalize_text(canonical_text({"messages": c["chosen"]}))
                == normalize_text(canonical_text({"messages": c["rejected"]}))
            ]
            self._note("pref_equal", rows, same)
        self._note(
            "empty_target", rows, [k for k, t in enumerate(targets) if t is not None and not t.strip()]
        )


def _exact(arr: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """Keep-first representatives and the exact-duplicate section of the report."""
    h = arr["hash"]
    if len(h) == 0:
        return np.zeros(0, np.int64), {"rows": 0, "clusters": 0, "examples": []}
    _, first, inverse, counts = np.unique(h, return_index=True, return_inverse=True, return_counts=True)
    reps = np.sort(first)
    groups = np.flatnonzero(counts > 1)
    examples = []
    for g in groups[np.argsort(first[groups])][:EXAMPLES]:
        examples.append(arr["row"][np.flatnonzero(inverse == g)[:EXAMPLES]].tolist())
    return reps, {"rows": int(len(h) - len(first)), "clusters": int(len(groups)), "examples": examples}


def _near(arr: dict[str, np.ndarray], reps: np.ndarray, threshold: float) -> dict:
    reps = reps[~arr["empty_text"][reps]]
    res = neardup.near_duplicates(arr["sigs"][reps], threshold)
    rows = arr["row"][reps]
    order = np.argsort(-res.pair_sim, kind="stable")[:EXAMPLES]
    return {
        "threshold": threshold,
        "rows": int(len(res.redundant_rows())),
        "clusters": len(res.clusters()),
        "pairs": int(len(res.pair_i)),
        "examples": [
            {
                "rows": [int(rows[res.pair_i[k]]), int(rows[res.pair_j[k]])],
                "similarity": round(float(res.pair_sim[k]), 3),
            }
            for k in order
        ],
    }


def _leakage(
    train: dict[str, np.ndarray], reps: np.ndarray, ev: dict[str, np.ndarray], threshold: float
) -> dict:
    exact = np.isin(ev["hash"], train["hash"])
    prompt_exact = np.isin(ev["prompt_hash"], train["prompt_hash"]) & ~ev["empty_text"]
    reps = reps[~train["empty_text"][reps]]
    ev_ok = np.flatnonzero(~ev["empty_text"])
    ti, ej, sim = neardup.cross_duplicates(train["sigs"][reps], ev["sigs"][ev_ok], threshold)
    ej = ev_ok[ej]
    near_rows = np.unique(ej[~exact[ej]])
    examples = []
    for k in np.flatnonzero(exact)[:EXAMPLES]:
        t = int(train["row"][np.flatnonzero(train["hash"] == ev["hash"][k])[0]])
        examples.append({"train_row": t, "eval_row": int(ev["row"][k]), "similarity": 1.0, "kind": "exact"})
    for k in np.argsort(-sim, kind="stable"):
        if len(examples) >= 2 * EXAMPLES:
            break
        if not exact[ej[k]]:
            examples.append(
                {
                    "train_row": int(train["row"][reps[ti[k]]]),
                    "eval_row": int(ev["row"][ej[k]]),
                    "similarity": round(float(sim[k]), 3),
                    "kind": "near",
                }
            )
    return {
        "eval_rows": int(len(ev["hash"])),
        "exact": int(exact.sum()),
        "near": int(len(near_rows)),
        "prompt_exact": int(prompt_exact.sum()),
        "examples": examples,
    }


def _summary(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"count": 0, "min": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "max": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "count": int(len(values)),
        "min": int(values.min()),
        "mean": round(float(values.mean()), 2),
        "p50": round(float(p50), 1),
        "p90": round(float(p90), 1),
        "p99": round(float(p99), 1),
        "max": int(values.max()),
    }


def _schema(st: _TrainStats) -> dict:
    if not st.shapes:
        return {"majority_keys": [], "majority_types": {}, "inconsistent_rows": 0, "examples": []}
    ids = np.concatenate(st.shape_id)
    rows = np.concatenate(st.all_rows)
    counts = np.bincount(ids, minlength=len(st.shapes))
    keysets: Counter = Counter()
    types: dict[str, Counter] = {}
    for shape, sid in st.shapes.items():
        keysets[frozenset(c for c, _ in shape)] += int(counts[sid])
        for col, t in shape:
            if t != "null":
                types.setdefault(col, Counter())[t] += int(counts[sid])
    majority = keysets.most_common(1)[0][0]
    major_type = {col: c.most_common(1)[0][0] for col, c in types.items()}
    detail = {}
    for shape, sid in st.shapes.items():
        keys = {c for c, _ in shape}
        d = {
            "missing_keys": sorted(majority - keys),
            "extra_keys": sorted(keys - majority),
            "type_mismatch": sorted(c for c, t in shape if t != "null" and t != major_type[c]),
        }
        if any(d.values()):
            detail[sid] = d
    bad = np.flatnonzero(np.isin(ids, list(detail)))
    return {
        "majority_keys": sorted(majority),
        "majority_types": {k: major_type.get(k, "null") for k in sorted(majority)},
        "inconsistent_rows": int(len(bad)),
        "examples": [{"row": int(rows[k]), **detail[int(ids[k])]} for k in bad[:EXAMPLES]],
    }


def _completeness(st: _TrainStats) -> dict:
    if not st.shapes:
        return {}
    ids = np.concatenate(st.shape_id)
    rows = np.concatenate(st.all_rows)
    by_id = sorted(st.shapes.items(), key=lambda kv: kv[1])
    columns = sorted({c for shape, _ in by_id for c, _ in shape})
    out = {}
    for col in columns:
        has = np.array([any(c == col for c, _ in shape) for shape, _ in by_id])
        absent = rows[~has[ids]]
        c = st.col_counts.get(col, Counter())
        examples = sorted(set(st.col_examples.get(col, [])) | set(absent[:EXAMPLES].tolist()))[:EXAMPLES]
        out[col] = {
            "missing": int(len(absent)) + c["missing"],
            "empty": c["empty"],
            "whitespace": c["whitespace"],
            "examples": examples,
        }
    return out


def audit_records(
    records: Iterable[tuple[int, dict]],
    *,
    eval_sets: dict[str, Iterable[tuple[int, dict]]] | None = None,
    fmt: str | None = None,
    columns: dict[str, str] | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    near_threshold: float = 0.8,
    num_perm: int = neardup.NUM_PERM,
    ngram: int = neardup.NGRAM,
    progress: Progress | None = None,
    source: str = "<records>",
) -> dict:
    """Audit ``(row, record)`` pairs; ``eval_sets`` maps a name to its own pairs for leakage checks.

    Returns the report dict described in ``docs/data.md``. A row that does not fit the format is
    counted in ``format_errors`` and listed with the reason training gives for it (training drops
    it, or refuses the file without ``data.skip_bad``); the audit itself never stops at a row.
    """
    s = _Settings(fmt, columns, tokenizer, max_length, near_threshold, num_perm, ngram)
    st = _TrainStats(s)
    options = StreamOptions(prompts=True, num_perm=num_perm, ngram=ngram)
    for ch in stream_canonical(records, fmt, columns, source=source, options=options):
        s.fmt = ch.fmt
        st.raw(ch.records)
        st.format_errors(ch)
        if ch.canon:
            st.canonical(ch)
        st.n += len(ch.records)
        if progress:
            progress("train", st.n)
    fmt = s.fmt or (fmt or "text")
    arr = st.kept.arrays(num_perm)
    if progress:
        progress("near-duplicates", st.n)
    reps, exact = _exact(arr)
    near = _near(arr, reps, near_threshold)
    leakage = [
        _eval_leakage(name, recs, fmt, s, (arr, reps), options, progress)
        for name, recs in (eval_sets or {}).items()
    ]
    return _report(st, arr, fmt, source, exact, near, leakage)


def _eval_leakage(
    name: str,
    records: Iterable[tuple[int, dict]],
    fmt: str,
    s: _Settings,
    train: tuple[dict[str, np.ndarray], np.ndarray],
    options: StreamOptions,
    progress: Progress | None,
) -> dict:
    """Stream one eval file (in the training file's format) and check it against the training rows
    ``train`` (their arrays and keep-first representatives)."""
    ev = _Rows()
    done = n_errors = 0
    for ch in stream_canonical(records, fmt, s.columns, source=name, options=options):
        n_errors += len(ch.errors)
        ev.add(ch)
        done += len(ch.records)
        if progress:
            progress(f"eval {name}", done)
    lk = _leakage(*train, ev.arrays(s.num_perm), s.near_threshold)
    return {"eval_file": name, **lk, "format_errors": n_errors}


def _report(
    st: _TrainStats, arr: dict, fmt: str, source: str, exact: dict, near: dict, leakage: list
) -> dict:
    s = st.s
    unit = "tokens" if s.tokenizer is not None else "words"
    report = {
        "schema_version": SCHEMA_VERSION,
        "file": source,
        "format": fmt,
        "rows": st.n,
        "rows_rejected": 0,
        "settings": {
            "near_threshold": s.near_threshold,
            "max_length": s.max_length,
            "length_unit": unit,
            "num_perm": s.num_perm,
            "ngram": s.ngram,
        },
        "format_errors": {"rows": st.n_fmt_errors, "examples": st.fmt_errors},
        "unused_columns": dict(sorted(st.unused.items())),
        "completeness": _completeness(st),
        "schema": _schema(st),
        "exact_duplicates": exact,
        "near_duplicates": near,
        "leakage": leakage,
        "lengths": _lengths_section(st, fmt, unit),
        "labels": _labels_section(st) if fmt == "classification" else None,
        "preference": {"chosen_equals_rejected": st.found_n["pref_equal"], "examples": st.found["pref_equal"]}
        if fmt == "preference"
        else None,
        "empty_targets": {"rows": st.found_n["empty_target"], "examples": st.found["empty_target"]},
        "hygiene": _hygiene_section(st, arr),
        "pii": _pii_section(st),
    }
    report["blocking"] = blocking_problems(report)
    return report


def _lengths_section(st: _TrainStats, fmt: str, unit: str) -> dict:
    lengths = np.concatenate(st.lengths) if st.lengths else np.zeros(0, np.int64)
    chat_like = fmt not in ("text", "classification")
    return {
        "unit": unit,
        **_summary(lengths),
        "over_max_length": st.found_n["over"] if st.s.max_length else None,
        "over_examples": st.found["over"],
        "response_cut_entirely": st.found_n["cut"] if st.s.max_length and chat_like else None,
        "cut_examples": st.found["cut"],
    }


def _labels_section(st: _TrainStats) -> dict:
    counts = dict(sorted(st.labels.items(), key=lambda kv: (-kv[1], kv[0])))
    vals = list(counts.values())
    return {"counts": counts, "imbalance_ratio": round(max(vals) / min(vals), 3) if vals else None}


def _hygiene_section(st: _TrainStats, arr: dict) -> dict:
    words = np.concatenate(st.words) if st.words else np.zeros(0, np.int64)
    long_limit = LONG_FACTOR * max(float(np.median(words)) if len(words) else 0.0, 1.0)
    long_idx = np.flatnonzero(words > long_limit)
    return {
        "control_chars": {"rows": st.hyg_n["control"], "examples": st.hyg["control"]},
        "mojibake": {"rows": st.hyg_n["mojibake"], "examples": st.hyg["mojibake"]},
        "replacement_char": {"rows": st.hyg_n["replacement"], "examples": st.hyg["replacement"]},
        "too_short": {"rows": st.hyg_n["short"], "min_words": SHORT_WORDS, "examples": st.hyg["short"]},
        "too_long": {
            "rows": int(len(long_idx)),
            "max_words": long_limit,
            "examples": arr["row"][long_idx[:EXAMPLES]].tolist(),
        },
        "mostly_non_ascii": {"rows": st.hyg_n["non_ascii"]},
    }


def _pii_section(st: _TrainStats) -> dict:
    return {
        kind: {
            "occurrences": st.pii_n[kind]["occurrences"],
            "rows": st.pii_n[kind]["rows"],
            "row_numbers": st.pii_rows[kind][:100],
            "examples": st.pii_examples[kind],
        }
        for kind in pii.PII_KINDS
    }


class _Unreadable:
    """Rows the loader could not read (bad JSON, bad UTF-8, duplicate keys, ...): counted, and the
    first :data:`LISTED` kept with their reasons for the report."""

    def __init__(self) -> None:
        self.rows = 0
        self.examples: list[dict] = []

    def __call__(self, line: int, reason: str, raw: str) -> None:
        self.rows += 1
        if len(self.examples) < LISTED:
            self.examples.append({"row": line, "error": reason})

    def section(self) -> dict:
        return {"rows": self.rows, "examples": self.examples}


def audit(
    path: str | os.PathLike,
    *,
    eval_paths: Sequence[str | os.PathLike] = (),
    skip_bad: bool = True,
    **kw: Any,
) -> dict:
    """Audit a data file and optional eval/test files; keyword arguments as for :func:`audit_records`.

    The audit never stops at a row: a row that cannot be read, or does not fit the format, is
    counted and listed with its reason (``unreadable`` and ``format_errors``) beside every other
    finding, and :func:`blocking_problems` names them. ``skip_bad`` is accepted for old callers and
    changes nothing."""
    load, unreadable = LoadReport(), _Unreadable()
    evals = {str(p): iter_records(p, skip_bad=True) for p in eval_paths}
    records = iter_records(path, skip_bad=True, report=load, on_reject=unreadable)
    report = audit_records(records, eval_sets=evals, source=str(path), **kw)
    report["unreadable"] = unreadable.section()
    report["rows_rejected"] = load.rows_rejected + report["format_errors"]["rows"]
    report["blocking"] = blocking_problems(report)
    if report["rows"] == 0 and unreadable.examples:  # nothing to audit: the first bad row says why
        first = unreadable.examples[0]
        raise DataError(path, first["row"], "", f"{first['error']} ({no_rows_reason(load)})")
    if report["rows"] == 0:
        raise DataError(path, 0, "", no_rows_reason(load))
    return report


def no_rows_reason(load: LoadReport) -> str:
    """Why a file gave no records, for the error that refuses to audit/clean/split nothing."""
    if load.rows_rejected:
        return f"no readable rows ({load.rows_rejected} skipped as unreadable); nothing to do"
    return "no data rows (the file is empty); nothing to do"


def blocking_problems(report: dict) -> list[str]:
    """Problems that should stop a run (``--strict``): leakage into eval files, empty targets,
    rows that do not fit the format."""
    problems = []
    for lk in report.get("leakage", []):
        if lk["exact"]:
            problems.append(f"{lk['exact']} rows of {lk['eval_file']} also appear in the training file")
        if lk["near"]:
            problems.append(f"{lk['near']} rows of {lk['eval_file']} are near-duplicates of training rows")
    if report["empty_targets"]["rows"]:
        problems.append(f"{report['empty_targets']['rows']} rows have an empty target")
    if report["format_errors"]["rows"]:
        problems.append(f"{report['format_errors']['rows']} rows do not fit the {report['format']} format")
    if report.get("unreadable", {}).get("rows"):
        problems.append(f"{report['unreadable']['rows']} rows cannot be read")
    return problems
