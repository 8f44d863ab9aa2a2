"""PII detection: checksums, masking, redaction, and the vectorised prefilter never missing a hit."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from tunelab.data.pii import candidate_rows, find_pii, iban_ok, luhn_ok, redact, scan

TEXT = (
    "Mail john.doe@example.com or +44 20 7946 0958, (555) 123-4567, card 4111 1111 1111 1111, "
    "bad 4111 1111 1111 1112, ip 192.168.1.20. v6 2001:db8::8a2e:370:7334 at 10:30:00. "
    "IBAN GB82 WEST 1234 5698 7654 32, DE89370400440532013000, version 1.2.3, year 2024, id 12345."
)


def test_kinds_found():
    kinds = [f.kind for f in find_pii(TEXT)]
    assert kinds.count("email") == 1 and kinds.count("phone") == 2 and kinds.count("credit_card") == 1
    assert kinds.count("ip") == 2 and kinds.count("iban") == 2


def test_checksums():
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB00 WEST 1234 5698 7654 32")


def test_redact_placeholders():
    out = redact(TEXT)
    for ph in ("<EMAIL>", "<PHONE>", "<CREDIT_CARD>", "<IP>", "<IBAN>"):
        assert ph in out
    assert "4111 1111 1111 1112" in out and "10:30:00" in out and "1.2.3," in out
    assert "john.doe" not in out


def test_masks_hide_values():
    for f in find_pii(TEXT):
        assert TEXT[f.start : f.end] != f.masked and "*" in f.masked


_pieces = st.sampled_from(
    [
        "a@b.co",
        "x.y@mail.example.org",
        "4111 1111 1111 1111",
        "+1 415 555 0100",
        "10.0.0.1",
        "::1",
        "fe80::1",
        "GB82WEST12345698765432",
        "2024",
        "3.5",
        "word",
        "Note:",
        "(555) 123-4567",
        "1.2.3.4.5",
        "AB12",
        " ",
        "\n",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_pieces, st.text(max_size=8)), max_size=30))
def test_prefilter_is_a_superset(parts):
    text = " ".join(parts)
    assert not find_pii(text) or candidate_rows([text])[0]


def test_scan_matches_find_pii():
    rng = random.Random(0)
    texts = [" ".join(rng.choice(TEXT.split() + ["plain"] * 50) for _ in range(30)) for _ in range(300)]
    assert [i for i, _ in scan(texts)] == [i for i, t in enumerate(texts) if find_pii(t)]
