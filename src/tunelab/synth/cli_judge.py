"""`tunelab data judge` and `tunelab data constitute` (registered on the data app in tunelab.cli).

Candidate models and the judge are each one spec: any tunelab model spec (hub id, directory,
``.gguf``, ``asset:``, ``tiny:llama``, a run directory), or an OpenAI-compatible endpoint URL with
the served model after ``#`` (``http://127.0.0.1:8000/v1#my-model``; none: the first it lists).
Every command ends with the closing audit (:mod:`tunelab.synth.finish`), which writes the kept rows
and every dropped one, with its reason, to ``OUT.rejects.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tunelab.console import make_console
from tunelab.synth.cli_common import (
    DEFAULT_TIMEOUT_S,
    ApiKeyOpt,
    BatchOpt,
    CacheDirOpt,
    CacheOpt,
    ConcurrencyOpt,
    DeviceOpt,
    DtypeOpt,
    EndpointOpt,
    EvalOpt,
    GeneratorOptions,
    JsonOpt,
    MaxTokensOpt,
    ModelOpt,
    OutputOpt,
    OverwriteOpt,
    SeedOpt,
    TemperatureOpt,
    TimeoutOpt,
    TopPOpt,
    err,
    errors,
    report_calls,
)

out = make_console()

LimitOpt = Annotated[
    int | None, typer.Option("--limit", min=1, help="Use only the first N prompts of INPUT.")
]
FormatOpt = Annotated[str | None, typer.Option("--format", help="Format of INPUT; default: detect.")]
ColumnsOpt = Annotated[str | None, typer.Option("--columns", help="Column renames, canonical=source.")]


def parse_columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ValueError(f"--columns takes canonical=source pairs, e.g. instruction=question; got '{text}'")
    return {k.strip(): v.strip() for k, v in pairs}


def for_spec(spec: str, base: GeneratorOptions) -> GeneratorOptions:
    """The options that open one spec: an endpoint ``URL[#served-model]`` or a local model spec."""
    if spec.startswith(("http://", "https://")):
        url, _, served = spec.partition("#")
        return replace(base, model=served or None, endpoint=url)
    return replace(base, model=spec, endpoint=None)


class Generators:
    """Opens each model once (a judge that is also a candidate model is loaded one time)."""

    def __init__(self) -> None:
        self.opened: dict[tuple[str | None, str | None], Any] = {}

    def __call__(self, options: GeneratorOptions) -> Any:
        key = (options.model, options.endpoint)
        if key not in self.opened:
            self.opened[key] = options.open()
        return self.opened[key]

    def report(self) -> None:
        for generator in self.opened.values():
            report_calls(generator)


def read_rubric(value: str | None) -> str | None:
    """--rubric: the text itself, or a file holding it."""
    if value and Path(value).is_file():
        return Path(value).read_text(encoding="utf-8").strip()
    return value


def print_agreement(stats: dict[str, Any] | None) -> None:
    if stats is None:
        return
    table = Table(title="judge vs human labels", title_justify="left")
    names = ("labelled", "agree", "disagree", "tie", "unreadable")
    for name in (*names, "agreement"):
        table.add_column(name, justify="right")
    rate = stats["rate"]
    table.add_row(*(str(stats[k]) for k in names), "n/a" if rate is None else f"{rate:.0%}")
    out.print(table)


@dataclass(frozen=True)
class JudgeJob:
    """What `data judge` was asked to do, minus the models."""

    input: str
    output: Path
    mode: str = "pairwise"
    candidates: int = 2
    rubric: str | None = None
    min_margin: float = 1.0
    judge_max_tokens: int = 256
    eval_file: str | None = None
    limit: int | None = None
    fmt: str | None = None
    columns: dict[str, str] | None = None
    overwrite: bool = False


def run_judge(
    job: JudgeJob,
    judge_spec: str,
    models: list[GeneratorOptions],
    base: GeneratorOptions,
    settings: Any,
    *,
    quiet: bool = False,
) -> dict[str, Any]:
    """Read the prompts, sample candidates where rows have none, judge, and end with the closing audit."""
    from tunelab.synth import preferences as prefs  # noqa: PLC0415
    from tunelab.synth.finish import check_paths, finish  # noqa: PLC0415
    from tunelab.synth.judge import Judge  # noqa: PLC0415

    if job.mode not in ("pairwise", "pointwise"):
        raise ValueError(f"--mode must be pairwise or pointwise, got '{job.mode}'")
    check_paths(job.output, [job.input, job.eval_file], overwrite=job.overwrite)
    items = prefs.read_items(job.input, job.fmt, job.columns)[: job.limit]
    if not items:
        raise ValueError(f"{job.input}: no prompts to judge")
    sampling = any(not item.candidates for item in items)
    if sampling and not models:
        raise ValueError(
            f"{job.input}: rows without candidates need --model (or --endpoint) to sample answers"
        )
    opened = Generators()
    # The judge opens first: a judge that cannot load or answer fails before candidates cost anything.
    judge = Judge(
        opened(for_spec(judge_spec, base)),
        rubric=job.rubric,
        max_tokens=job.judge_max_tokens,
        seed=settings.seed,
    )
    if sampling:
        prefs.sample_candidates(items, [opened(m) for m in models], job.candidates, settings)
    if job.mode == "pairwise":
        outcomes = prefs.judge_pairwise(judge, items)
    else:
        outcomes = prefs.judge_pointwise(judge, items, job.min_margin)
    rows = [prefs.pair_row(o, judge, settings) for o in outcomes if o.chosen is not None]
    dropped = [{"reason": o.reason, "row": prefs.dropped_row(o)} for o in outcomes if o.chosen is None]
    summary = finish(
        rows,
        job.output,
        eval_path=job.eval_file,
        kind="judge",
        dropped=dropped,
        inputs=[job.input],
        console=err if quiet else None,
    )
    summary.update(judge=judge.name, mode=job.mode, agreement=prefs.agreement(outcomes))
    opened.report()
    return summary


def judge_cmd(
    input: Annotated[str, typer.Argument(help="Prompts (any format), or preference rows to re-judge.")],
    output: OutputOpt,
    judge: Annotated[
        str,
        typer.Option(
            "--judge", help="The judge: a model spec, or an endpoint URL (with #served-model to pick one)."
        ),
    ],
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            help="Candidate model, repeat for several: a spec, or an endpoint URL with optional #served-model; with "
            "--endpoint, a model it serves.",
        ),
    ] = None,  # fmt: skip
    endpoint: EndpointOpt = None,
    mode: Annotated[
        str, typer.Option("--mode", help="pairwise (A/B, both orders) or pointwise (1-10).")
    ] = "pairwise",
    candidates: Annotated[int, typer.Option("--candidates", min=1, help="Answers sampled per model.")] = 2,
    rubric: Annotated[str | None, typer.Option("--rubric", help="Rubric text, or a file with it.")] = None,
    min_margin: Annotated[
        float, typer.Option("--min-margin", min=0.0, help="Pointwise: least score gap.")
    ] = 1.0,
    judge_max_tokens: Annotated[int, typer.Option("--judge-max-tokens", min=1)] = 256,
    eval_file: EvalOpt = None,
    limit: LimitOpt = None,
    api_key: ApiKeyOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.8,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    concurrency: ConcurrencyOpt = 4,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    cache_dir: CacheDirOpt = None,
    cache: CacheOpt = True,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    fmt: FormatOpt = None,
    columns: ColumnsOpt = None,
) -> None:
    """LLM-as-judge: sample candidates, judge them (pairwise or pointwise), write preference pairs."""
    from tunelab.synth.client import GenSettings  # noqa: PLC0415

    with errors():
        base = GeneratorOptions(
            None, None, api_key, concurrency, batch_size, device, dtype, cache_dir, cache, timeout
        )
        if endpoint:
            models = [replace(base, model=m, endpoint=endpoint) for m in (model or [None])]
        else:
            models = [for_spec(m, base) for m in model or []]
        job = JudgeJob(
            input, output, mode, candidates, read_rubric(rubric), min_margin, judge_max_tokens, eval_file, limit,
            fmt, parse_columns(columns), overwrite,
        )  # fmt: skip
        settings = GenSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        summary = run_judge(job, judge, models, base, settings, quiet=as_json)
    if as_json:
        out.print(json.dumps(summary, ensure_ascii=False))
    else:
        print_agreement(summary["agreement"])


def default_pairs_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.pairs{output.suffix or '.jsonl'}")


def run_constitute(
    input: str, output: Path, pairs: Path, options: GeneratorOptions, settings: Any, *, constitution: Path | None = None, rounds: int = 1,
    eval_file: str | None = None, limit: int | None = None, fmt: str | None = None, columns: dict[str, str] | None = None,
    overwrite: bool = False, quiet: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Answer, critique and revise every prompt; write SFT rows and pairs, each through the closing audit."""
    from tunelab.synth import constitute as cai  # noqa: PLC0415
    from tunelab.synth.finish import check_paths, finish  # noqa: PLC0415
    from tunelab.synth.preferences import read_items  # noqa: PLC0415

    inputs = [input, constitution, eval_file]
    check_paths(output, inputs, overwrite=overwrite)
    check_paths(pairs, [*inputs, output], overwrite=overwrite)
    principles = cai.load_constitution(constitution)
    items = read_items(input, fmt, columns)[:limit]
    if not items:
        raise ValueError(f"{input}: no prompts")
    generator = options.open()
    traces = cai.constitute(generator, items, principles, rounds=rounds, settings=settings)
    source = str(constitution) if constitution else "default"
    sft, sft_dropped, kept, kept_dropped = cai.outputs(traces, generator.name, settings, source)
    common = {"eval_path": eval_file, "inputs": [input, constitution], "console": err if quiet else None}
    summaries = {
        "sft": finish(sft, output, kind="constitute", dropped=_reasons(sft_dropped), **common),
        "pairs": finish(kept, pairs, kind="constitute", dropped=_reasons(kept_dropped), **common),
    }
    report_calls(generator)
    return {
        "command": "constitute",
        "model": generator.name,
        "prompts": len(traces),
        "rounds": rounds,
        **summaries,
    }


def constitute_cmd(
    input: Annotated[str, typer.Argument(help="Prompts (any format; existing answers are ignored).")],
    output: OutputOpt,
    model: ModelOpt = None,
    endpoint: EndpointOpt = None,
    pairs: Annotated[
        Path | None,
        typer.Option("--pairs", help="Preference pairs (revision over original); default OUT.pairs.jsonl."),
    ] = None,
    constitution: Annotated[
        Path | None,
        typer.Option("--constitution", help="YAML list of {name, critique, revision}; default: tunelab's."),
    ] = None,
    rounds: Annotated[
        int, typer.Option("--rounds", min=1, help="Critique-and-revise rounds per prompt.")
    ] = 1,
    eval_file: EvalOpt = None,
    limit: LimitOpt = None,
    api_key: ApiKeyOpt = None,
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 1.0,
    seed: SeedOpt = 0,
    concurrency: ConcurrencyOpt = 4,
    timeout: TimeoutOpt = DEFAULT_TIMEOUT_S,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    cache_dir: CacheDirOpt = None,
    cache: CacheOpt = True,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
    fmt: FormatOpt = None,
    columns: ColumnsOpt = None,
) -> None:
    """Constitutional AI's supervised stage: answer, critique against a principle, revise (--rounds)."""
    from tunelab.synth.client import GenSettings  # noqa: PLC0415

    with errors():
        options = GeneratorOptions(
            model, endpoint, api_key, concurrency, batch_size, device, dtype, cache_dir, cache, timeout
        )
        settings = GenSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        summary = run_constitute(
            input, output, pairs or default_pairs_path(output), options, settings, constitution=constitution,
            rounds=rounds, eval_file=eval_file, limit=limit, fmt=fmt, columns=parse_columns(columns),
            overwrite=overwrite, quiet=as_json,
        )  # fmt: skip
    if as_json:
        out.print(json.dumps(summary, ensure_ascii=False))


def _reasons(dropped: list[tuple[dict, str]]) -> list[dict]:
    return [{"reason": reason, "row": row} for row, reason in dropped]
