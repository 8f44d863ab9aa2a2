"""Fixtures for the data tests (the planted data itself lives in planted_data.py)."""

from __future__ import annotations

import pytest
from planted_data import PLANTED, planted_eval, planted_train, write_jsonl


@pytest.fixture
def planted(tmp_path):
    train = planted_train()
    assert len(train) == PLANTED["rows"]
    return (
        write_jsonl(tmp_path / "train.jsonl", train),
        write_jsonl(tmp_path / "eval.jsonl", planted_eval(train)),
    )
