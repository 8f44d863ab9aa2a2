"""Run a model's Python code against tests in a child process with resource limits.

The child is a fresh interpreter (``python -I``: no user site, no ``PYTHON*`` variables), started
with an empty environment in a new scratch directory that is removed afterwards, in its own session
(so a timeout kills everything it started). Before the code runs, the child caps its own CPU time,
address space, file size and core dumps with ``resource.setrlimit`` (done in the child rather than
in ``preexec_fn``, which is unsafe in a threaded parent such as a training process); the parent
enforces the wall-clock limit.

These are **resource limits, not a security boundary**: the code runs as the same user, can read
what that user can read and can open network connections. Run untrusted models in a container or
VM when that matters. The result file can also be forged by code that tries; treat a sudden jump
in ``code_tests`` rewards as a sign of reward hacking and read the completions.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_HARNESS = r"""
import json, resource, sys
cpu, memory, fsize = (int(v) for v in sys.argv[1:4])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
tests = json.load(open("tests.json"))
passed = 0
namespace = {"__name__": "__main__"}
try:
    exec(compile(open("solution.py").read(), "solution.py", "exec"), namespace)
    ran = True
except BaseException:
    ran = False
if ran:
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"test_{i}", "exec"), dict(namespace))
            passed += 1
        except BaseException:
            pass
with open("result.json", "w") as f:
    json.dump({"ran": ran, "passed": passed}, f)
"""


@dataclass(frozen=True)
class Limits:
    """Per-run limits: CPU seconds, address space in MB, wall-clock seconds, largest file written."""

    cpu_seconds: float = 5.0
    memory_mb: int = 512
    wall_seconds: float = 10.0
    file_mb: int = 16


@dataclass(frozen=True)
class RunResult:
    passed: int
    total: int
    ran: bool  # the code itself executed without raising
    timed_out: bool
    returncode: int | None


def run_python(code: str, tests: list[str], limits: Limits = Limits()) -> RunResult:
    """Run ``code`` then each test in ``tests`` (each counts as passed when it raises nothing)."""
    with tempfile.TemporaryDirectory(prefix="tunelab-sandbox-") as scratch:
        root = Path(scratch)
        (root / "solution.py").write_text(code)
        (root / "tests.json").write_text(json.dumps(tests))
        (root / "harness.py").write_text(_HARNESS)
        argv = [
            sys.executable,
            "-I",
            "harness.py",
            str(max(1, round(limits.cpu_seconds))),
            str(limits.memory_mb << 20),
            str(limits.file_mb << 20),
        ]
        proc = subprocess.Popen(
            argv,
            cwd=root,
            env={},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=limits.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)  # also what the code left running in the background
        result = _read_result(root / "result.json") if not timed_out else {}
        passed = min(int(result.get("passed", 0)), len(tests))
        return RunResult(passed, len(tests), bool(result.get("ran", False)), timed_out, proc.returncode)


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child and anything it started (it leads its own session), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _read_result(path: Path) -> dict:
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return result if isinstance(result, dict) else {}
