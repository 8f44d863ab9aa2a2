"""The ``tunelab export`` command: parse options, call :func:`export_run`, print what was written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tunelab.console import fail, labelled, make_console, styled
from tunelab.export.gate import GATE_FAILED_EXIT, QLORA_MERGES, export_and_verify, print_verification
from tunelab.export.run import DTYPES, EXPORT_META, GGUF_TYPES


def export_cmd(
    run: Annotated[Path, typer.Argument(help="a finished run directory (runs/<name>) or its final/")],
    out: Annotated[Path, typer.Option("--out", help="new folder for the export")],
    merge: Annotated[
        bool, typer.Option("--merge", help="merged weights as a standard Hugging Face model directory")
    ] = False,
    adapter: Annotated[
        bool, typer.Option("--adapter", help="the adapter alone, in PEFT's format (adapter runs only)")
    ] = False,
    gguf: Annotated[
        str | None,
        typer.Option(
            "--gguf",
            help=f"merged weights as one GGUF file made, quantised and loaded by llama.cpp: {', '.join(GGUF_TYPES)}",
        ),
    ] = None,
    ollama: Annotated[
        bool,
        typer.Option(
            "--ollama", help="with --gguf: also write an Ollama Modelfile (template, stops, sampling)"
        ),
    ] = False,
    dtype: Annotated[
        str, typer.Option(help=f"{', '.join(DTYPES)}; auto keeps the base model's stored dtype")
    ] = "auto",
    max_shard_size: Annotated[
        str, typer.Option(help="largest safetensors file of a merged model, e.g. 2GB or 500MB")
    ] = "2GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing --out folder")] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="skip the parity gate (export vs run on held-out data)")
    ] = False,
    verify_data: Annotated[
        Path | None,
        typer.Option(help="held-out data for the parity gate (default: the run's data.eval or split file)"),
    ] = None,
    verify_n: Annotated[
        int | None,
        typer.Option(min=1, help="examples the parity gate samples (default: recipe export.verify_n, 64)"),
    ] = None,
    qlora_merge: Annotated[
        str,
        typer.Option(
            help=f"QLoRA runs: merge into the {' or '.join(QLORA_MERGES)} base (16-bit original weights, "
            "or the de-quantised NF4 ones it trained against)"
        ),
    ] = "base16",
) -> None:
    """Export a run: merged HF model (--merge), PEFT adapter (--adapter) or GGUF made by llama.cpp (--gguf TYPE).

    Then the parity gate runs the export next to the run on held-out data in the engine that serves
    it; a failed gate keeps the files and exits 3 (--no-verify skips it)."""
    chosen = [name for name, on in (("--merge", merge), ("--adapter", adapter), ("--gguf", gguf)) if on]
    if len(chosen) != 1:
        given = f" (got {' and '.join(chosen)})" if chosen else ""
        _fail(f"choose exactly one of --merge, --adapter, --gguf TYPE{given}")
    kind = {"--merge": "merged", "--adapter": "adapter", "--gguf": "gguf"}[chosen[0]]
    console = make_console()
    try:
        path, verification = export_and_verify(
            run,
            out,
            kind=kind,
            verify=not no_verify,
            verify_data=verify_data,
            verify_n=verify_n,
            qlora_merge=qlora_merge,
            console=make_console(stderr=True),
            gguf_type=gguf,
            dtype=dtype,
            overwrite=overwrite,
            max_shard_size=max_shard_size,
            ollama=ollama,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        _fail(str(e))
    console.print(written_table(path, f"{kind} export of {run}"))
    console.print(f"provenance: {path / EXPORT_META}")
    for note in json.loads((path / EXPORT_META).read_text(encoding="utf-8")).get("notes", []):
        console.print(labelled("note", note))
    _report_verification(verification, path, console)


def _report_verification(verification: dict | None, path: Path, console) -> None:
    """The parity table; a failed gate keeps the files and exits 3 naming the failing checks."""
    if verification is None:
        console.print(labelled("note", "exported without the parity gate (--no-verify)"))
        return
    print_verification(verification, console)
    if verification.get("passed") is False:
        failing = ", ".join(verification["failed_checks"])
        make_console(stderr=True).print(
            labelled(
                "error",
                f"export parity gate failed ({failing}): {'; '.join(verification['failures'])}; "
                f"files kept in {path}, marked failed in {EXPORT_META}",
            )
        )
        raise typer.Exit(GATE_FAILED_EXIT)


def written_table(directory: Path, title: str) -> Table:
    """Every file of the export with its size, largest last so the weights are easy to spot."""
    files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: (p.stat().st_size, p.name))
    table = Table(title=title)
    table.add_column("file")
    table.add_column("size", justify="right")
    for path in files:
        table.add_row(str(path.relative_to(directory)), _human(path.stat().st_size))
    table.add_row(styled("total", "bold"), styled(_human(sum(p.stat().st_size for p in files)), "bold"))
    return table


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _fail(message: str) -> None:
    fail(make_console(stderr=True), message)
