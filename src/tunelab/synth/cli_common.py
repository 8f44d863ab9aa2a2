"""Options and error handling shared by the data-making commands (`tunelab data synth|augment|...`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from tunelab.console import fail, make_console
from tunelab.synth.client import DEFAULT_TIMEOUT_S

err = make_console(stderr=True)

ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Generating model: hub id, local dir, .gguf, asset:NAME, tiny:llama or a run dir; "
        "with --endpoint, the model name the endpoint serves (default: the first it lists).",
    ),
]
EndpointOpt = Annotated[
    str | None,
    typer.Option("--endpoint", help="OpenAI-compatible base URL (tunelab serve, vLLM, llama.cpp, Ollama)."),
]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option("--api-key", envvar="TUNELAB_API_KEY", help="Key for --endpoint (else $OPENAI_API_KEY)."),
]
TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout",
        min=0.1,
        help=f"Seconds one --endpoint request may take before the command stops with an error "
        f"(default {DEFAULT_TIMEOUT_S:g}).",
    ),
]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", min=1, help="Parallel requests to --endpoint.")]
BatchOpt = Annotated[
    int, typer.Option("--batch-size", min=1, help="Conversations per batch on a local model.")
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps (local model).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16 or float16 (local model).")]
CacheDirOpt = Annotated[
    Path | None, typer.Option("--cache-dir", help="Request cache (default $TUNELAB_HOME/cache/generate).")
]
CacheOpt = Annotated[
    bool, typer.Option("--cache/--no-cache", help="Reuse cached answers for identical requests.")
]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", min=1, help="Tokens per answer at most.")]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", min=0.0, help="Sampling temperature (0: greedy).")
]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for sampling, example choice and EDA.")]
EvalOpt = Annotated[
    str | None,
    typer.Option("--eval", help="Eval file: rows leaking into it (exact, prompt or near) are dropped."),
]
OutputOpt = Annotated[
    Path, typer.Option("-o", "--output", help="JSONL file to write (rejects: OUT.rejects.jsonl).")
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace output files that already exist (never an input).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")]


@dataclass(frozen=True)
class GeneratorOptions:
    model: str | None
    endpoint: str | None
    api_key: str | None = None
    concurrency: int = 4
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    cache_dir: Path | None = None
    cache: bool = True
    timeout: float = DEFAULT_TIMEOUT_S

    def open(self):  # -> CachedGenerator; the client (torch, openai) is imported only when needed
        from tunelab.synth.client import open_generator  # noqa: PLC0415

        return open_generator(
            self.model,
            endpoint=self.endpoint,
            api_key=self.api_key,
            concurrency=self.concurrency,
            cache_dir=self.cache_dir,
            batch_size=self.batch_size,
            device=self.device,
            dtype=self.dtype,
            use_cache=self.cache,
            console=err,
            timeout_s=self.timeout,
        )


def one_line(text: str) -> str:
    return " ".join(text.replace("\r", "\n").split("\n")).strip()


@contextmanager
def errors() -> Iterator[None]:
    """A problem the user can fix ends the command with one `error:` line and exit code 2."""
    from tunelab.data.formats import FormatError  # noqa: PLC0415
    from tunelab.data.loaders import DataError  # noqa: PLC0415
    from tunelab.synth.client import GenerationError  # noqa: PLC0415

    try:
        yield
    except (DataError, FormatError, ValueError, GenerationError) as e:
        fail(err, one_line(str(e)))
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        fail(err, one_line(f"{where}{e.strerror or e}"))


def report_calls(generator: object) -> None:
    """How many requests the model really answered (the rest came from the cache)."""
    calls = getattr(generator, "model_calls", None)
    if calls is not None:
        err.print(
            f"model calls: {calls} ({getattr(generator, 'name', '')}); every other answer came from the cache"
        )
