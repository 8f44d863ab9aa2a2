"""Training progress on stderr: a live bar on a terminal, plain lines everywhere else.

A rich progress bar redraws one line in place, which only works on a terminal; under nohup, CI,
Slurm or ``| tee`` it would show nothing until the run ends. There, like the Hugging Face Trainer,
tunelab prints one plain line every ``training.log_every`` steps, at least every
:data:`MAX_SILENCE_S` seconds, and always at the last step::

    train step 40/200  loss 1.2345  lr 2.00e-04  5120 tok/s  ETA 0:03:10
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text

MAX_SILENCE_S = 30.0
"""Longest time without a progress line off a terminal, whatever ``log_every`` says."""


def format_eta(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class StepProgress:
    """``with StepProgress(console, "train", total, done, every) as p: ... p.update(step, info)``."""

    def __init__(
        self,
        console: Console,
        description: str,
        total: int,
        completed: int = 0,
        every: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console, self.description, self.total = console, description, total
        self.every, self.clock = max(1, every), clock
        self.first_step, self.started = completed, clock()
        self.last_line = self.started
        self.bar: Progress | None = None
        self.task = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}", markup=False),
                console=console,
                transient=False,
            )
            self.task = self.bar.add_task(description, total=total, completed=completed, info="")

    def __enter__(self) -> StepProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, kind: type | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, info: str) -> None:
        """Step ``step`` (1-based, of ``total``) is done; ``info`` is its loss, lr, speed, ..."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)
            return
        now = self.clock()
        due = step % self.every == 0 or step >= self.total or now - self.last_line >= MAX_SILENCE_S
        if not due:
            return
        self.last_line = now
        done = step - self.first_step
        eta = (now - self.started) / done * (self.total - step) if done > 0 else 0.0
        line = f"{self.description} step {step}/{self.total}  {info}  ETA {format_eta(eta)}"
        self.console.print(Text(line), soft_wrap=True)  # one line in the log, however long
