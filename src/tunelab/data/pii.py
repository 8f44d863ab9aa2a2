"""Find and redact personal data: e-mail, phone, credit card (Luhn), IP (v4/v6), IBAN (mod 97).

Findings carry a *masked* value only; the full value never leaves this module, so reports can
be printed and shared.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "PII_KINDS",
    "PiiMatch",
    "find_pii",
    "redact",
    "mask",
    "luhn_ok",
    "iban_ok",
    "candidate_rows",
    "scan",
]

PII_KINDS = ("email", "phone", "credit_card", "ip", "iban")
PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "credit_card": "<CREDIT_CARD>",
    "ip": "<IP>",
    "iban": "<IBAN>",
}

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
)
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_IPV4 = re.compile(
    r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\.?\d)"
)
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
# International (+CC ...) or North-American style (555) 123-4567 / 555-123-4567 / 555.123.4567.
_PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){1,4}"
    r"|\(\d{3}\) ?\d{3}[ .-]\d{4}|\d{3}[.-]\d{3}[.-]\d{4})(?![\w])"
)
_DIGIT_RUN = re.compile(r"\d[\d ().+/-]{5,}\d")
_IBAN_HINT = re.compile(r"[A-Z]{2}\d\d")


@dataclass(frozen=True)
class PiiMatch:
    """One finding: its kind, character span in the text, and a masked rendering."""

    kind: str
    start: int
    end: int
    masked: str


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a digit string."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(value: str) -> bool:
    """ISO 13616 mod-97 check of an IBAN (spaces allowed)."""
    s = value.replace(" ", "")
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def mask(value: str, kind: str = "") -> str:
    """Hide all but a few characters: ``j***@e******.com``, ``**** **** **** 1111``."""
    if kind == "email" and "@" in value:
        local, domain = value.split("@", 1)
        host, _, tld = domain.rpartition(".")
        return f"{local[:1]}***@{host[:1]}***.{tld}"
    keep_head = 2 if kind in ("iban", "ip") else 0
    alnum = [i for i, c in enumerate(value) if c.isalnum()]
    show = set(alnum[:keep_head]) | set(alnum[-4:] if kind != "ip" else [])
    return "".join(c if (i in show or not c.isalnum()) else "*" for i, c in enumerate(value))


class _Taken:
    """Character positions already claimed by a finding: one byte per character, so checking a new
    span costs its length, not the number of earlier findings (a list scan is quadratic on a row
    full of PII)."""

    def __init__(self, n: int):
        self.mask = bytearray(n)

    def claim(self, start: int, end: int) -> bool:
        if self.mask.find(1, start, end) != -1:
            return False
        self.mask[start:end] = b"\x01" * (end - start)
        return True


def find_pii(text: str, hints: tuple[bool, bool, bool, bool] | None = None) -> list[PiiMatch]:
    """All PII findings in ``text``, in order of position; checksums filter cards and IBANs.

    ``hints`` (e-mail, IBAN, IPv6, digit-run possible) come from the vectorised prefilter in
    :func:`scan`; without them they are computed here.
    """
    if hints is None:
        hints = ("@" in text, _IBAN_HINT.search(text) is not None, text.count(":") >= 2, True)
    found: list[PiiMatch] = []
    taken = _Taken(len(text))

    def add(kind: str, m: re.Match) -> None:
        if taken.claim(*m.span()):
            found.append(PiiMatch(kind, m.start(), m.end(), mask(m.group(), kind)))

    if hints[0]:
        for m in _EMAIL.finditer(text):
            add("email", m)
    if hints[2]:
        for m in _IPV6.finditer(text):
            if m.group().count(":") >= 2 and _ipv6_ok(m.group()):
                add("ip", m)
    if hints[1]:
        for m in _IBAN.finditer(text):
            if iban_ok(m.group()):
                add("iban", m)
    if hints[3]:
        # One cheap pass finds digit runs; the precise patterns only look inside them.
        for run in _DIGIT_RUN.finditer(text):
            lo, hi = max(0, run.start() - 2), min(len(text), run.end() + 2)
            for m in _CARD.finditer(text, lo, hi):
                digits = m.group().replace(" ", "").replace("-", "")
                if 13 <= len(digits) <= 19 and luhn_ok(digits):
                    add("credit_card", m)
            for m in _IPV4.finditer(text, lo, hi):
                add("ip", m)
            for m in _PHONE.finditer(text, lo, hi):
                if 7 <= sum(c.isdigit() for c in m.group()) <= 15:
                    add("phone", m)
    return sorted(found, key=lambda f: f.start)


def _ipv6_ok(s: str) -> bool:
    """A real IPv6 address written out: valid, with at least two groups and a digit in them. ``::``
    alone, ``::1`` (loopback) and word-like ``dead::beef`` are not addresses of anyone (``lol ::
    http`` once became ``lol <IP> http``)."""
    groups = [g for g in s.split(":") if g]
    if len(groups) < 2 or not any(c.isdigit() for c in s):
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def redact(text: str, kinds: tuple[str, ...] = PII_KINDS) -> str:
    """Replace each finding of the given kinds with its typed placeholder, e.g. ``<EMAIL>``."""
    out, pos = [], 0
    for f in find_pii(text):
        if f.kind in kinds:
            out += [text[pos : f.start], PLACEHOLDERS[f.kind]]
            pos = f.end
    out.append(text[pos:])
    return "".join(out)


_UPPER = np.zeros(256, dtype=bool)
_UPPER[65:91] = True
_HEX = np.zeros(256, dtype=bool)
_HEX[[ord(c) for c in "0123456789abcdefABCDEF:"]] = True


def _block_flags(block: list[bytes]) -> np.ndarray:
    """Per row of one block: could it hold (e-mail, IBAN, IPv6, digit-run) PII? A cheap superset of
    what the regexes find, computed on the sparse positions of '@', ':' and digits only."""
    lens = np.fromiter((len(b) + 1 for b in block), dtype=np.int64, count=len(block))
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    u = np.frombuffer(b"\0".join(block) + b"\0\0\0\0", dtype=np.uint8)
    flags = np.zeros((len(block), 4), dtype=bool)

    def mark(col: int, pos: np.ndarray) -> None:
        if len(pos):
            flags[np.searchsorted(starts, pos, side="right") - 1, col] = True

    mark(0, np.flatnonzero(u == 64))
    col = np.flatnonzero(u == 58)
    col = col[col > 0]
    mark(2, col[_HEX[u[col - 1]] & _HEX[u[col + 1]]])
    d = np.flatnonzero((u >= 48) & (u <= 57))
    if len(d) == 0:
        return flags
    q = d[d >= 3]
    mark(1, q[_UPPER[u[q - 3]] & _UPPER[u[q - 2]] & (u[q - 1] >= 48) & (u[q - 1] <= 57)])
    # Digit runs: digits at most 3 bytes apart ("(555) 123" has the widest gap of the patterns).
    new_run = np.r_[True, np.diff(d) > 3]
    run = np.cumsum(new_run) - 1
    first = np.flatnonzero(new_run)
    ndig = np.diff(np.append(first, len(d)))
    run_lo, run_hi = d[first], d[np.append(first[1:], len(d)) - 1]
    dots = np.flatnonzero(u == 46)
    ndot = np.searchsorted(dots, run_hi) - np.searchsorted(dots, run_lo)
    ok = (ndig >= 7) | ((ndig >= 4) & (ndot >= 3))
    mark(3, run_lo[ok[run[first]]])
    return flags


def _text_hints(text: str) -> np.ndarray:
    return np.array([["@" in text, _IBAN_HINT.search(text) is not None, text.count(":") >= 2, True]])


def _hints(texts: Sequence[str], block_bytes: int = 1 << 16) -> np.ndarray:
    out, block, size = [], [], 0
    for t in texts:
        if len(t) > block_bytes:
            # A long text alone: the scalar checks of find_pii, as the byte-wise prefilter would
            # hold several arrays of 1-8 bytes per byte of it.
            if block:
                out.append(_block_flags(block))
                block, size = [], 0
            out.append(_text_hints(t))
            continue
        block.append(t.encode("utf-8", "surrogatepass"))
        size += len(block[-1])
        if size >= block_bytes:
            out.append(_block_flags(block))
            block, size = [], 0
    if block:
        out.append(_block_flags(block))
    return np.concatenate(out) if out else np.zeros((0, 4), dtype=bool)


def candidate_rows(texts: Sequence[str]) -> np.ndarray:
    """Boolean mask of rows worth running :func:`find_pii` on (vectorised prefilter)."""
    return _hints(texts).any(axis=1)


def scan(texts: Sequence[str]) -> Iterator[tuple[int, list[PiiMatch]]]:
    """Yield ``(index, findings)`` for every text with at least one finding."""
    hints = _hints(texts)
    for i in np.flatnonzero(hints.any(axis=1)):
        found = find_pii(texts[i], tuple(hints[i].tolist()))
        if found:
            yield int(i), found
