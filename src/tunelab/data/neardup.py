"""Near-duplicate detection: MinHash over word n-gram shingles, LSH banding, union-find clusters.

Everything after ``str.lower`` runs in numpy: words are split and hashed on the UTF-8 bytes with
tabulation hashing (so no Python object per word), shingles are combined vectorially, and the
``num_perm`` MinHash values come from multiply-shift hashing over small, cache-sized blocks.
Candidate pairs from LSH are verified against the signature-estimated Jaccard similarity, so the
threshold means what it says (up to the estimator's error of about ``0.2/sqrt(num_perm/32)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "NGRAM",
    "NUM_PERM",
    "NearDupResult",
    "minhash",
    "lsh_params",
    "candidate_pairs",
    "similar_pairs",
    "cluster_labels",
    "near_duplicates",
    "cross_duplicates",
]

NUM_PERM = 128  # MinHash width: the estimator's error is about 0.2/sqrt(NUM_PERM/32)
NGRAM = 3  # words per shingle

_U64 = np.uint64
_EMPTY = np.uint32(0xFFFFFFFF)
# Bytes that separate words: ASCII whitespace, control characters and punctuation.
_SEP = np.zeros(256, dtype=bool)
_SEP[:48] = True
_SEP[58:65] = True
_SEP[91:97] = True
_SEP[123:128] = True
_BLOCK_BYTES = 1 << 16  # ~50 typical rows per block keeps the (num_perm x shingles) matrix in cache


def _rng_u64(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.integers(0, np.iinfo(np.uint64).max, size=shape, dtype=np.uint64, endpoint=True)


class _Hasher:
    def __init__(self, num_perm: int, ngram: int, seed: int):
        rng = np.random.default_rng(seed)
        self.table = _rng_u64(rng, (64, 256))  # tabulation hash: position-in-word x byte
        self.mult = _rng_u64(rng, ngram) | _U64(1)
        self.a = (_rng_u64(rng, num_perm) | _U64(1))[:, None]
        self.b = _rng_u64(rng, num_perm)[:, None]
        self.ngram = ngram

    def words(self, buf: bytes, doc_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hash every word of ``buf``; returns (word hashes, document index of each word)."""
        u = np.frombuffer(buf, dtype=np.uint8)
        keep = ~_SEP[u]
        if not keep.any():
            return np.empty(0, _U64), np.empty(0, np.int64)
        pos = np.flatnonzero(keep)
        first = np.empty(len(pos), dtype=bool)
        first[0] = True
        np.not_equal(pos[1:], pos[:-1] + 1, out=first[1:])
        word_at = np.flatnonzero(first)
        offset = pos - np.repeat(pos[word_at], np.diff(np.append(word_at, len(pos))))
        vals = self.table[offset & 63, u[pos]]
        hashes = np.bitwise_xor.reduceat(vals, word_at)
        doc = np.searchsorted(doc_starts, pos[word_at], side="right") - 1
        return hashes, doc

    def shingles(self, words: np.ndarray, doc: np.ndarray, ndocs: int) -> tuple[np.ndarray, np.ndarray]:
        """Combine ``ngram`` consecutive words of one document; short documents give one shingle."""
        k = self.ngram
        counts = np.bincount(doc, minlength=ndocs)
        if len(words) >= k:
            valid = doc[: len(doc) - k + 1] == doc[k - 1 :]
            sh = words[: len(words) - k + 1] * self.mult[0]
            for j in range(1, k):
                sh = sh + words[j : len(words) - k + 1 + j] * self.mult[j]
            sh, sdoc = sh[valid], doc[: len(doc) - k + 1][valid]
        else:
            sh, sdoc = np.empty(0, _U64), np.empty(0, np.int64)
        short = np.flatnonzero((counts > 0) & (counts < k))
        if len(short):
            starts = np.searchsorted(doc, short)
            extra = np.array(
                [
                    (words[s : s + c] * self.mult[:c]).sum(dtype=_U64)
                    for s, c in zip(starts, counts[short], strict=True)
                ],
                dtype=_U64,
            )
            sh, sdoc = np.concatenate([sh, extra]), np.concatenate([sdoc, short])
            order = np.argsort(sdoc, kind="stable")
            sh, sdoc = sh[order], sdoc[order]
        sh ^= sh >> _U64(31)  # final mix so that low-entropy combinations spread over 64 bits
        sh *= _U64(0xBF58476D1CE4E5B9)
        sh ^= sh >> _U64(29)
        return sh, sdoc

    def signatures(self, sh: np.ndarray, sdoc: np.ndarray, ndocs: int) -> np.ndarray:
        out = np.full((ndocs, self.a.shape[0]), _EMPTY, dtype=np.uint32)
        if len(sh) == 0:
            return out
        h = self.a * sh[None, :]
        h += self.b
        starts = np.flatnonzero(np.r_[True, sdoc[1:] != sdoc[:-1]])
        mins = np.minimum.reduceat(h, starts, axis=1)
        out[sdoc[starts]] = (mins >> _U64(32)).astype(np.uint32).T
        return out


def _blocks(texts: Iterable[str]) -> Iterable[list[bytes] | bytes]:
    """Blocks of about ``_BLOCK_BYTES`` of short texts; a longer text comes alone, as bytes."""
    block: list[bytes] = []
    size = 0
    for t in texts:
        b = t.lower().encode("utf-8", "surrogatepass")
        if len(b) > _BLOCK_BYTES:
            if block:
                yield block
                block, size = [], 0
            yield b
            continue
        block.append(b)
        size += len(b) + 1
        if size >= _BLOCK_BYTES:
            yield block
            block, size = [], 0
    if block:
        yield block


def _windows(buf: bytes) -> Iterable[bytes]:
    """``buf`` in pieces of at most ``_BLOCK_BYTES``, each cut just after a separator byte (so no
    word is split, unless one word is longer than a whole piece)."""
    u = np.frombuffer(buf, dtype=np.uint8)
    start, n = 0, len(u)
    while start < n:
        end = min(start + _BLOCK_BYTES, n)
        if end < n:
            seps = np.flatnonzero(_SEP[u[start:end]])
            if len(seps):
                end = start + int(seps[-1]) + 1
        yield buf[start:end]
        start = end


def _long_signature(hasher: _Hasher, buf: bytes) -> np.ndarray:
    """Signature of one long text, one window at a time, so memory stays that of one block instead
    of ``num_perm`` x 8 bytes per shingle of the whole text. Each window's words are shingled with
    the last ``ngram - 1`` words of the previous ones, so the shingles are exactly the text's."""
    k = hasher.ngram
    sig = np.full((1, hasher.a.shape[0]), _EMPTY, dtype=np.uint32)
    carry = np.empty(0, _U64)
    shingled = False
    for piece in _windows(buf):
        words, _ = hasher.words(piece, np.zeros(1, np.int64))
        if len(words) == 0:
            continue
        words = np.concatenate([carry, words])
        if len(words) >= k:
            sh, sdoc = hasher.shingles(words, np.zeros(len(words), np.int64), 1)
            np.minimum(sig, hasher.signatures(sh, sdoc, 1), out=sig)
            shingled = True
        carry = words[len(words) - (k - 1) :] if len(words) >= k else words
    if not shingled and len(carry):  # fewer than ngram words in all: one short shingle, as for a block
        sh, sdoc = hasher.shingles(carry, np.zeros(len(carry), np.int64), 1)
        sig = hasher.signatures(sh, sdoc, 1)
    return sig


def minhash(
    texts: Iterable[str], *, num_perm: int = NUM_PERM, ngram: int = NGRAM, seed: int = 0
) -> np.ndarray:
    """MinHash signatures, shape ``(len(texts), num_perm)``, uint32.

    Text is lower-cased and split into words at whitespace and ASCII punctuation; shingles are
    ``ngram`` consecutive words. A row with no words gets an all-``0xFFFFFFFF`` signature.
    Texts longer than a block are hashed window by window (same signature, bounded memory).
    """
    hasher = _Hasher(num_perm, ngram, seed)
    parts = []
    for block in _blocks(texts):
        if isinstance(block, bytes):
            parts.append(_long_signature(hasher, block))
            continue
        lens = np.fromiter((len(b) + 1 for b in block), dtype=np.int64, count=len(block))
        doc_starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
        words, doc = hasher.words(b"\0".join(block), doc_starts)
        sh, sdoc = hasher.shingles(words, doc, len(block))
        parts.append(hasher.signatures(sh, sdoc, len(block)))
    if not parts:
        return np.empty((0, num_perm), dtype=np.uint32)
    return np.concatenate(parts)


def lsh_params(threshold: float, num_perm: int, recall: float = 0.97) -> tuple[int, int]:
    """(bands, rows) for LSH banding: the most rows per band (fewest false candidates) that still
    make a pair at exactly ``threshold`` a candidate with probability >= ``recall``. Every
    candidate is verified afterwards, so extra candidates cost time, not correctness."""
    for r in range(num_perm, 0, -1):
        b = num_perm // r
        if 1 - (1 - threshold**r) ** b >= recall:
            return b, r
    return num_perm, 1


def candidate_pairs(sigs: np.ndarray, bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i < j) sharing at least one LSH band. Within a bucket, each member is paired with the
    bucket's first member and its predecessor, which keeps big buckets linear instead of quadratic."""
    n = len(sigs)
    valid = sigs[:, 0] != _EMPTY
    rng = np.random.default_rng(12345)
    mult = _rng_u64(rng, rows) | _U64(1)
    out_i, out_j = [], []
    for band in range(bands):
        cols = sigs[:, band * rows : (band + 1) * rows].astype(_U64)
        key = (cols * mult).sum(axis=1, dtype=_U64)
        order = np.argsort(key, kind="stable")
        order = order[valid[order]]
        k = key[order]
        same = k[1:] == k[:-1]
        if not same.any():
            continue
        run_start = np.maximum.accumulate(np.where(np.r_[True, ~same], np.arange(len(k)), 0))
        idx = np.flatnonzero(same) + 1
        out_i += [order[idx - 1], order[run_start[idx]]]
        out_j += [order[idx], order[idx]]
    if not out_i:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    i, j = np.concatenate(out_i), np.concatenate(out_j)
    i, j = np.minimum(i, j), np.maximum(i, j)
    keep = i != j
    pair = np.unique(i[keep].astype(np.int64) * n + j[keep])
    return pair // n, pair % n


def similar_pairs(
    sigs: np.ndarray, threshold: float = 0.8, *, bands: int | None = None, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Verified near-duplicate pairs: (i, j, estimated Jaccard) with similarity >= threshold."""
    if bands is None or rows is None:
        bands, rows = lsh_params(threshold, sigs.shape[1])
    i, j = candidate_pairs(sigs, bands, rows)
    sims = np.empty(len(i), dtype=np.float32)
    step = max(1, (1 << 22) // max(1, sigs.shape[1]))
    for s in range(0, len(i), step):
        sims[s : s + step] = (sigs[i[s : s + step]] == sigs[j[s : s + step]]).mean(axis=1)
    keep = sims >= threshold
    return i[keep], j[keep], sims[keep]


def cluster_labels(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Union-find over the pairs: each row's label is the smallest row index in its cluster."""
    labels = np.arange(n)
    if len(i) == 0:
        return labels
    while True:
        m = np.minimum(labels[i], labels[j])
        new = labels.copy()
        np.minimum.at(new, i, m)
        np.minimum.at(new, j, m)
        new = new[new]  # pointer jumping
        while True:
            nxt = new[new]
            if np.array_equal(nxt, new):
                break
            new = nxt
        if np.array_equal(new, labels):
            return labels
        labels = new


@dataclass
class NearDupResult:
    """Near-duplicate structure of one collection of texts."""

    labels: np.ndarray  # cluster label per row (smallest member index)
    pair_i: np.ndarray
    pair_j: np.ndarray
    pair_sim: np.ndarray

    def clusters(self) -> list[np.ndarray]:
        """Clusters with two or more members, each sorted, ordered by first member."""
        n = len(self.labels)
        counts = np.bincount(self.labels, minlength=n)
        multi = counts[self.labels] > 1
        rows = np.flatnonzero(multi)
        order = np.lexsort((rows, self.labels[rows]))
        rows = rows[order]
        if len(rows) == 0:
            return []
        cuts = np.flatnonzero(np.diff(self.labels[rows])) + 1
        return np.split(rows, cuts)

    def redundant_rows(self) -> np.ndarray:
        """Rows that a keep-first dedup would drop."""
        return np.flatnonzero(self.labels != np.arange(len(self.labels)))


def near_duplicates(
    texts: Sequence[str] | np.ndarray,
    threshold: float = 0.8,
    *,
    num_perm: int = NUM_PERM,
    ngram: int = NGRAM,
    seed: int = 0,
) -> NearDupResult:
    """Find near-duplicate pairs and clusters among ``texts`` (or precomputed signatures)."""
    sigs = (
        texts if isinstance(texts, np.ndarray) else minhash(texts, num_perm=num_perm, ngram=ngram, seed=seed)
    )
    i, j, s = similar_pairs(sigs, threshold)
    return NearDupResult(cluster_labels(len(sigs), i, j), i, j, s)


def cross_duplicates(
    sigs_a: np.ndarray, sigs_b: np.ndarray, threshold: float = 0.8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (row in a, row in b, similarity) across two collections, e.g. train and eval."""
    na = len(sigs_a)
    i, j, s = similar_pairs(np.concatenate([sigs_a, sigs_b]), threshold)
    cross = (i < na) & (j >= na)
    return i[cross], j[cross] - na, s[cross]
