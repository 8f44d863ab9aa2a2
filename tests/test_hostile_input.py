"""Every `tunelab data` command on hostile input: one located line on stderr, exit 2, no traceback.

The commands run through the real `tunelab` app (typer's runner), so what is checked is what a user
sees: stderr holds exactly one line, it names the file (and the line where one applies), user text
in it (file names, row contents) is printed as written (no markup, no emoji codes), and nothing
is written next to the outputs.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tunelab.cli import app

runner = CliRunner()
COMMANDS = ("audit", "clean", "split", "show")
DEEP = 10_000


@pytest.fixture(autouse=True)
def no_tokenizer(monkeypatch):
    """`data show` must reject bad input before it loads a tokenizer (validation before work)."""
    import tunelab.models.load as load

    def refuse(spec, **kw):
        raise AssertionError("the tokenizer was loaded before the input was checked")

    monkeypatch.setattr(load, "tokenizer_for", refuse)


def run(command: str, path: Path | str, out: Path, *extra: str):
    args = ["data", command, str(path), *extra]
    if command == "clean":
        args += ["-o", str(out / "clean.jsonl")]
    elif command == "split":
        args += ["-o", str(out / "split")]
    elif command == "show":
        args += ["--model", "tiny:llama"]
    return runner.invoke(app, args, env={"COLUMNS": None})


def error_line(res) -> str:
    """The single stderr line of a failed command (asserting exit 2, one line, no traceback)."""
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    lines = res.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def nothing_written(out: Path) -> None:
    assert not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


GOOD = b'{"text": "a perfectly fine first row"}\n'

# name -> (file name, content, line the error names (None: the whole file), text it must contain)
BAD_FILES = {
    "empty": ("empty.jsonl", b"", None, "no data rows (the file is empty)"),
    "binary": (
        "garbage.jsonl",
        GOOD + bytes(b for b in range(256) if b != 10) * 4 + b"\n",
        2,
        "invalid UTF-8 byte",
    ),
    "non_utf8": ("latin1.jsonl", GOOD + '{"text": "caf\xe9"}\n'.encode("latin-1"), 2, "invalid UTF-8"),
    "trailing_comma": ("comma.jsonl", GOOD + b'{"text": "a",}\n', 2, "invalid JSON"),
    "deep": (
        "deep.jsonl",
        GOOD + b'{"text": ' + b"[" * DEEP + b"]" * DEEP + b"}\n",
        2,
        "nested more than 100 levels deep",
    ),
    "headerless_csv": (
        "nohead.csv",
        b"what a lovely film,positive\nterrible plot,negative\n",
        1,
        "if the file has no header row, add one",
    ),
    "markup_name_and_row": (
        "[red]x:smile:.jsonl",
        GOOD + b'{"text": [bold red]BAD[/] :smile: \\ \xf0\x9f\x99\x82}\n',
        2,
        "[bold red]BAD[/] :smile: \\ \U0001f642",
    ),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_located_line(tmp_path, command, case):
    name, data, line, text = BAD_FILES[case]
    path = write(tmp_path, name, data)
    out = tmp_path / "out"
    out.mkdir()
    if command == "audit" and data.startswith(GOOD):
        # The audit never stops at a row: the bad one is listed with its reason, --strict fails.
        res = run(command, path, out, "--json")
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output
        listed = json.loads(res.stdout)["unreadable"]
        assert listed["rows"] == 1 and listed["examples"][0]["row"] == line, listed
        assert text.split(" (")[0] in listed["examples"][0]["error"] or case == "markup_name_and_row"
        assert run(command, path, out, "--strict").exit_code == 1
        nothing_written(out)
        return
    msg = error_line(run(command, path, out))
    where = f"{path}:{line}:" if line else f"{path}:"
    assert where in msg and text in msg, msg
    nothing_written(out)
    assert path.read_bytes() == data  # the input is untouched


def test_long_line_number_is_not_an_emoji(tmp_path):
    """`:1234:` once printed as an emoji; the location must come back as written."""
    path = write(tmp_path, "file.jsonl", GOOD * 1233 + b"{broken\n")
    msg = error_line(run("clean", path, tmp_path))
    assert f"{path}:1234: invalid JSON" in msg


@pytest.mark.parametrize("command", COMMANDS)
def test_directory_instead_of_file(tmp_path, command):
    folder = tmp_path / "[b]dir:x:"
    folder.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    msg = error_line(run(command, folder, out))
    assert f"{folder}: is a directory" in msg
    nothing_written(out)


@pytest.mark.parametrize("command", ["audit", "clean"])
def test_deep_nesting_with_skip_bad_is_a_rejected_row(tmp_path, command):
    path = write(tmp_path, "deep.jsonl", GOOD + b'{"text": ' + b"[" * DEEP + b"]" * DEEP + b"}\n" + GOOD)
    res = run(command, path, tmp_path, "--skip-bad", "--json")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    summary = json.loads(res.stdout)
    if command == "audit":
        assert summary["rows"] == 2 and summary["rows_rejected"] == 1
        return
    assert summary["dropped"]["unreadable"] == 1
    rejects = [json.loads(x) for x in Path(summary["rejects"]).read_text().splitlines()]
    assert [(r["file"], r["line"]) for r in rejects] == [(str(path), 2)]
    assert "nested more than 100 levels" in rejects[0]["reason"]


def test_null_field(tmp_path):
    """A null field is called null (not missing), with file, line and field name, in every command."""
    path = write(
        tmp_path,
        "null.jsonl",
        b'{"instruction": "q one", "output": "a"}\n{"instruction": "q", "output": null}\n',
    )
    msg = error_line(run("show", path, tmp_path, "-n", "2"))
    assert f"{path}:2: field 'output' is null" in msg
    # the audit lists the row with the reason show (and training) give for it, and goes on
    res = run("audit", path, tmp_path, "--json")
    assert res.exit_code == 0
    errors = json.loads(res.stdout)["format_errors"]
    assert errors["examples"] == [
        {"row": 2, "error": "field 'output' is null; give it a value or drop the row"}
    ]
    assert errors["examples"][0]["error"] in msg
    res = run("audit", path, tmp_path, "--json", "--strict")
    assert res.exit_code == 1  # the row is a blocking format error
    res = run("clean", path, tmp_path, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["dropped"] == {"format_error": 1}
    log = [json.loads(x) for x in (tmp_path / "clean.jsonl.changes.jsonl").read_text().splitlines()]
    assert log[0]["row"] == 2 and "field 'output' is null" in log[0]["error"]


def test_mixed_formats(tmp_path):
    """A chat row inside an instruction file: show fails on it; the audit and clean name the row."""
    rows = [{"instruction": "q one two", "output": "a"}, {"messages": [{"role": "user", "content": "hi"}]}]
    path = write(tmp_path, "mixed.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    msg = error_line(run("show", path, tmp_path, "-n", "2"))
    assert f"{path}:2: missing required field 'instruction'" in msg
    res = run("audit", path, tmp_path, "--json", "--strict")
    assert res.exit_code == 1 and json.loads(res.stdout)["format_errors"]["examples"][0]["row"] == 2
    res = run("clean", path, tmp_path, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["dropped"] == {"format_error": 1}


# Pieces of hostile text: rich markup, emoji codes, backslashes, quotes, any printable character.
PIECES = st.sampled_from(
    ["[", "]", ":", "\\", "[red]", "[/]", ":smile:", "[bold red]", "é", "🙂", "中", "'", '"']
) | st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="/\0")
NAME_TEXT = (
    st.lists(PIECES, min_size=1, max_size=8)
    .map("".join)
    .filter(lambda s: "/" not in s and s not in (".", "..") and len(s.encode()) < 200)
)
ROW_TEXT = st.lists(PIECES | st.just(" "), max_size=12).map("".join)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=NAME_TEXT, text=ROW_TEXT)
def test_hostile_names_and_rows_come_back_verbatim(name, text):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.jsonl"
        path.write_text(GOOD.decode() + "{oops " + text + "\n", encoding="utf-8")
        args = ["data", "show", str(path), "--model", "tiny:llama"]
        msg = error_line(runner.invoke(app, args, env={"COLUMNS": None}))
        assert msg.startswith(f"error: {path}:2: invalid JSON")
        assert msg.endswith(f"(near: '{{oops {text}')")


def test_option_errors_name_the_option(tmp_path):
    path = write(tmp_path, "ok.jsonl", GOOD)
    cases = [
        (("audit", "--format", "bogus"), "--format must be one of text, instruction, chat, preference"),
        (("clean", "--min-length", "-1", "--max-length", "-5"), "--min-length must be 0 or more, got -1"),
        (
            ("clean", "--min-length", "9", "--max-length", "5"),
            "--min-length (9) is larger than --max-length (5)",
        ),
        (("split", "--ratios", "abc"), "--ratios must be 2 or 3 positive numbers summing to 1"),
        (("split", "--ratios", "0.5,nan"), "--ratios must be"),
        (("show", "-n", "-1"), "-n must be 0 or more"),
        (("audit", "--columns", "instruction"), "--columns takes canonical=source pairs"),
    ]
    for (command, *opts), text in cases:
        out = tmp_path / f"out-{command}-{len(opts)}-{opts[-1]}"
        out.mkdir()
        msg = error_line(run(command, path, out, *opts))
        assert text in msg, msg
        nothing_written(out)


def test_no_traceback_from_a_subprocess(tmp_path):
    """The installed entry point, not just the test runner: exit 2 and one line for a file whose
    only row is too deep (nothing left to audit: the row's reason is the error)."""
    import subprocess
    import sys

    path = write(tmp_path, "deep.jsonl", b'{"text": ' + b"[" * DEEP + b"]" * DEEP + b"}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    res = subprocess.run(
        [sys.executable, "-m", "tunelab", "data", "audit", str(path)], capture_output=True, text=True, env=env
    )
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert f"{path}:1: JSON nested more than 100 levels deep" in res.stderr


# ---- `tunelab recipe check` (and `train`, which reads a recipe the same way) on hostile recipe files
VALID = "model: {name_or_path: 'tiny:llama'}\nmethod: {name: lora}\n"
HOSTILE_RECIPES = {
    "empty": (b"", "the file is empty"),
    "binary": (bytes(range(256)) * 4, "not UTF-8 text"),
    "non_utf8": (b"model: {name_or_path: x}\n\xff\xfe: 1\n", "not UTF-8 text (byte 25)"),
    "bad_yaml": (b"model: [\n  a: b\n", "line 3: not valid YAML"),
    "trailing_comma": (b'{"model": {"name_or_path": "x"},}\n', "data: required field is missing"),
    "a_list": (b"- model\n- data\n", "expected a mapping of sections, got list"),
    "null_section": (b"model: null\n" + VALID.split("\n", 1)[1].encode(), "model: is empty (null)"),
    "deep": (b"model: " + b"[" * DEEP + b"]" * DEEP + b"\n", "nested too deeply"),
    "markup_in_values": (
        (VALID + "data: {train: '[red]x:smile:[/].jsonl'}\n").encode(),
        "data.train: [red]x:smile:[/].jsonl: file not found",
    ),
}


def recipe_lines(res, code: int = 2) -> list[str]:
    assert res.exit_code == code, (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    return res.stderr.rstrip("\n").split("\n")


@pytest.mark.parametrize("case", sorted(HOSTILE_RECIPES))
def test_recipe_check_and_train_on_hostile_recipes(tmp_path, case):
    content, expected = HOSTILE_RECIPES[case]
    path = tmp_path / f"[bold]{case}:smile:.yaml"
    path.write_bytes(content)
    checked = recipe_lines(runner.invoke(app, ["recipe", "check", str(path)], env={"COLUMNS": None}))
    # one self-contained line a problem, each naming the file as written
    assert all(line.startswith(f"bad {path}: ") for line in checked)
    assert any(expected in line for line in checked), checked
    trained = recipe_lines(runner.invoke(app, ["train", str(path)], env={"COLUMNS": None}))
    assert len(trained) == 1 and trained[0].startswith(f"error: {path}: ") and expected in trained[0]
    assert not (tmp_path / "runs").exists()


def test_recipe_check_on_a_directory_and_a_missing_file(tmp_path):
    folder = tmp_path / "[red]recipes:smile:"
    folder.mkdir()
    for target, expected in ((folder, "is a directory"), (tmp_path / "gone.yaml", "file not found")):
        lines = recipe_lines(runner.invoke(app, ["recipe", "check", str(target)], env={"COLUMNS": None}))
        assert lines == [f"bad {target}: {expected}" + (lines[0].split(expected, 1)[1])]
