"""Hostile cases replayed by ``benchmarks/hostile_probe.py``: one module per area, each with a ``CASES`` list.

A case is a plain function taking a scratch folder and returning an :class:`Outcome`. Its verdict is one of
``ok`` (the input was refused with a clear one-line error, or handled right), ``traceback`` (a Python
traceback reached the user), ``silent`` (bad input accepted, or a wrong result with exit 0), ``loss`` (an
input or an unrelated file was changed or deleted) or ``leak`` (a file's content, a secret or an internal
path reached someone who should not see it). The probe prints one table row per case and a total per
verdict; the issue's target is 0 of every verdict but ``ok``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VERDICTS = ("ok", "traceback", "silent", "loss", "leak")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Outcome:
    verdict: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r}: one of {', '.join(VERDICTS)}")


@dataclass(frozen=True)
class Case:
    area: str
    name: str
    run: Callable[[Path], Outcome]


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


def user_env(drop: tuple[str, ...] = ()) -> dict[str, str]:
    """The environment a user's `tunelab` runs in here: no terminal, COLUMNS unset (and any variable whose
    name ends with one of ``drop``), this checkout's code first on the path."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS" and not (drop and k.endswith(drop))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    env["TERM"] = "dumb"
    return env


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tunelab(*args: str, cwd: Path, stdin: str = "", timeout: float = 300, env: dict | None = None) -> Ran:
    """Run ``python -m tunelab ARGS`` as a user would: no terminal, COLUMNS unset, this checkout's code."""
    proc = subprocess.run(
        [sys.executable, "-m", "tunelab", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=user_env() | (env or {}),
    )
    return Ran(proc.returncode, proc.stdout, proc.stderr)


def refused(ran: Ran, *, code: int = 2, mentions: tuple[str, ...] = ()) -> Outcome:
    """The usual expectation for bad input: exit ``code``, one line on stderr naming what it must name."""
    if "Traceback" in ran.err or "Traceback" in ran.out:
        return Outcome("traceback", ran.err.strip().splitlines()[-1][:160] if ran.err.strip() else "")
    if ran.code == 0:
        return Outcome("silent", "exit 0")
    lines = [line for line in ran.err.strip().splitlines() if line.strip()]
    missing = [word for word in mentions if word not in ran.err]
    if ran.code != code or missing or not lines:
        return Outcome("silent", f"exit {ran.code}; missing {missing}; {ran.err.strip()[:160]}")
    return Outcome("ok", lines[-1][:160])
