"""Output rules (tunelab.console): user text printed as written, one unwrapped line off a terminal.

The CLI cases run with COLUMNS unset and TERM=dumb, as CI does, and with paths long enough that any
hard wrap at rich's default 80 columns would split them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.table import Table
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.console import UNLIMITED, PlainProgress, labelled, make_console, progress

HOSTILE = "[red]x:smile:[/] [bold red]BAD[/] :1234: \\[b]"


@pytest.fixture(autouse=True)
def _ci_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("TERM", "dumb")


def _console(**kwargs):
    buffer = io.StringIO()
    return make_console(file=buffer, **kwargs), buffer


def test_user_text_is_printed_verbatim_with_markup_and_emoji_codes() -> None:
    console, buffer = _console()
    console.print(labelled("error", f"{HOSTILE}.jsonl:1234: invalid JSON"))
    assert buffer.getvalue() == f"error: {HOSTILE}.jsonl:1234: invalid JSON\n"


def test_table_cells_are_verbatim_and_rows_are_not_folded_off_a_terminal() -> None:
    console, buffer = _console()
    long_path = "/tmp/" + "d" * 300 + "/x.jsonl"
    table = Table()
    table.add_column("path")
    table.add_row(f"{HOSTILE} {long_path}")
    console.print(table)
    assert f"{HOSTILE} {long_path}" in buffer.getvalue()
    assert console.size.width == UNLIMITED


def test_columns_still_sets_the_width_for_people_who_ask() -> None:
    import os

    os.environ["COLUMNS"] = "50"
    try:
        console, _ = _console()
        assert console.size.width == 50
    finally:
        del os.environ["COLUMNS"]


def test_a_rule_off_a_terminal_is_one_short_line() -> None:
    console, buffer = _console()
    console.rule("1/2 LoRA fine-tuning")
    assert buffer.getvalue() == "── 1/2 LoRA fine-tuning ──\n"


def test_plain_progress_lines_carry_count_share_and_eta() -> None:
    now = [0.0]
    console, buffer = _console()
    bar = PlainProgress(console, "eval base", 100, every_s=10, clock=lambda: now[0])
    now[0] = 5.0
    bar.advance(10)  # under 10 s since the start: no line
    now[0] = 20.0
    bar.advance(30)  # 40 done in 20 s: 60 to go at 2/s
    now[0] = 25.0
    bar.advance(10)  # 5 s since the last line: none
    bar.finish()  # 50 done, not shown yet: the final line
    now[0] = 40.0
    bar.advance(50)  # all done, and shown
    bar.finish()  # already shown: not repeated
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "eval base: 40/100 (40%), 20 s, ETA 30 s",
        "eval base: 50/100 (50%), 25 s, ETA 25 s",
        "eval base: 100/100 (100%), 40 s",
    ]


def test_progress_prints_a_final_line_off_a_terminal() -> None:
    console, buffer = _console()
    with progress(console, "eval tuned", 3) as advance:
        for _ in range(3):
            advance(1)
    assert buffer.getvalue().splitlines()[-1].startswith("eval tuned: 3/3 (100%)")


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_a_long_missing_runs_root_is_one_unwrapped_error_line(tmp_path: Path) -> None:
    """The flaky CI failure: "is not a directory" was split across lines by the temp path's length."""
    missing = tmp_path / ("n" * 150) / "nope"
    result = CliRunner().invoke(app, ["runs", "ls", str(missing)])
    assert result.exit_code == 2
    line = _error_line(result)
    assert str(missing) in line and "not a directory" in line


# Hostile names through the error paths outside `tunelab data` (tests/test_hostile_input.py covers those).
# Each command is given a path that does not exist or is not what it wants; the path must come back whole.
def _commands(bad: Path) -> list[list[str]]:
    return [
        ["runs", "ls", str(bad)],
        ["runs", "show", str(bad), "--root", str(bad.parent)],
        ["export", str(bad), "--merge", "--out", str(bad.parent / "out")],
        ["adapters", "list", str(bad)],
        ["eval", "tiny:llama", "--data", str(bad)],
    ]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.lists(
        st.sampled_from(
            ["[red]", ":smile:", "[/]", "[bold red]", "\\", ":1234:", "😄", " ", "a", "ü", "]", "["]
        ),
        min_size=1,
        max_size=8,
    ).map("".join)
)
def test_hostile_names_come_back_verbatim_from_every_error_path(tmp_path: Path, name: str) -> None:
    bad = tmp_path / f"{name}.jsonl"
    for command in _commands(bad):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        line = _error_line(result)
        assert line.startswith("error: ") and str(bad) in line, (command, line)


def test_recipe_show_prints_user_values_verbatim(tmp_path: Path, qa_rows: list[dict]) -> None:
    """`recipe show` wrote the emoji for `:smile:` into the YAML it printed."""
    import yaml

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in qa_rows), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    name = "run-:smile:-[red]x[/]"
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data)},
        "method": {"name": "lora"},
        "output": {"name": name},
    }
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    result = CliRunner().invoke(app, ["recipe", "show", str(recipe)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.stdout)["output"]["name"] == name


def test_no_module_builds_a_rich_console_directly() -> None:
    """Every console comes from make_console(), so the rules above hold everywhere."""
    src = Path(__file__).parents[1] / "src" / "tunelab"
    offenders = [
        str(p.relative_to(src))
        for p in src.rglob("*.py")
        if p.name != "console.py" and ("Console(" in p.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_library_progress_bars_are_off_in_logs() -> None:
    """transformers' tqdm bars (GGUF conversion, loading weights) filled CI logs with \\r redraws.
    In a fresh process, as tqdm reads its TQDM_* defaults once, at import."""
    import os
    import subprocess
    import sys

    script = (
        "import io; from typer.testing import CliRunner; from tunelab.cli import app\n"
        "CliRunner().invoke(app, ['runs', 'ls', '/nonexistent-root'])\n"
        "import tqdm; buffer = io.StringIO()\n"
        "for _ in tqdm.tqdm(range(3), file=buffer): pass\n"
        "print(repr(buffer.getvalue()))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.stdout.strip() == "''", done.stdout + done.stderr


def test_status_and_progress_labels_are_not_markup_on_a_terminal() -> None:
    """rich's spinner and default progress columns parse markup even on a markup-free console."""
    buffer = io.StringIO()
    console = make_console(file=buffer, force_terminal=True, width=200)
    with console.status("exporting runs/[/]x"):
        pass
    with progress(console, "eval [/]:smile:", 2) as advance:
        advance(2)
    console.print("after")  # reached: neither raised MarkupError
    assert "after" in buffer.getvalue()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data", "clean", "x.jsonl", "-o", "y.jsonl", "--min-length", "abc"], "'--min-length'"),
        (["data", "audit"], "Missing argument 'file'"),
        (["train", "--nproc", "0"], "'--nproc'"),
        (["no-such-stage"], "No such command 'no-such-stage'"),
    ],
)
def test_usage_errors_are_one_line_from_the_real_entry_point(args: list[str], expected: str) -> None:
    """typer printed a multi-line usage box for a bad option value; `tunelab` prints one error line."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], done.stderr
    assert "--help" in lines[0]
