"""Audit findings on planted-problem fixtures, asserted by count."""

from __future__ import annotations

import json

import pytest
from planted_data import PLANTED, write_jsonl

from tunelab.data.audit import audit, audit_records, blocking_problems


@pytest.fixture
def report(planted):
    train, ev = planted
    return audit(train, eval_paths=[ev], max_length=60, skip_bad=True)  # planted: one row does not fit


def test_schema_version_and_json(report):
    assert report["schema_version"] == 1
    assert json.loads(json.dumps(report)) == report
    assert report["rows"] == PLANTED["rows"] and report["format"] == "instruction"


def test_duplicates(report):
    assert report["exact_duplicates"]["rows"] == PLANTED["exact_rows"]
    assert report["exact_duplicates"]["clusters"] == PLANTED["exact_clusters"]
    assert report["exact_duplicates"]["examples"][0] == [1, 41]
    nd = report["near_duplicates"]
    assert nd["pairs"] == PLANTED["near_pairs"] and nd["rows"] == 2 and nd["clusters"] == 2
    assert sorted(tuple(e["rows"]) for e in nd["examples"]) == [(4, 44), (5, 45)]


def test_leakage(report):
    (lk,) = report["leakage"]
    assert (lk["eval_rows"], lk["exact"], lk["near"]) == (12, 1, 1)
    kinds = {(e["kind"], e["train_row"], e["eval_row"]) for e in lk["examples"]}
    assert kinds == {("exact", 7, 11), ("near", 8, 12)}


def test_pii_counts_and_masking(report, planted):
    pii = report["pii"]
    for kind in ("email", "credit_card", "phone", "ip", "iban"):
        assert pii[kind]["rows"] == PLANTED[kind], kind
    assert pii["credit_card"]["row_numbers"] == [48]  # the Luhn-invalid card on row 49 does not count
    assert pii["iban"]["row_numbers"] == [52]  # nor the IBAN with a bad checksum on row 53
    text = json.dumps(report)
    for secret in ("ana.lopez", "4111 1111 1111 1111", "7946 0958", "192.168.10.20", "WEST 1234"):
        assert secret not in text


def test_completeness_schema_targets(report):
    inp = report["completeness"]["input"]
    assert (inp["missing"], inp["empty"], inp["whitespace"]) == (
        PLANTED["input_missing"],
        PLANTED["input_empty"],
        PLANTED["input_whitespace"],
    )
    assert report["schema"]["inconsistent_rows"] == 1
    assert report["schema"]["examples"][0]["missing_keys"] == ["input"]
    assert report["empty_targets"]["rows"] == PLANTED["empty_targets"]
    # Issue 15: an empty assistant turn is rejected per row (with its reason), not trained on.
    errors = report["format_errors"]
    assert errors["rows"] == PLANTED["format_errors"] and errors["examples"][0]["row"] == 54
    assert "output[0] is an empty assistant turn" in errors["examples"][0]["error"]


def test_lengths_and_hygiene(report):
    ln = report["lengths"]
    assert ln["unit"] == "words"
    assert ln["over_max_length"] == PLANTED["over"] and ln["response_cut_entirely"] == PLANTED["cut"]
    hy = report["hygiene"]
    assert hy["control_chars"]["rows"] == PLANTED["control"]
    assert hy["mojibake"]["rows"] == PLANTED["mojibake"]
    assert hy["too_short"]["rows"] == PLANTED["short"]


def test_blocking(report):
    problems = blocking_problems(report)
    assert len(problems) == 3 and report["blocking"] == problems


def test_tokenizer_lengths(planted):
    train, _ = planted
    report = audit(train, tokenizer=lambda s: list(s.encode()), max_length=200, skip_bad=True)
    assert report["lengths"]["unit"] == "tokens"
    assert report["lengths"]["max"] > 200 and report["lengths"]["over_max_length"] >= 2


def test_classification_balance(tmp_path):
    rows = [{"text": f"example number {i} here", "label": "a" if i < 6 else "b"} for i in range(8)]
    report = audit(write_jsonl(tmp_path / "c.jsonl", rows))
    assert report["labels"] == {"counts": {"a": 6, "b": 2}, "imbalance_ratio": 3.0}
    assert report["lengths"]["response_cut_entirely"] is None


def test_preference_chosen_equals_rejected():
    rows = [
        {"prompt": "q1 is here", "chosen": "good answer", "rejected": "bad answer"},
        {"prompt": "q2 is here", "chosen": "Same  answer", "rejected": "same answer"},
    ]
    report = audit_records(enumerate(rows, 1))
    assert report["format"] == "preference"
    assert report["preference"] == {"chosen_equals_rejected": 1, "examples": [2]}


def test_format_errors_are_reported_not_raised():
    rows = [{"instruction": "a b c", "output": "d e f"}, {"instruction": "x y z"}]
    report = audit_records(enumerate(rows, 1))
    assert report["format_errors"]["rows"] == 1 and report["format_errors"]["examples"][0]["row"] == 2
    assert any("do not fit" in p for p in report["blocking"])
