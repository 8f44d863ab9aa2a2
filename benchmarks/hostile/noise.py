"""Issue 26 §5, noise and start-up: library lines on the console, and the ML stack loaded for a schema check.

A case fails as ``silent``: the command exits as it should, but says what is not tunelab's to say, or
pays for torch where it needs none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hostile import Case, Outcome, tunelab, user_env

AREA = "noise"
ML_STACK = ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes")
LIBRARY_LINES = (
    "Token indices sequence length is longer than the specified maximum",
    "Failed to load CPU gemm_4bit_forward",
    "kernels-community",
)


def _python(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -c SCRIPT ARGS`` with this checkout's code, no terminal and COLUMNS unset, as `tunelab` runs."""
    env = user_env(drop=("_VERBOSITY",))
    return subprocess.run(
        [sys.executable, "-c", script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _foreign(err: str) -> list[str]:
    return [line for line in LIBRARY_LINES if line in err]


def long_rows_print_no_transformers_warning(scratch: Path) -> Outcome:
    """`data audit --model` tokenises whole rows to count tokens; a row past the tokenizer's maximum made
    transformers warn of "indexing errors" although nothing is run through the model."""
    rows = [
        {"instruction": "tell me " + "word " * 900, "output": "ok"},
        {"instruction": "hi", "output": "there"},
    ]
    (scratch / "long.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ran = tunelab("data", "audit", "long.jsonl", "--model", "tiny:llama", cwd=scratch)
    if "Traceback" in ran.err:
        return Outcome("traceback", ran.err.strip().splitlines()[-1][:160])
    if ran.code != 0 or _foreign(ran.err):
        return Outcome("silent", f"exit {ran.code}; {_foreign(ran.err) or ran.err.strip()[:160]}")
    return Outcome(
        "ok", "no library warning; the audit's token table printed" if "tokens" in ran.out else "ok"
    )


BNB_REPLAY = """
import logging, sys
from tunelab.cli import run
try:
    run(["runs", "ls", sys.argv[1]])
except SystemExit:
    pass
# what bitsandbytes 0.50 logs at import on CPUs with AVX512-BF16 (backends/cpu/ops.py), on its own logger
logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
    "Failed to load CPU gemm_4bit_forward from kernels-community: trust_remote_code. Please make sure ..."
)
logging.getLogger("bitsandbytes").error("a real bitsandbytes failure")
"""


def bitsandbytes_kernel_note_stays_off(scratch: Path) -> Outcome:
    """Every run on an AVX512-BF16 CPU printed bitsandbytes' hub-kernel note (PEFT imports bitsandbytes);
    replayed on its logger after the CLI's own set-up, next to an error that must still show."""
    (scratch / "runs").mkdir()
    done = _python(BNB_REPLAY, str(scratch / "runs"), cwd=scratch)
    if "Traceback" in done.stderr:
        return Outcome("traceback", done.stderr.strip().splitlines()[-1][:160])
    if _foreign(done.stderr) or "a real bitsandbytes failure" not in done.stderr:
        return Outcome("silent", done.stderr.strip()[:160])
    return Outcome("ok", "note silent; the library's error still printed")


STARTUP = """
import json, resource, sys
from tunelab.cli import run
code = 0
try:
    run(sys.argv[2:])
except SystemExit as exit:
    code = exit.code
heavy = [m for m in json.loads(sys.argv[1]) if m in sys.modules]
# VmHWM: this program's own peak (ru_maxrss would keep the peak of the process it was forked from)
try:
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    rss = int(hwm.split()[1]) / 1024
except (OSError, IndexError):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
sys.stderr.write(f"\\nPROBE {json.dumps({'code': code, 'heavy': heavy, 'rss_mb': rss})}\\n")
"""


def recipe_check_of_empty_file_stays_light(scratch: Path) -> Outcome:
    """`recipe check` on an empty file took 5-13 s and 580 MB: the schema imported torch, PEFT and
    transformers through the method and objective registries."""
    (scratch / "empty.yaml").write_text("")
    done = _python(STARTUP, json.dumps(ML_STACK), "recipe", "check", "empty.yaml", cwd=scratch)
    if "Traceback" in done.stderr:
        return Outcome("traceback", done.stderr.strip().splitlines()[-1][:160])
    probe = json.loads(done.stderr.rsplit("PROBE ", 1)[1])
    said = [line for line in done.stderr.split("\nPROBE ")[0].splitlines() if line.strip()]
    if probe["code"] != 2 or len(said) != 1 or "empty.yaml" not in said[0]:
        return Outcome("silent", f"exit {probe['code']}; {done.stderr.strip()[:160]}")
    if probe["heavy"] or probe["rss_mb"] >= 150:
        return Outcome("silent", f"imported {probe['heavy']}; peak RSS {probe['rss_mb']:.0f} MB")
    return Outcome("ok", f"refused in one line; no ML stack; peak RSS {probe['rss_mb']:.0f} MB")


CASES = [
    Case(AREA, "long rows: no transformers length warning", long_rows_print_no_transformers_warning),
    Case(AREA, "bitsandbytes kernel note stays off the console", bitsandbytes_kernel_note_stays_off),
    Case(AREA, "recipe check of an empty file: no ML stack", recipe_check_of_empty_file_stays_light),
]
