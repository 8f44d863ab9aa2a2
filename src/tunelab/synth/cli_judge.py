"""`tunelab data judge` and `tunelab data constitute` (registered on the data app in tunelab.cli).

Model options take one spec each: any tunelab model spec (hub id, directory, ``.gguf``, ``asset:``,
``tiny:llama``, a run directory), or an OpenAI-compatible endpoint URL with the served model after
``#`` (``http://127.0.0.1:8000/v1#my-model``). Every command ends with the closing audit
(:mod:`tunelab.synth.finish`), which writes the kept rows and a rejects file with reasons.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tunelab.console import fail, labelled, make_console
from tunelab.data.formats import FormatError
from tunelab.data.loaders import DataError
from tunelab.synth.client import GenerationError, Generator, GenSettings

out = make_console()
err = make_console(stderr=True)

EvalOpt = Annotated[
    Path | None, typer.Option("--eval", help="Held-out file: generated rows that leak into it are dropped.")
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", min=1, help="Use only the first N prompts of INPUT.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Sampling seed (candidate k uses seed + k).")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="Most new tokens per answer.")]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", min=0.0, help="Sampling temperature (0 = greedy).")
]
ApiKeyOpt = Annotated[
    str | None, typer.Option("--api-key", envvar="OPENAI_API_KEY", help="Key for endpoints that need one.")
]
ConcurrencyOpt = Annotated[
    int, typer.Option("--concurrency", min=1, help="Endpoint requests in flight at once.")
]
BatchOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Prompts per batch for a local model.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Device of a local model: auto, cpu, cuda, mps.")]
CacheDirOpt = Annotated[
    Path | None, typer.Option("--cache-dir", help="Generation cache (default $TUNELAB_HOME/cache/generate).")
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the generation cache.")]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace outputs that exist (never an input).")
]
FormatOpt = Annotated[str | None, typer.Option("--format", help="Format of INPUT; default: detect.")]
ColumnsOpt = Annotated[str | None, typer.Option("--columns", help="Column renames, canonical=source.")]


@contextmanager
def errors() -> Iterator[None]:
    """A problem the user can fix ends the command with one line on stderr and exit code 2."""
    try:
        yield
    except (DataError, FormatError, ValueError, GenerationError) as e:
        fail(err, " ".join(str(e).split("\n")))
    except OSError as e:  # a directory where a file belongs, permissions, a full disk
        where = f"{e.filename}: " if e.filename else ""
        fail(err, f"{where}{e.strerror or e}")


def parse_columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    pairs = [p.split("=", 1) for p in text.split(",") if p.strip()]
    if any(len(p) != 2 or not p[0].strip() or not p[1].strip() for p in pairs):
        raise ValueError(f"--columns takes canonical=source pairs, e.g. instruction=question; got '{text}'")
    return {k.strip(): v.strip() for k, v in pairs}


class Generators:
    """Opens each model spec once (a judge that is also a candidate model is loaded one time)."""

    def __init__(self, **options: Any) -> None:
        self.options, self.open = options, {}

    def __call__(self, spec: str) -> Generator:
        from tunelab.synth.judge import open_spec  # noqa: PLC0415

        if spec not in self.open:
            self.open[spec] = open_spec(spec, console=err, **self.options)
        return self.open[spec]


def generator_options(
    api_key: str | None,
    concurrency: int,
    batch_size: int,
    device: str,
    cache_dir: Path | None,
    no_cache: bool,
) -> dict[str, Any]:
    return {
        "api_key": api_key,
        "concurrency": concurrency,
        "batch_size": batch_size,
        "device": device,
        "cache_dir": cache_dir,
        "use_cache": not no_cache,
    }


def read_rubric(value: str | None) -> str | None:
    """--rubric: the text itself, or a file holding it."""
    if value and Path(value).is_file():
        return Path(value).read_text(encoding="utf-8").strip()
    return value


def print_agreement(stats: dict[str, Any] | None) -> None:
    if stats is None:
        return
    table = Table(title="Judge vs human labels")
    for name in ("labelled", "agree", "disagree", "tie", "unreadable"):
        table.add_column(name, justify="right")
    table.add_column("agreement", justify="right")
    rate = stats["rate"]
    table.add_row(*(str(stats[k]) for k in ("labelled", "agree", "disagree", "tie", "unreadable")),
                  "n/a" if rate is None else f"{rate:.0%}")  # fmt: skip
    out.print(table)


def judge_cmd(
    input: Annotated[Path, typer.Argument(help="Prompts (any format), or preference rows to re-judge.")],
    output: Annotated[Path, typer.Option("--out", help="Preference pairs to write (JSONL).")],
    judge: Annotated[
        str, typer.Option("--judge", help="The judge: a model spec or an endpoint URL[#model].")
    ],
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Candidate model (repeat for several); spec or URL[#model]."),
    ] = None,
    mode: Annotated[
        str, typer.Option("--mode", help="pairwise (A/B, both orders) or pointwise (1-10).")
    ] = "pairwise",
    candidates: Annotated[int, typer.Option("--candidates", min=1, help="Answers sampled per model.")] = 2,
    rubric: Annotated[str | None, typer.Option("--rubric", help="Rubric text or a file with it.")] = None,
    min_margin: Annotated[
        float, typer.Option("--min-margin", min=0.0, help="Pointwise: least score gap.")
    ] = 1.0,
    eval_path: EvalOpt = None,
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.8,
    judge_max_tokens: Annotated[int, typer.Option("--judge-max-tokens", min=1)] = 256,
    api_key: ApiKeyOpt = None,
    concurrency: ConcurrencyOpt = 4,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = None,
    columns: ColumnsOpt = None,
) -> None:
    """LLM-as-judge: sample candidates, judge them (pairwise or pointwise), write preference pairs."""
    from tunelab.synth import preferences as prefs  # noqa: PLC0415
    from tunelab.synth.finish import check_paths, finish  # noqa: PLC0415
    from tunelab.synth.judge import Judge  # noqa: PLC0415

    with errors():
        if mode not in ("pairwise", "pointwise"):
            raise ValueError(f"--mode must be pairwise or pointwise, got '{mode}'")
        check_paths(output, [input], overwrite=overwrite)
        items = prefs.read_items(str(input), fmt, parse_columns(columns))[:limit]
        if not items:
            raise DataError(input, 0, "", "holds no prompts to judge")
        open_model = Generators(
            **generator_options(api_key, concurrency, batch_size, device, cache_dir, no_cache)
        )
        settings = GenSettings(max_tokens=max_tokens, temperature=temperature, seed=seed)
        if any(not item.candidates for item in items):
            if not model:
                raise ValueError(f"{input}: rows without candidates need --model to sample answers from")
            prefs.sample_candidates(items, [open_model(m) for m in model], candidates, settings)
        referee = Judge(open_model(judge), rubric=read_rubric(rubric), max_tokens=judge_max_tokens, seed=seed)
        if mode == "pairwise":
            outcomes = prefs.judge_pairwise(referee, items)
        else:
            outcomes = prefs.judge_pointwise(referee, items, min_margin)
        rows = [prefs.pair_row(o, referee, settings) for o in outcomes if o.chosen is not None]
        dropped = [{"reason": o.reason, "row": prefs.dropped_row(o)} for o in outcomes if o.chosen is None]
        finish(rows, output, eval_path=eval_path, kind="judge", dropped=dropped, inputs=[input], console=out)
        print_agreement(prefs.agreement(outcomes))


def default_pairs_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}.pairs{output.suffix or '.jsonl'}")


def constitute_cmd(
    input: Annotated[Path, typer.Argument(help="Prompts (any format; existing answers are ignored).")],
    output: Annotated[
        Path, typer.Option("--out", help="SFT rows to write: prompt -> final revision (JSONL).")
    ],
    model: Annotated[
        str | None, typer.Option("--model", help="Model spec, or the served model with --endpoint.")
    ] = None,
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="OpenAI-compatible base URL.")] = None,
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
    eval_path: EvalOpt = None,
    limit: LimitOpt = None,
    seed: SeedOpt = 0,
    max_tokens: MaxTokensOpt = 256,
    temperature: TemperatureOpt = 0.7,
    api_key: ApiKeyOpt = None,
    concurrency: ConcurrencyOpt = 4,
    batch_size: BatchOpt = 8,
    device: DeviceOpt = "auto",
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    overwrite: OverwriteOpt = False,
    fmt: FormatOpt = None,
    columns: ColumnsOpt = None,
) -> None:
    """Constitutional AI's supervised stage: answer, critique against a principle, revise (--rounds)."""
    from tunelab.synth import constitute as cai  # noqa: PLC0415
    from tunelab.synth.client import open_generator  # noqa: PLC0415
    from tunelab.synth.finish import check_paths, finish  # noqa: PLC0415
    from tunelab.synth.preferences import read_items  # noqa: PLC0415

    with errors():
        pairs = pairs or default_pairs_path(output)
        check_paths(output, [input, constitution], overwrite=overwrite)
        check_paths(pairs, [input, constitution, output], overwrite=overwrite)
        principles = cai.load_constitution(constitution)
        items = read_items(str(input), fmt, parse_columns(columns))[:limit]
        if not items:
            raise DataError(input, 0, "", "holds no prompts")
        options = generator_options(api_key, concurrency, batch_size, device, cache_dir, no_cache)
        generator = open_generator(model, endpoint=endpoint, console=err, **options)
        settings = GenSettings(max_tokens=max_tokens, temperature=temperature, seed=seed)
        traces = cai.constitute(generator, items, principles, rounds=rounds, settings=settings)
        source = str(constitution) if constitution else "default"
        sft, sft_dropped, kept_pairs, pairs_dropped = cai.outputs(traces, generator.name, settings, source)
        common = {"eval_path": eval_path, "inputs": [input, constitution], "console": out}
        finish(sft, output, kind="constitute", dropped=_reasons(sft_dropped), **common)
        finish(kept_pairs, pairs, kind="constitute-pairs", dropped=_reasons(pairs_dropped), **common)
        out.print(labelled("note", f"{len(traces)} prompts, {rounds} round(s), constitution: {source}"))


def _reasons(dropped: list[tuple[dict, str]]) -> list[dict]:
    return [{"reason": reason, "row": row} for row, reason in dropped]
