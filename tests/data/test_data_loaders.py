"""Loaders: every format, located errors, skip-bad accounting, and property tests on corrupted input."""

from __future__ import annotations

import contextlib
import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunelab.data.loaders import DataError, LoadReport, iter_records, load_records

ROWS = [{"text": "hello", "label": "a"}, {"text": 'wörld, with "quotes"\nand a newline', "label": "b"}]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_json_csv_tsv_parquet_and_disk_agree(tmp_path):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    paths = [_write_jsonl(tmp_path / "a.jsonl", ROWS)]
    (tmp_path / "a.json").write_text(json.dumps(ROWS), encoding="utf-8")
    paths.append(tmp_path / "a.json")
    for name, delim in (("a.csv", ","), ("a.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8-sig") as fh:  # with a BOM
            w = csv.DictWriter(fh, fieldnames=["text", "label"], delimiter=delim)
            w.writeheader()
            w.writerows(ROWS)
        paths.append(tmp_path / name)
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet", row_group_size=1)
    paths.append(tmp_path / "a.parquet")
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    paths.append(tmp_path / "ds")
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dd"))
    paths.append(tmp_path / "dd")
    for p in paths:
        assert load_records(p) == ROWS, p


def test_row_numbers_are_physical_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n', encoding="utf-8")
    assert [r for r, _ in iter_records(p)] == [1, 3]
    c = tmp_path / "a.csv"
    c.write_text('x,y\n1,"multi\nline"\n2,z\n', encoding="utf-8")
    assert [r for r, _ in iter_records(c)] == [2, 4]


def test_bom_is_stripped(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"k": "v"}).encode() + b"\n")
    assert load_records(p) == [{"k": "v"}]


@pytest.mark.parametrize(
    "content, line, reason",
    [
        (b'{"a": 1}\n{"a": \n', 2, "invalid JSON"),
        (b'{"a": 1}\n[1, 2]\n', 2, "expected a JSON object"),
        (b'{"a": 1}\n{"a": "\xff"}\n', 2, "invalid UTF-8"),
    ],
)
def test_bad_line_raises_with_path_line_snippet(tmp_path, content, line, reason):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(DataError) as exc:
        load_records(p)
    e = exc.value
    assert (e.path, e.line) == (str(p), line)
    assert reason in str(e) and f"bad.jsonl:{line}" in str(e) and e.snippet
    assert len(e.snippet) <= 80


def test_json_array_error_has_line(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text('[\n {"a": 1},\n {"a": oops}\n]', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_records(p)
    assert exc.value.line == 3 and "oops" in exc.value.snippet


def test_csv_wrong_field_count(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("x,y\n1,2\n1,2,3\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"a.csv:3: row has 3 fields"):
        load_records(p)
    report = LoadReport()
    assert load_records(p, skip_bad=True, report=report) == [{"x": "1", "y": "2"}]
    assert report.rows_rejected == 1


def test_skip_bad_writes_rejects(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a": 1}\nnot json\n"str"\n{"a": "\xfe"}\n{"a": 2}\n')
    report = LoadReport()
    rows = load_records(p, skip_bad=True, rejects_path=tmp_path / "rej.jsonl", report=report)
    assert rows == [{"a": 1}, {"a": 2}]
    assert (report.rows_read, report.rows_rejected) == (2, 3)
    rejects = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [2, 3, 4]
    assert all(set(r) == {"file", "line", "reason", "raw"} and r["file"] == str(p) for r in rejects)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "a.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(tmp_path / "a.xml")


def test_hub_id_offline_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="HF_HUB_OFFLINE"):
        load_records("someone/some-dataset")


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_good_line = st.dictionaries(st.text(max_size=8), _json_values, max_size=4).map(
    lambda d: json.dumps(d, ensure_ascii=False).encode()
)
_bad_line = st.binary(max_size=30).filter(lambda b: b"\n" not in b and b"\r" not in b) | st.text(
    string.printable.replace("\n", "").replace("\r", ""), max_size=30
).map(str.encode)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.one_of(_good_line, _bad_line), max_size=25), bom=st.booleans())
def test_property_nothing_lost(tmp_path, lines, bom):
    p = tmp_path / "p.jsonl"
    data = (b"\xef\xbb\xbf" if bom else b"") + b"\n".join(lines) + (b"\n" if lines else b"")
    p.write_bytes(data)
    total = data.count(b"\n") + (bool(data) and not data.endswith(b"\n"))
    try:
        load_records(p)
    except DataError as e:
        assert e.line >= 1
    report = LoadReport()
    rows = load_records(p, skip_bad=True, rejects_path=tmp_path / "r.jsonl", report=report)
    assert all(isinstance(r, dict) for r in rows)
    assert report.rows_read == len(rows)
    assert report.rows_read + report.rows_rejected + report.blank_lines == total


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), suffix=st.sampled_from([".jsonl", ".json", ".csv", ".tsv", ".parquet"]))
def test_property_random_bytes_only_raise_data_error(tmp_path, data, suffix):
    p = tmp_path / f"r{suffix}"
    p.write_bytes(data)
    with contextlib.suppress(DataError):
        load_records(p)
    try:
        load_records(p, skip_bad=True)
    except DataError as e:
        # Only whole-file problems survive skip_bad.
        assert suffix in (".json", ".parquet", ".csv")
        assert e.line in (0, 1) or suffix == ".json"
