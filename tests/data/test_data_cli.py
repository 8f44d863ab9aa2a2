"""The `tunelab data` commands, through typer's test runner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tunelab.data.cli import app

runner = CliRunner()


def test_audit_json_and_strict(planted):
    train, ev = planted
    res = runner.invoke(
        app, ["audit", str(train), "--eval", str(ev), "--json", "--max-length", "60", "--skip-bad"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["schema_version"] == 1 and report["leakage"][0]["exact"] == 1
    strict = runner.invoke(app, ["audit", str(train), "--eval", str(ev), "--strict", "--skip-bad"])
    assert strict.exit_code == 1 and "blocking" in strict.stdout


def test_audit_table(planted):
    train, _ = planted
    res = runner.invoke(app, ["audit", str(train), "--skip-bad"], env={"COLUMNS": "160"})
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
    res = runner.invoke(app, ["clean", str(bad), "-o", str(tmp_path / "out.jsonl")])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.output and "Traceback" not in res.output
    # the audit lists the row and goes on (--skip-bad is still accepted, and changes nothing)
    for extra in ([], ["--skip-bad"]):
        res = runner.invoke(app, ["audit", str(bad), "--json", *extra])
        assert res.exit_code == 0 and json.loads(res.stdout)["rows_rejected"] == 1
        assert json.loads(res.stdout)["unreadable"]["examples"][0]["row"] == 2


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
    res = runner.invoke(
        app, ["audit", str(train), "--model", "tiny", "--max-length", "100", "--json", "--skip-bad"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["lengths"]["unit"] == "tokens" and report["settings"]["tokenizer"] == "tiny"
    assert report["lengths"]["max"] > 118  # BPE on made-up words: more tokens than words


def _rows(n: int) -> str:
    return "".join(
        json.dumps({"text": f"row number {i} says something different {i * 7}"}) + "\n" for i in range(n)
    )


def test_markup_in_names_and_rows_prints_as_written(tmp_path):
    """rich markup and emoji codes in user text are never interpreted (console markup/emoji off)."""
    p = tmp_path / "[red]x:smile:.jsonl"
    p.write_text(_rows(3) + '{"text": [bold red]BAD[/]}\n', encoding="utf-8")
    res = runner.invoke(app, ["clean", str(p), "-o", str(tmp_path / "out.jsonl")])
    assert res.exit_code == 2
    assert (
        res.stderr
        == f"error: {p}:4: invalid JSON: Expecting value (near: '{{\"text\": [bold red]BAD[/]}}')\n"
    )
    p.write_text(_rows(3), encoding="utf-8")
    res = runner.invoke(app, ["audit", str(p)])
    assert res.exit_code == 0 and res.stdout.startswith(f"{p}: 3 rows, format text\n")


def test_clean_never_overwrites_its_input(tmp_path, monkeypatch):
    src = tmp_path / "m.jsonl"
    src.write_text(_rows(5), encoding="utf-8")
    before = src.read_bytes()
    monkeypatch.chdir(tmp_path)
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    for out in (str(src), "m.jsonl", "./sub/../m.jsonl", str(link)):
        res = runner.invoke(app, ["clean", str(src), "-o", out, "--overwrite"])
        assert res.exit_code == 2 and "is the input file" in res.stderr, (out, res.output)
    assert src.read_bytes() == before
    res = runner.invoke(app, ["clean", "link.jsonl", "-o", "m.jsonl", "--overwrite"])  # input via a link
    assert res.exit_code == 2 and "is the input file" in res.stderr
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "link.jsonl",
        "m.jsonl",
    ]


def test_clean_refuses_existing_output_without_overwrite(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(_rows(5), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n", encoding="utf-8")
    res = runner.invoke(app, ["clean", str(src), "-o", str(out)])
    assert (
        res.exit_code == 2 and res.stderr == f"error: {out}: already exists; pass --overwrite to replace it\n"
    )
    assert out.read_text() == "precious\n"
    res = runner.invoke(app, ["clean", str(src), "-o", str(out), "--overwrite", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["output_rows"] == 5
    assert len(out.read_text().splitlines()) == 5


def test_output_directory_is_refused_and_nothing_left_behind(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(_rows(3), encoding="utf-8")
    d = tmp_path / "outdir"
    d.mkdir()
    res = runner.invoke(app, ["clean", str(src), "-o", str(d)])
    assert res.exit_code == 2 and res.stderr == f"error: {d}: is a directory; give a file path to write\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "outdir"]  # no outdir.tmp
    res = runner.invoke(app, ["split", str(src), "-o", str(src)])
    assert res.exit_code == 2 and "is a file, not a directory" in res.stderr


def test_split_into_the_input_directory_keeps_the_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(_rows(20), encoding="utf-8")
    before = (tmp_path / "train.jsonl").read_bytes()
    for extra in ([], ["--overwrite"]):
        res = runner.invoke(app, ["split", "train.jsonl", "-o", ".", *extra])
        assert res.exit_code == 2 and res.stderr.startswith("error: train.jsonl: is the input file"), (
            res.output
        )
    assert (tmp_path / "train.jsonl").read_bytes() == before
    res = runner.invoke(app, ["split", "train.jsonl", "-o", "sp", "--ratios", "0.5,0.5"])
    assert res.exit_code == 0
    res = runner.invoke(app, ["split", "train.jsonl", "-o", "sp", "--ratios", "0.5,0.5"])
    assert res.exit_code == 2 and "already exists; pass --overwrite" in res.stderr
    res = runner.invoke(app, ["split", "train.jsonl", "-o", "sp", "--ratios", "0.5,0.5", "--overwrite"])
    assert res.exit_code == 0 and sorted(p.name for p in (tmp_path / "sp").iterdir()) == [
        "split.json",
        "train.jsonl",
        "validation.jsonl",
    ]


def test_clean_skip_bad_writes_every_rejected_row(tmp_path):
    src = tmp_path / "in.jsonl"
    lines = _rows(2).splitlines()
    src.write_text("\n".join([lines[0], "{oops", lines[1], "[1, 2]", "\xff"]) + "\n", encoding="utf-8")
    out = tmp_path / "c.jsonl"
    res = runner.invoke(app, ["clean", str(src), "-o", str(out), "--skip-bad", "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    rejects_path = tmp_path / "c.jsonl.rejects.jsonl"
    assert summary["rejects"] == str(rejects_path) and summary["dropped"] == {"unreadable": 3}
    assert res.stderr == f"note: 3 unreadable rows skipped; each is in {rejects_path} with its reason\n"
    rejects = [json.loads(x) for x in rejects_path.read_text().splitlines()]
    assert [(r["file"], r["line"], r["raw"]) for r in rejects] == [
        (str(src), 2, "{oops"),
        (str(src), 4, "[1, 2]"),
        (str(src), 5, "\xff"),
    ]
    assert all(r["reason"] for r in rejects)
    log = [json.loads(x) for x in (tmp_path / "c.jsonl.changes.jsonl").read_text().splitlines()]
    assert [(e["row"], e["reason"]) for e in log] == [(2, "unreadable"), (4, "unreadable"), (5, "unreadable")]
    assert summary["input_rows"] == 5 and summary["kept"] == 2


def test_empty_file_is_an_error_everywhere(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_text("", encoding="utf-8")
    for args in (
        ["audit", "--strict"],
        ["clean", "-o", str(tmp_path / "o.jsonl")],
        ["split", "-o", str(tmp_path / "s")],
    ):
        res = runner.invoke(app, [args[0], str(empty), *args[1:]])
        assert (
            res.exit_code == 2
            and res.stderr == f"error: {empty}: no data rows (the file is empty); nothing to do\n"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.jsonl"]


def test_column_names_in_the_audit_table_print_as_written(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("text,[red]c:smile:\nhello there world,\nanother row here,x\n", encoding="utf-8")
    res = runner.invoke(app, ["audit", str(p)])
    assert res.exit_code == 0 and "'[red]c:smile:' missing/empty/blank" in res.stdout


def test_a_file_named_like_the_temporary_file_survives(tmp_path):
    """Outputs go through fresh temporary names: an existing OUT.tmp of the user's is never clobbered."""
    src = tmp_path / "in.jsonl"
    src.write_text(_rows(4), encoding="utf-8")
    mine = tmp_path / "c.jsonl.tmp"
    mine.write_text("mine\n", encoding="utf-8")
    res = runner.invoke(app, ["clean", str(src), "-o", str(tmp_path / "c.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    assert mine.read_text() == "mine\n" and not list(tmp_path.glob(".*.tmp"))
