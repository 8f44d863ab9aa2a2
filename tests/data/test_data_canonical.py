"""The one streaming path of audit, clean and split (data/canonical.py), and what it must keep."""

from __future__ import annotations

import json

import numpy as np
import pytest
from planted_data import write_jsonl

from tunelab.data import canonical, neardup
from tunelab.data.audit import audit
from tunelab.data.canonical import StreamOptions, read_canonical, stream_canonical, text_hash
from tunelab.data.clean import clean
from tunelab.data.formats import FormatError
from tunelab.data.loaders import DataError
from tunelab.data.split import split

ROWS = [
    (1, {"instruction": "add two and two", "output": "four"}),
    (2, {"instruction": "no output here"}),  # does not fit the instruction format
    (3, {"instruction": "Add  TWO and two", "output": "FOUR"}),
    (4, {"instruction": "name a colour", "input": "sky", "output": "blue"}),
    (5, {"instruction": "", "output": "empty prompt"}),
]


def test_chunks_cover_every_row_in_order_with_hashes_and_signatures() -> None:
    chunks = list(stream_canonical(ROWS, None, None, chunk=2, options=StreamOptions(prompts=True)))
    assert [len(ch.records) for ch in chunks] == [2, 2, 1]
    assert {ch.fmt for ch in chunks} == {"instruction"}
    assert [r for ch in chunks for r in ch.rows] == [1, 3, 4, 5]
    assert [(ch.records[k][0], "output" in msg) for ch in chunks for k, msg in ch.errors] == [(2, True)]
    texts = [t for ch in chunks for t in ch.texts]
    hashes = np.concatenate([ch.hashes for ch in chunks])
    assert hashes.tolist() == [text_hash(t) for t in texts]
    assert hashes[0] == hashes[1]  # case and spacing do not matter
    prompts = [p for ch in chunks for p in ch.prompts]
    assert np.concatenate([ch.prompt_hashes for ch in chunks]).tolist() == [text_hash(p) for p in prompts]
    sigs = np.concatenate([ch.sigs for ch in chunks])
    assert sigs.shape == (4, neardup.NUM_PERM)
    assert np.array_equal(sigs, neardup.minhash(texts))


def test_a_fallback_keeps_rows_that_do_not_fit() -> None:
    (ch,) = stream_canonical(ROWS, "instruction", None, options=StreamOptions(fallback=lambda rec: "raw"))
    assert ch.rows == [1, 2, 3, 4, 5] and ch.index == [0, 1, 2, 3, 4]
    assert ch.canon[1] == {} and ch.texts[1] == "raw"
    assert [k for k, _ in ch.errors] == [1]  # still listed as not fitting
    assert ch.prompts is None and ch.prompt_hashes is None


def test_signatures_only_when_asked() -> None:
    (ch,) = stream_canonical(ROWS, None, None, options=StreamOptions(signatures=False))
    assert ch.sigs is None and len(ch.hashes) == 4


def test_the_format_is_detected_before_the_second_row_is_read() -> None:
    def records():
        yield 1, {"colour": "blue"}
        raise AssertionError("read past the first row")

    with pytest.raises(FormatError, match="f.jsonl:1:"):
        next(stream_canonical(records(), None, None, source="f.jsonl"))


def test_read_canonical_names_the_row_that_does_not_fit(tmp_path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [rec for _, rec in ROWS])
    with pytest.raises(DataError, match="d.jsonl.*2"):
        read_canonical(str(path))
    rows, report, fmt = read_canonical(str(path), "text", {"text": "instruction"})
    assert fmt == "text" and report.rows_read == 5 and rows[3] == (4, {"text": "name a colour"})


def _outputs(planted, out) -> dict:
    train, ev = planted
    report = audit(train, eval_paths=[ev], max_length=60, skip_bad=True)
    summary = clean(train, out / "clean.jsonl", max_length=60)
    split(train, out / "split")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    contents = {p.relative_to(out).as_posix(): p.read_text().replace(str(out), "OUT") for p in files}
    return {"audit": report, "clean": json.dumps(summary).replace(str(out), "OUT"), "files": contents}


def test_results_do_not_depend_on_the_chunk_size(planted, tmp_path, monkeypatch) -> None:
    """Chunks are only a memory bound: audit, clean and split give the same results with chunks of
    7 rows (rows of one duplicate cluster in different chunks) as in one chunk."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _outputs(planted, tmp_path / "a")
    monkeypatch.setattr(canonical, "CHUNK", 7)
    chunked = _outputs(planted, tmp_path / "b")
    assert chunked == whole
    assert whole["audit"]["exact_duplicates"]["rows"] == 3  # the planted duplicates were found
    assert len(whole["files"]) == 7  # clean: data, changes, summary; split: 3 files + split.json


def test_split_reports_a_missing_key_before_reading_later_rows(tmp_path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"text": "a b c", "g": 1}), json.dumps({"text": "d e f"}), "{not json"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="missing key column 'g'") as e:
        split(path, tmp_path / "out", by="group", key="g")
    assert e.value.line == 2
