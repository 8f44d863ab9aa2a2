"""`tunelab data synth` (Self-Instruct) and `tunelab data augment` (paraphrase, back-translation, EDA)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tunelab.console import labelled, make_console
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


def _blocklist(text: str | None) -> tuple[str, ...] | None:
    """--blocklist: comma-separated words, '' or 'none' for no blocklist; None keeps the default."""
    if text is None:
        return None
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(w.strip() for w in text.split(",") if w.strip())


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        out.print(json.dumps(summary, ensure_ascii=False))


def synth_cmd(
    seeds: Annotated[
        str, typer.Argument(help="Seed tasks: instruction[, input, output][, is_classification].")
    ],
    output: OutputOpt,
    n: Annotated[int, typer.Option("--n", min=1, help="Stop at this many kept rows.")] = 100,
    model: ModelOpt = None,
    endpoint: EndpointOpt = None,
    api_key: ApiKeyOpt = None,
    eval_file: EvalOpt = None,
    examples: Annotated[int, typer.Option("--examples", min=1, help="Example tasks shown per prompt.")] = 3,
    prompts_per_round: Annotated[int, typer.Option("--prompts-per-round", min=1)] = 8,
    max_rounds: Annotated[
        int, typer.Option("--max-rounds", min=1, help="Give up after this many rounds.")
    ] = 20,
    rouge_threshold: Annotated[
        float,
        typer.Option("--rouge-threshold", min=0.0, max=1.0, help="Drop instructions this ROUGE-L close."),
    ] = 0.7,
    near_threshold: Annotated[float, typer.Option("--near-threshold", min=0.0, max=1.0)] = 0.8,
    min_words: Annotated[int, typer.Option("--min-words", min=1)] = 3,
    max_words: Annotated[int, typer.Option("--max-words", min=1)] = 150,
    max_output_words: Annotated[int, typer.Option("--max-output-words", min=1)] = 300,
    blocklist: Annotated[
        str | None,
        typer.Option("--blocklist", help="Comma-separated words to refuse ('none': no blocklist)."),
    ] = None,
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
) -> None:
    """Self-Instruct: new instruction rows from a few seed tasks, filtered and audited."""
    from tunelab.synth.client import GenSettings  # noqa: PLC0415
    from tunelab.synth.selfinstruct import DEFAULT_BLOCKLIST, SynthConfig  # noqa: PLC0415

    with errors():
        if min_words > max_words:
            raise ValueError(f"--min-words ({min_words}) is more than --max-words ({max_words})")
        config = SynthConfig(
            n=n, examples=examples, prompts_per_round=prompts_per_round, max_rounds=max_rounds,
            rouge_threshold=rouge_threshold, near_threshold=near_threshold, min_words=min_words,
            max_words=max_words, max_output_words=max_output_words, seed=seed,
            blocklist=DEFAULT_BLOCKLIST if _blocklist(blocklist) is None else _blocklist(blocklist),
            settings=GenSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed),
        )  # fmt: skip
        options = GeneratorOptions(
            model, endpoint, api_key, concurrency, batch_size, device, dtype, cache_dir, cache, timeout
        )
        summary = run_synth(
            seeds, output, config, options, eval_file=eval_file, overwrite=overwrite, quiet=as_json
        )
    _print_summary(summary, as_json)
    if summary.get("interrupted"):
        err.print(
            labelled(
                "interrupted",
                f"stopped in round {summary['rounds']}: wrote the {summary['kept']} rows made so far (of "
                f"--n {n}) to {summary['output']}, a partial run; the answers are cached, so the same "
                "command goes on from there",
            )
        )
        raise typer.Exit(130)


def run_synth(
    seeds_path: str,
    output: Path,
    config: Any,
    options: GeneratorOptions,
    *,
    eval_file: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Read the seeds, run Self-Instruct, and end with the closing audit; returns its summary."""
    from tunelab.synth.finish import check_paths, finish  # noqa: PLC0415
    from tunelab.synth.selfinstruct import SelfInstruct, read_seeds  # noqa: PLC0415

    check_paths(output, [seeds_path], overwrite=overwrite, eval_path=eval_file)
    seeds = read_seeds(seeds_path)
    generator = options.open()
    loop = SelfInstruct(generator, seeds, config, eval_path=eval_file)
    try:
        rows, dropped = loop.run()
        interrupted = False
    except KeyboardInterrupt:  # Ctrl-C: keep what is made (the answers are cached too)
        rows, dropped, interrupted = loop.rows, loop.dropped, True
    summary = finish(
        rows, output, eval_path=eval_file, kind="synth", dropped=dropped, inputs=[seeds_path],
        near_threshold=config.near_threshold, limit=config.n, console=err if quiet else None,
    )  # fmt: skip
    summary.update(model=generator.name, model_calls=generator.model_calls, rounds=loop.rounds)
    report_calls(generator)
    if interrupted:
        summary["interrupted"] = True
    elif summary["kept"] < config.n:
        err.print(
            labelled(
                "warning",
                f"only {summary['kept']} of --n {config.n} rows were kept after {loop.rounds} round(s); "
                "raise --max-rounds, loosen the filters, or use a stronger model",
            )
        )
    return summary


def augment_cmd(
    file: Annotated[
        str, typer.Argument(help="Data file whose rows to augment (instruction, chat, classification).")
    ],
    output: OutputOpt,
    ops: Annotated[
        str, typer.Option("--ops", help="Comma-separated: paraphrase, backtranslate, swap, delete, insert.")
    ] = "swap,delete,insert",
    variants: Annotated[int, typer.Option("--variants", min=1, help="New rows per row and operation.")] = 1,
    alpha: Annotated[
        float, typer.Option("--alpha", min=0.0, max=1.0, help="Share of words EDA changes.")
    ] = 0.1,
    pivot: Annotated[str, typer.Option("--pivot", help="Pivot language of back-translation.")] = "French",
    language: Annotated[
        str, typer.Option("--language", help="Language of the data (back-translation).")
    ] = "English",
    keep_original: Annotated[
        bool, typer.Option("--keep-original/--only-new", help="Write the source rows too.")
    ] = True,
    eval_file: EvalOpt = None,
    model: ModelOpt = None,
    endpoint: EndpointOpt = None,
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
) -> None:
    """Augment the input side of rows (outputs and labels kept); rows leaking into --eval are dropped."""
    from tunelab.synth.augment import AugmentConfig, check_ops  # noqa: PLC0415
    from tunelab.synth.client import GenSettings  # noqa: PLC0415

    with errors():
        config = AugmentConfig(
            ops=check_ops([o.strip() for o in ops.split(",") if o.strip()]), variants=variants, alpha=alpha,
            pivot=pivot, language=language, seed=seed, keep_original=keep_original,
            settings=GenSettings(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed),
        )  # fmt: skip
        options = GeneratorOptions(
            model, endpoint, api_key, concurrency, batch_size, device, dtype, cache_dir, cache, timeout
        )
        summary = run_augment(
            file, output, config, options, eval_file=eval_file, overwrite=overwrite, quiet=as_json
        )
    _print_summary(summary, as_json)


def run_augment(
    path: str,
    output: Path,
    config: Any,
    options: GeneratorOptions,
    *,
    eval_file: str | None = None,
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    from tunelab.data.loaders import DataError, iter_records  # noqa: PLC0415
    from tunelab.synth.augment import MODEL_OPS, augment_rows, detect_rows_format, leaking_rows  # noqa: PLC0415
    from tunelab.synth.finish import check_paths, finish  # noqa: PLC0415

    check_paths(output, [path], overwrite=overwrite, eval_path=eval_file)
    needs_model = any(op in MODEL_OPS for op in config.ops)
    if needs_model and not (options.model or options.endpoint):
        raise ValueError("--ops paraphrase/backtranslate need a model: give --model SPEC or --endpoint URL")
    rows = list(iter_records(path))
    if not rows:
        raise DataError(path, 0, "", "has no rows to augment")
    fmt = detect_rows_format(path, rows)
    generator = options.open() if needs_model else None
    made, dropped = augment_rows(rows, fmt, config, generator, skip=leaking_rows(rows, eval_file))
    summary = finish(
        made, output, eval_path=eval_file, kind="augment", dropped=dropped, inputs=[path],
        console=err if quiet else None,
    )  # fmt: skip
    summary.update(format=fmt, source_rows=len(rows))
    if generator is not None:
        summary.update(model=generator.name, model_calls=generator.model_calls)
        report_calls(generator)
    return summary
