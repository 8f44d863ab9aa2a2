"""`tunelab data ...`: audit, clean, split and convert data files (each a thin shell over one function)."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from tunelab.console import fail, is_terminal, labelled, make_console, styled
from tunelab.data.formats import FORMATS, FormatError
from tunelab.data.loaders import DataError

app = typer.Typer(
    help="Audit, clean, split and convert fine-tuning data: duplicates, leakage, lengths, PII, formats.",
    no_args_is_help=True,
)
out = make_console()
err = make_console(stderr=True)

ColumnsOpt = Annotated[
    str | None,
    typer.Option(
        "--columns", help="Column renames, canonical=source, e.g. instruction=question,output=answer."
    ),
]
FormatOpt = Annotated[
    str | None, typer.Option("--format", help=f"Data format ({', '.join(FORMATS)}); default: detect.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON report to stdout.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace output files that already exist (never the input).")
]


def _columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ValueError(f"--columns takes canonical=source pairs, e.g. instruction=question; got '{text}'")
    return {k.strip(): v.strip() for k, v in pairs}


def _format(fmt: str | None) -> str | None:
    """--format: one of FORMATS (or auto/none = detect from the columns)."""
    if fmt is None or fmt == "auto":
        return None
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)} (or auto), got '{fmt}'")
    return fmt


def _at_least(name: str, value: int | None, low: int) -> int | None:
    if value is not None and value < low:
        raise ValueError(f"{name} must be {low} or more, got {value}")
    return value


def _tokenizer(model: str | None) -> Any:
    if model is None:
        return None
    from tunelab.models.load import tokenizer_for  # heavy import, only when asked for

    return tokenizer_for(model)


def _one_line(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n")


@contextmanager
def _errors():
    """Input problems end the command with one line on stderr and exit code 2, never a traceback."""
    try:
        yield
    except (DataError, FormatError, ValueError) as e:
        fail(err, _one_line(str(e)))
    except OSError as e:  # a directory where a file belongs, permissions, a full disk
        where = f"{e.filename}: " if e.filename else ""
        fail(err, _one_line(f"{where}{e.strerror or e}"))


@contextmanager
def _progress(enabled: bool):
    if not enabled or not is_terminal():
        yield None
        return
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=err, transient=True
    ) as bar:
        task = bar.add_task("reading", total=None)

        def update(stage: str, rows: int) -> None:
            bar.update(task, description=f"{stage}: {rows:,} rows")

        yield update


def _ex(rows: list) -> str:
    return ", ".join(str(r) for r in rows[:5])


class _Checks:
    """The audit's main table: one row per check, its count coloured by how bad a hit is."""

    def __init__(self) -> None:
        self.table = Table(title="Audit", show_lines=False)
        self.table.add_column("check")
        self.table.add_column("found", justify="right")
        self.table.add_column("example rows / detail")

    def add(self, name: str, n: Any, detail: str = "", bad: bool = False) -> None:
        style = "red" if bad and n else ("yellow" if n else "green")
        self.table.add_row(name, styled(str(n), style), detail)


def render_audit(report: dict, console: Console = out) -> None:
    """Print an audit report as rich tables (user text, such as the file name, printed as written)."""
    head = Text(report["file"], style="bold")
    head.append(f": {report['rows']:,} rows, format ")
    head.append(report["format"], style="cyan")
    if report["rows_rejected"]:
        head.append(f", {report['rows_rejected']} rows rejected (unreadable or not fitting the format)")
    console.print(head)
    if report["unused_columns"]:
        cols = ", ".join(f"{c} ({n} rows)" for c, n in report["unused_columns"].items())
        console.print(labelled("note", f"columns not used by format {report['format']!r}: {cols}"))
    checks = _Checks()
    for section in (_shape_checks, _duplicate_checks, _target_checks, _content_checks):
        section(checks, report)
    console.print(checks.table)
    rejected = _rejected_table(report)
    if rejected is not None:
        console.print(rejected)
    console.print(_lengths_table(report["lengths"]))
    if report["labels"]:
        console.print(_labels_table(report["labels"]))
    for p in report["blocking"]:
        console.print(labelled("blocking", p))


def _shape_checks(checks: _Checks, report: dict) -> None:
    """Rows that cannot be read or do not fit the format, missing or blank columns, odd keys or types."""
    unreadable = report.get("unreadable", {"rows": 0, "examples": []})
    checks.add("unreadable rows", unreadable["rows"], _ex([e["row"] for e in unreadable["examples"]]), True)
    errors = report["format_errors"]
    checks.add("format errors", errors["rows"], _ex([e["row"] for e in errors["examples"]]), True)
    for col, c in report["completeness"].items():
        n = c["missing"] + c["empty"] + c["whitespace"]
        detail = f"{c['missing']}/{c['empty']}/{c['whitespace']}; rows {_ex(c['examples'])}" if n else ""
        checks.add(f"'{col}' missing/empty/blank", n, detail)
    sch = report["schema"]
    checks.add("rows with odd keys/types", sch["inconsistent_rows"], _ex([e["row"] for e in sch["examples"]]))


def _duplicate_checks(checks: _Checks, report: dict) -> None:
    """Exact and near duplicates within the file, and leaks into each eval file."""
    ex = report["exact_duplicates"]
    checks.add(
        "exact duplicate rows", ex["rows"], "; ".join("=".join(map(str, g)) for g in ex["examples"][:3])
    )
    nd = report["near_duplicates"]
    checks.add(
        f"near-duplicate rows (J≥{nd['threshold']})",
        nd["rows"],
        "; ".join(f"{a}~{b} ({e['similarity']})" for e in nd["examples"][:3] for a, b in [e["rows"]]),
    )
    for lk in report["leakage"]:
        name = Path(lk["eval_file"]).name
        for kind in ("exact", "near"):
            rows = [e["eval_row"] for e in lk["examples"] if e["kind"] == kind]
            checks.add(f"leaked into {name} ({kind})", lk[kind], _ex(rows), True)
        checks.add(f"same prompt in {name}", lk["prompt_exact"])


def _target_checks(checks: _Checks, report: dict) -> None:
    """Empty targets, rows over the length limit, cut responses, identical preference pairs."""
    empty = report["empty_targets"]
    checks.add("empty targets", empty["rows"], _ex(empty["examples"]), True)
    ln = report["lengths"]
    if ln["over_max_length"] is not None:
        limit = f"{report['settings']['max_length']} {ln['unit']}"
        checks.add(f"over max length ({limit})", ln["over_max_length"], _ex(ln["over_examples"]))
    if ln["response_cut_entirely"] is not None:
        checks.add("response cut entirely", ln["response_cut_entirely"], _ex(ln["cut_examples"]), True)
    if report["preference"] is not None:
        pr = report["preference"]
        checks.add("chosen == rejected", pr["chosen_equals_rejected"], _ex(pr["examples"]), True)


def _content_checks(checks: _Checks, report: dict) -> None:
    """Text hygiene and PII."""
    hy = report["hygiene"]
    for key, label in (
        ("control_chars", "control characters"),
        ("mojibake", "mojibake"),
        ("replacement_char", "U+FFFD replacement chars"),
        ("too_short", "too short"),
        ("too_long", "too long (outliers)"),
    ):
        checks.add(label, hy[key]["rows"], _ex(hy[key]["examples"]))
    for kind, p in report["pii"].items():
        found = "; ".join(f"row {e['row']}: {e['masked']}" for e in p["examples"][:3])
        checks.add(f"PII: {kind}", p["rows"], found)


SHOWN_REJECTS = 20  # rejected rows the table lists; --json lists up to audit.LISTED


def _rejected_table(report: dict) -> Table | None:
    """Every rejected row the report lists (up to SHOWN_REJECTS), with its reason, in row order."""
    listed = sorted(
        [*report.get("unreadable", {"examples": []})["examples"], *report["format_errors"]["examples"]],
        key=lambda e: e["row"],
    )
    if not listed:
        return None
    total = report["rows_rejected"]
    more = f"; {total - SHOWN_REJECTS} more in --json" if total > SHOWN_REJECTS else ""
    table = Table(title=f"Rejected rows ({total}{more})")
    table.add_column("row", justify="right")
    table.add_column("reason")
    for entry in listed[:SHOWN_REJECTS]:
        table.add_row(str(entry["row"]), _one_line(entry["error"]))
    return table


_LENGTH_STATS = ("count", "min", "mean", "p50", "p90", "p99", "max")


def _lengths_table(ln: dict) -> Table:
    table = Table(title=f"Lengths ({ln['unit']})")
    for col in _LENGTH_STATS:
        table.add_column(col, justify="right")
    table.add_row(*(str(ln[c]) for c in _LENGTH_STATS))
    return table


def _labels_table(labels: dict) -> Table:
    table = Table(title=f"Labels (imbalance ratio {labels['imbalance_ratio']})")
    table.add_column("label")
    table.add_column("rows", justify="right")
    for lab, n in labels["counts"].items():
        table.add_row(str(lab), str(n))
    return table


@app.command()
def audit(
    file: Annotated[
        str,
        typer.Argument(help="Training data: .jsonl/.json/.csv/.tsv/.parquet, a saved dataset dir or hub id."),
    ],
    eval: Annotated[
        list[str] | None, typer.Option("--eval", help="Eval/test file to check for leakage (repeatable).")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Count tokens with this model's tokenizer.")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Report examples longer than this.")
    ] = None,
    near_threshold: Annotated[float, typer.Option("--near-threshold", min=0.0, max=1.0)] = 0.8,
    fmt: FormatOpt = None,
    columns: ColumnsOpt = None,
    skip_bad: Annotated[
        bool,
        typer.Option(
            "--skip-bad", hidden=True, help="Accepted for old scripts: the audit always lists bad rows."
        ),
    ] = False,
    as_json: JsonOpt = False,
    strict: Annotated[
        bool,
        typer.Option("--strict", help="Exit 1 on blocking problems (rejected rows, leakage, empty targets)."),
    ] = False,
) -> None:
    """Report duplicates, leakage, lengths, label balance, hygiene and PII of a data file."""
    from tunelab.data.audit import audit as run_audit

    with _errors():
        _at_least("--max-length", max_length, 1)
        fmt, cols = _format(fmt), _columns(columns)
        tok = _tokenizer(model)
        with _progress(not as_json) as progress:
            report = run_audit(
                file,
                eval_paths=eval or [],
                fmt=fmt,
                columns=cols,
                tokenizer=tok,
                max_length=max_length,
                near_threshold=near_threshold,
                progress=progress,
            )
    if model:
        report["settings"]["tokenizer"] = model
    if as_json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        render_audit(report)
    if strict and report["blocking"]:
        raise typer.Exit(1)


@app.command()
def clean(
    file: Annotated[str, typer.Argument(help="Data file to clean.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Cleaned JSONL file to write.")],
    changes: Annotated[
        Path | None,
        typer.Option("--changes", help="Log of dropped/changed rows (default OUT.changes.jsonl)."),
    ] = None,
    exact: Annotated[
        bool, typer.Option("--exact/--no-exact", help="Drop exact duplicates (keep first).")
    ] = True,
    near: Annotated[bool, typer.Option("--near/--no-near", help="Drop near duplicates (keep first).")] = True,
    near_threshold: Annotated[float, typer.Option("--near-threshold", min=0.0, max=1.0)] = 0.8,
    min_length: Annotated[
        int | None, typer.Option("--min-length", help="Drop rows shorter than this.")
    ] = None,
    max_length: Annotated[
        int | None, typer.Option("--max-length", help="Drop rows longer than this.")
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Measure lengths in this model's tokens.")
    ] = None,
    redact: Annotated[
        bool, typer.Option("--redact/--no-redact", help="Replace PII with <EMAIL>, <PHONE>, ...")
    ] = True,
    drop_empty: Annotated[
        bool, typer.Option("--drop-empty/--keep-empty", help="Drop rows with empty targets.")
    ] = True,
    rebalance: Annotated[
        str | None, typer.Option("--rebalance", help="Class rebalancing: under or over.")
    ] = None,
    seed: int = 0,
    fmt: FormatOpt = None,
    columns: ColumnsOpt = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip unreadable rows; each goes to OUT.rejects.jsonl.")
    ] = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Deduplicate, filter, redact and rebalance a data file; every change is logged with its reason."""
    from tunelab.data.clean import check_lengths
    from tunelab.data.clean import clean as run_clean

    with _errors():
        check_lengths(min_length, max_length)  # before loading a tokenizer
        summary = run_clean(
            file,
            output,
            changes_path=changes,
            fmt=_format(fmt),
            columns=_columns(columns),
            exact=exact,
            near=near,
            near_threshold=near_threshold,
            min_length=min_length,
            max_length=max_length,
            tokenizer=_tokenizer(model),
            redact_pii=redact,
            drop_empty_targets=drop_empty,
            rebalance=rebalance,
            seed=seed,
            skip_bad=skip_bad,
            overwrite=overwrite,
        )
    _print_clean(summary, as_json)


def _print_clean(summary: dict, as_json: bool) -> None:
    """The clean summary: a note on stderr for skipped rows, then JSON or a table on stdout."""
    if summary["rejects"]:
        n = summary["dropped"].get("unreadable", 0)
        err.print(
            labelled("note", f"{n} unreadable rows skipped; each is in {summary['rejects']} with its reason")
        )
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    t = Table(title=f"clean: {summary['input_rows']:,} rows in, {summary['output_rows']:,} rows out")
    t.add_column("")
    t.add_column("rows", justify="right")
    t.add_row("kept", str(summary["kept"]))
    for group in ("dropped", "changed", "added"):
        for reason, n in summary[group].items():
            t.add_row(f"{group}: {reason}", str(n))
    out.print(t)
    out.print(Text(f"wrote {summary['output']}; reasons per row in {summary['changes']}"))


@app.command()
def split(
    file: Annotated[str, typer.Argument(help="Data file to split.")],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Directory for train/validation/test.jsonl.")
    ],
    ratios: Annotated[
        str, typer.Option("--ratios", help="Two or three ratios summing to 1.")
    ] = "0.8,0.1,0.1",
    by: Annotated[str, typer.Option("--by", help="random | stratified | group | time")] = "random",
    key: Annotated[
        str | None, typer.Option("--key", help="Column for group/time (or stratified) splits.")
    ] = None,
    seed: int = 0,
    near_threshold: Annotated[float, typer.Option("--near-threshold", min=0.0, max=1.0)] = 0.8,
    fmt: FormatOpt = None,
    columns: ColumnsOpt = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Split a data file; duplicates and near-duplicate clusters never straddle splits."""
    from tunelab.data.split import split as run_split

    with _errors():
        fmt, cols = _format(fmt), _columns(columns)
        summary = run_split(
            file,
            output,
            ratios=ratios,
            by=by,
            key=key,
            seed=seed,
            fmt=fmt,
            columns=cols,
            near_threshold=near_threshold,
            overwrite=overwrite,
        )
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    t = Table(title=f"split by {by} (seed {seed}): {summary['rows']:,} rows, {summary['units']:,} units")
    t.add_column("split")
    t.add_column("rows", justify="right")
    t.add_column("share", justify="right")
    t.add_column("file")
    for name, n in summary["counts"].items():
        t.add_row(name, str(n), f"{n / max(summary['rows'], 1):.1%}", summary["files"][name])
    out.print(t)


@app.command()
def show(
    file: Annotated[Path, typer.Argument(help="Data file.")],
    model: Annotated[str, typer.Option("--model", help="Model or tokenizer whose template is used.")],
    n: Annotated[int, typer.Option("-n", help="How many examples.")] = 3,
    template: Annotated[
        str | None,
        typer.Option(help="Built-in template (chatml, qwen3, llama-3, gemma, mistral, phi, alpaca, plain)."),
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            help="Encode as this objective does (sft, dpo, simpo, orpo, kto, reward, classify, ...)."
        ),
    ] = "sft",
    max_length: Annotated[int | None, typer.Option(help="Truncate as training would.")] = None,
    last_turn_only: Annotated[bool, typer.Option(help="Loss on the last assistant turn only.")] = False,
    full_text_loss: Annotated[bool, typer.Option(help="Loss on every token (completion_only off).")] = False,
    reasoning_loss: Annotated[bool, typer.Option(help="Loss on reasoning (data.train_on_reasoning).")] = True,
    fmt: FormatOpt = None,
    columns: ColumnsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Render examples exactly as they will be tokenized; loss tokens highlighted, masked tokens dimmed."""
    from tunelab.data.show import DataShowConfig, first_examples, preview_examples, render_preview

    with _errors():
        _at_least("-n", n, 0)
        _at_least("--max-length", max_length, 1)
        fmt, cols = _format(fmt), _columns(columns)
        config = _objective_config(objective, last_turn_only, full_text_loss)
        rows = first_examples(str(file), n, fmt or "auto", cols)  # check the input before loading a model
        previews, notes = preview_examples(
            str(file),
            _tokenizer(model),
            n=n,
            rows=rows,
            template=template,
            objective=config,
            data=DataShowConfig(
                max_length=max_length,
                format=fmt or "auto",
                columns=cols or {},
                train_on_reasoning=reasoning_loss,
            ),
        )
    if as_json:
        out.print_json(json.dumps({"warnings": notes, "examples": [p.as_json() for p in previews]}))
        return
    for note in notes:
        err.print(labelled("warning", note))
    for preview in previews:
        if preview.dropped:
            out.print(render_preview(preview))
            continue
        loss_tokens = sum(preview.loss_mask)
        # A heading line, not a rule: a rule pads to the console width, unlimited off a terminal.
        part = f" {preview.part}" if preview.part else ""
        out.print(
            styled(
                f"── row {preview.row}{part}: {len(preview.input_ids)} tokens, {loss_tokens} with loss"
                + (" (truncated)" if preview.truncated else ""),
                "bold",
            )
        )
        out.print(render_preview(preview))
        for warning in preview.warnings:
            err.print(labelled("warning", f"row {preview.row}: {warning}"))


@app.command()
def convert(
    file: Annotated[str, typer.Argument(help="Data file in any supported format.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="JSONL file to write.")],
    to: Annotated[
        str, typer.Option("--to", help="Target: canonical, sharegpt, openai or alpaca.")
    ] = "canonical",
    fmt: FormatOpt = None,
    columns: ColumnsOpt = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip unreadable rows; each goes to OUT.rejects.jsonl.")
    ] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write a data file as canonical JSONL or in another tool's format; unconvertible rows go to
    OUT.rejects.jsonl with their reasons."""
    from tunelab.data.convert import convert as run_convert

    with _errors():
        s = run_convert(
            file,
            output,
            to=to,
            fmt=_format(fmt),
            columns=_columns(columns),
            skip_bad=skip_bad,
            overwrite=overwrite,
        )
    line = f"wrote {s['rows_written']:,} of {s['rows_read']:,} rows to {s['output']} ({s['format']} -> {s['to']})"
    if s["rows_rejected"]:
        line += f"; {s['rows_rejected']:,} rejected, each in {s['rejects']} with its reason"
    out.print(Text(line))


@app.command()
def gym(
    task: Annotated[str, typer.Argument(help="A reasoning-gym task, e.g. basic_arithmetic, chain_sum.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="JSONL file to write.")],
    n: Annotated[int, typer.Option("--n", help="Number of problems.")] = 100,
    seed: Annotated[int, typer.Option("--seed", help="Generator seed (same seed, same problems).")] = 0,
    system: Annotated[
        str,
        typer.Option("--system", help="reasoning-gym system prompt: default, simple, direct, ... or none."),
    ] = "default",
    overwrite: OverwriteOpt = False,
) -> None:
    """Write N procedurally generated reasoning-gym problems with their answers (offline), as prompt
    rows that builtin:gym_score (and builtin:math_answer for numeric tasks) can score."""
    from tunelab.data.gym import write_gym

    with _errors():
        s = write_gym(
            task, n, output, seed=seed, system=None if system == "none" else system, overwrite=overwrite
        )
    out.print(Text(f"wrote {s['rows_written']:,} {s['task']} problems (seed {s['seed']}) to {s['output']}"))


def _objective_config(name: str, last_turn_only: bool, full_text_loss: bool) -> Any:
    """The objective config ``data show`` encodes with (defaults, plus the SFT loss options)."""
    from tunelab.objectives import OBJECTIVES
    from tunelab.registry import did_you_mean

    if name not in OBJECTIVES:
        raise ValueError(
            f"--objective: unknown objective {name!r}; use one of {', '.join(OBJECTIVES.names())}."
            + did_you_mean(name, OBJECTIVES.names())
        )
    if name != "sft":
        return OBJECTIVES.get(name).config_cls()
    return OBJECTIVES.get(name).config_cls(
        train_on="last_assistant" if last_turn_only else "all_assistant", completion_only=not full_text_loss
    )


@app.command("from-feedback")
def from_feedback(
    log_dir: Annotated[Path, typer.Argument(help="The directory `tunelab serve --log-dir` wrote.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="JSONL file to write.")],
    as_: Annotated[
        str,
        typer.Option("--as", help="preference (DPO pairs: prompt/chosen/rejected) or unpaired (KTO: label)."),
    ] = "preference",
    min_gap: Annotated[
        float, typer.Option("--min-gap", help="Pair two answers when their mean scores differ by this much.")
    ] = 1.0,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            help="unpaired: desirable when the mean score is at least this (default: midpoint).",
        ),
    ] = None,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Turn served answers and their feedback scores into DPO pairs or KTO rows; dropped log lines go
    to OUT.rejects.jsonl with file, line and reason."""
    from tunelab.data.feedback import from_feedback as run

    with _errors():
        s = run(log_dir, output, as_=as_, min_gap=min_gap, threshold=threshold, overwrite=overwrite)
    if as_json:
        print(json.dumps(s, indent=2, ensure_ascii=False))
    else:
        _print_feedback(s)
    for note in s["notes"]:
        err.print(labelled("note", note))
    if not s["rows"]:
        why = (
            f"no two different answers to one prompt with mean scores {s.get('min_gap'):g} or more apart"
            if s["as"] == "preference" and s["scored_answers"]
            else "no feedback joined to a logged request"
        )
        fail(err, f"{s['log_dir']}: no rows made ({why} in the logs); nothing written to {output}")


def _print_feedback(s: dict) -> None:
    """The counts of `data from-feedback`: what was read, what was made, what was dropped and why."""
    made = "pairs" if s["as"] == "preference" else "rows"
    t = Table(title=f"from-feedback ({s['as']}): {s['rows']:,} {made} made")
    t.add_column("")
    t.add_column("count", justify="right")
    t.add_row("requests logged", f"{s['requests']:,}")
    t.add_row("feedback records", f"{s['feedback']:,}")
    t.add_row("scored answers", f"{s['scored_answers']:,}")
    t.add_row("requests without feedback (unused)", f"{s['unscored_requests']:,}")
    t.add_row("distinct prompts scored", f"{s['prompts']:,}")
    for reason, n in s["skipped"].items():
        t.add_row(f"not paired: {reason}", f"{n:,}")
    for reason, n in s["rejected"].items():
        t.add_row(styled(f"rejected: {reason}", "red"), f"{n:,}")
    if s["as"] == "unpaired":
        t.add_row(
            f"desirable (score >= {s['threshold']:g})" if s["threshold"] is not None else "desirable",
            f"{s['desirable']:,}",
        )
        t.add_row("undesirable", f"{s['undesirable']:,}")
    t.add_row(f"{made} made", f"{s['rows']:,}")
    out.print(t)
    where = f"wrote {s['output']}" if s["output"] else "wrote no rows"
    out.print(Text(f"{where}; dropped log lines with their reasons in {s['rejects']}"))
