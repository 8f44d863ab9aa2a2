"""Server-sent events for one run: new metrics rows, its state and its log tail, read from disk.

Every tab opens its own stream and reads the same files, so two tabs on one run see the same state;
a tab opened late first receives every row written so far.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from tunelab.studio import jobs
from tunelab.studio.render import ENV

POLL_S = 0.5
CHART_KEYS = ("loss", "lr", "grad_norm", "tokens_per_s")


class MetricsTail:
    """Reads the complete lines appended to ``metrics.jsonl`` since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_rows(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written is read next time
        self.offset += len(complete)
        rows = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "loss" in row:  # training rows; eval rows have eval_* keys
                rows.append({k: row.get(k) for k in ("step", *CHART_KEYS)})
        return rows


def sse(event: str, data: str) -> str:
    """One event; every line of ``data`` gets its own ``data:`` field, as the format requires."""
    lines = data.split("\n") or [""]
    return f"event: {event}\n" + "".join(f"data: {line}\n" for line in lines) + "\n"


def _status_html(state: jobs.RunState) -> str:
    return ENV.get_template("_run_status.html").render(state=state)


async def run_events(
    runs_dir: Path, name: str, state_of: Callable[[], jobs.RunState], poll_s: float = POLL_S
) -> AsyncIterator[str]:
    """Events until the run is finished: ``metrics`` (JSON rows), ``status`` and ``log`` (HTML), then ``done``."""
    tail = MetricsTail(runs_dir / name / "metrics.jsonl")
    last_status, last_log = None, None
    while True:
        state = state_of()  # read before the rows: a finished run's last rows are then all sent
        rows = tail.new_rows()
        if rows:
            yield sse("metrics", json.dumps(rows))
        status = _status_html(state)
        if status != last_status:
            last_status = status
            yield sse("status", status)
        log = "\n".join(jobs.log_tail(runs_dir, name))
        if log != last_log:
            last_log = log
            yield sse("log", ENV.from_string("{{ text }}").render(text=log))
        if state.finished:
            yield sse("done", state.status)
            return
        await asyncio.sleep(poll_s)
