"""Every console tunelab prints through: user text as written, one unwrapped line off a terminal.

Two rules hold for all output (see docs/architecture.md, "Output"):
- Text a user supplied (paths, data, column and model names, recipe values, exception messages that
  quote them) is never read as rich markup or emoji codes. These consoles have markup, emoji and
  highlighting off; tunelab's own styling is applied with `Text` styles (`labelled`, `styled`), never
  with `[red]...[/]` strings, so nothing a user typed can ever be taken for a style.
- Output to a pipe, a file or a test runner is never hard-wrapped: when the stream is not a terminal
  (and COLUMNS does not say otherwise) the width is unlimited, so one message is one line and
  `grep` finds it whatever the length of the path in it. Tables stay tables, at their natural width.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from rich.console import Console, ConsoleDimensions
from rich.text import Text

# Width used off a terminal: wide enough that no message or table row is ever folded. rich pads
# nothing to the full width unless asked (no Panel/Rule/expand=True in tunelab's output), so this costs
# nothing in the output itself.
UNLIMITED = 1_000_000

# Styles of tunelab's own labels; the text after a label is always printed verbatim.
STYLES = {
    "error": "red",
    "bad": "red",
    "blocking": "red",
    "gate failed": "red",
    "warning": "yellow",
    "note": "yellow",
    "pre-flight": "yellow",
    "interrupted": "yellow",
    "ok": "green",
}


class TunelabConsole(Console):
    """A rich Console with markup/emoji/highlighting off and no hard wrap off a terminal.

    The terminal test is made at each print (as rich does for colour), not at construction, so a
    module-level console behaves right under a test runner that swaps sys.stdout per test.
    """

    def __init__(self, *, stderr: bool = False, **kwargs) -> None:
        kwargs.setdefault("markup", False)
        kwargs.setdefault("emoji", False)
        kwargs.setdefault("highlight", False)
        super().__init__(stderr=stderr, **kwargs)

    @property
    def size(self) -> ConsoleDimensions:
        if self._width is None and not self.is_terminal and not os.environ.get("COLUMNS"):
            return ConsoleDimensions(UNLIMITED, self._height or 25)
        return super().size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size

    def print(self, *objects, **kwargs) -> None:  # noqa: A003 - rich's name
        if not self.is_terminal:
            kwargs.setdefault("soft_wrap", True)
        super().print(*objects, **kwargs)

    def status(self, status, **kwargs):
        # rich's spinner parses a str status as markup whatever the console's setting; ours never is.
        return super().status(Text(status) if isinstance(status, str) else status, **kwargs)

    def rule(self, title="", **kwargs) -> None:
        # A rule fills the width; at the unlimited width it would be a megabyte of dashes.
        if self.size.width < UNLIMITED:
            super().rule(title, **kwargs)
            return
        line = Text("── ")
        line.append(title if isinstance(title, Text) else Text(str(title)))
        line.append(" ──")
        self.print(line)


# What the libraries under tunelab say on their own: notes to their developers ("Failed to load CPU
# gemm_4bit_forward from kernels-community", from bitsandbytes' import on CPUs with AVX512-BF16) or about
# something tunelab handles itself ("Token indices sequence length is longer than the specified maximum":
# tunelab tokenises whole rows to count what truncation drops, then truncates). A user reads them as
# errors, so only their real errors reach the console. transformers, datasets and huggingface_hub set
# their loggers' levels from these variables when they first log (a level set before that is
# overwritten); the others keep the level set on their logger. A variable the user set wins, so
# `TRANSFORMERS_VERBOSITY=warning tunelab ...` brings transformers' warnings back.
LIBRARY_VERBOSITY = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "HF_HUB_VERBOSITY": "error",
}
LIBRARY_LOGGERS = ("bitsandbytes", "peft", "accelerate")
# Python warnings from libraries, each by its exact message: a filter never hides a category wholesale.
# PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` on every adapter it builds; and
# it warns that a PiSSA/OLoRA adapter "should not be used with other adapters" while it loads the initial
# adapter beside the trained one to convert it into a plain LoRA, the very conversion the warning
# recommends (tunelab's `save_lora` always asks for it). Reloading an AdaLoRA adapter, its own
# `rank_pattern` (keyed by `...lora_E` parameter names, which AdaLoRA does apply:
# tests/test_methods_peft.py) is reported as unmatched by PEFT's generic pattern check; tunelab sets no
# other rank_pattern.
LIBRARY_WARNINGS = (
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    (r"(PiSSA|OLoRA|CorDA) changes the base weights of the model and should thus not be used", UserWarning),
    (r"The following rank_pattern keys did not match any targeted module or parameter", RuntimeWarning),
)


def quiet_libraries() -> None:
    """Let only tunelab's own words (and the libraries' real errors) reach the console; called once by
    the `tunelab` command before any library is imported. Off a terminal, the libraries' tqdm bars
    (loading, converting, writing shards) are carriage-return redraws that fill logs with one long line,
    so they are switched off there (tqdm >= 4.66 reads TQDM_* variables as its defaults); tunelab's own
    progress prints plain lines instead. Nothing here imports a library."""
    import logging
    import warnings

    for name, level in LIBRARY_VERBOSITY.items():
        os.environ.setdefault(name, level)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:  # a level the user's code set stays
            logger.setLevel(logging.ERROR)
    for message, category in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not is_terminal():
        os.environ.setdefault("TQDM_DISABLE", "1")


def make_console(*, stderr: bool = False, **kwargs) -> TunelabConsole:
    """The console for stdout (results) or stderr (errors, notes, progress)."""
    return TunelabConsole(stderr=stderr, **kwargs)


def is_terminal(stream=None) -> bool:
    """True when the stream (default stderr) is an interactive terminal that can redraw a bar."""
    stream = stream if stream is not None else sys.stderr
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False


_CONTROL_NAMES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")


def escape_controls(text: str, keep: str = "") -> str:
    """``text`` with control characters (C0, DEL, C1) shown as escapes (``\\x1b``, ``\\r``), so data
    cannot move the cursor, clear the screen or retitle the terminal; the characters in ``keep``
    (say ``"\\n\\t"``) stay as they are. Printable text, markup-like included, is unchanged."""

    def name(m: re.Match) -> str:
        c = m[0]
        return c if c in keep else _CONTROL_NAMES.get(c, f"\\x{ord(c):02x}")

    return _CONTROLS.sub(name, text)


def styled(text: str, style: str) -> Text:
    """tunelab's own text in a style (the text itself is never parsed)."""
    return Text(text, style=style)


def labelled(label: str, message: str) -> Text:
    """`label: message` with the label styled and the message exactly as given."""
    line = Text(f"{label}:", style=STYLES.get(label, "bold"))
    line.append(" ")
    line.append(message)
    return line


def fail(console: Console, message: str, code: int = 2) -> NoReturn:
    """Print `error: message` as one line on the console and end the command with `code`."""
    import typer  # the CLI layer; imported here so library code can use labelled() without typer

    console.print(labelled("error", str(message)))
    raise typer.Exit(code)


class PlainProgress:
    """Progress as plain lines for logs (nohup, CI, Slurm, `| tee`), where a redrawn bar shows nothing.

    One line at most every `every_s` seconds, and always one at the end: `label: done/total (pct),
    elapsed, ETA`. The clock is injectable so the arithmetic is tested without sleeping.
    """

    def __init__(self, console: Console, label: str, total: int | None, *, every_s: float = 10.0, clock=None):
        import time

        self.console, self.label, self.total, self.every_s = console, label, total, every_s
        self.clock = clock or time.monotonic
        self.start = self.last = self.clock()
        self.done = 0
        self.shown = -1  # the count in the last line printed, so finish() never repeats it

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        if now - self.last >= self.every_s:
            self.last = now
            self.shown = self.done
            self.console.print(self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.start
        if not self.total:
            return f"{self.label}: {self.done:,} done, {elapsed:.0f} s"
        pct = 100 * self.done / self.total
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        eta_text = f", ETA {eta:.0f} s" if self.done < self.total and self.done else ""
        return f"{self.label}: {self.done:,}/{self.total:,} ({pct:.0f}%), {elapsed:.0f} s{eta_text}"

    def finish(self) -> None:
        if self.shown != self.done:
            self.console.print(self.line(self.clock()))


@contextmanager
def progress(console: Console, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)`: a transient rich bar on a terminal, plain lines (PlainProgress) otherwise."""
    if console.is_terminal and not console.is_dumb_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        # The label may hold user text (a model name); rich's default description column parses markup.
        columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn())
        with Progress(*columns, TimeRemainingColumn(), console=console, transient=True) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n=1: bar.advance(task, n)
        return
    plain = PlainProgress(console, label, total)
    yield plain.advance
    plain.finish()
