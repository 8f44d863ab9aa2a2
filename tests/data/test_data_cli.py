"""The `tunelab data` commands, through typer's test runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tunelab.data.cli import app

runner = CliRunner()


def test_audit_json_and_strict(planted):
    train, ev = planted
    res = runner.invoke(app, ["audit", str(train), "--eval", str(ev), "--json", "--max-length", "60"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["schema_version"] == 1 and report["leakage"][0]["exact"] == 1
    strict = runner.invoke(app, ["audit", str(train), "--eval", str(ev), "--strict"])
    assert strict.exit_code == 1 and "blocking" in strict.stdout


def test_audit_table(planted):
    train, _ = planted
    res = runner.invoke(app, ["audit", str(train)], env={"COLUMNS": "160"})
    assert res.exit_code == 0 and "exact duplicate rows" in res.stdout and "a***@e***.org" in res.stdout


def test_clean_and_split(planted, tmp_path):
    train, _ = planted
    res = runner.invoke(app, ["clean", str(train), "-o", str(tmp_path / "c.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["kept"] == 55
    res = runner.invoke(
        app, ["split", str(tmp_path / "c.jsonl"), "-o", str(tmp_path / "sp"), "--ratios", "0.8,0.2"]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "sp" / "train.jsonl").exists() and (tmp_path / "sp" / "validation.jsonl").exists()


def test_errors_are_short_and_located(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n', encoding="utf-8")
    res = runner.invoke(app, ["audit", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["audit", str(bad), "--skip-bad", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["rows_rejected"] == 1


def test_columns_option(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text(
        json.dumps({"question": "what is it here", "answer": "a thing it is"}) + "\n", encoding="utf-8"
    )
    res = runner.invoke(app, ["audit", str(p), "--json"])
    assert res.exit_code == 2 and "Cannot tell the data format" in res.output
    res = runner.invoke(app, ["audit", str(p), "--json", "--columns", "instruction=question,output=answer"])
    assert res.exit_code == 0 and json.loads(res.stdout)["format"] == "instruction"


def test_model_option_counts_tokens(planted, monkeypatch):
    tiny = pytest.importorskip("tunelab.models.tiny")
    import tunelab.models.load as load

    tok = tiny.build_tiny_tokenizer()
    monkeypatch.setattr(load, "load_tokenizer", lambda spec, **kw: tok)
    train, _ = planted
    res = runner.invoke(app, ["audit", str(train), "--model", "tiny", "--max-length", "100", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["lengths"]["unit"] == "tokens" and report["settings"]["tokenizer"] == "tiny"
    assert report["lengths"]["max"] > 118  # BPE on made-up words: more tokens than words
