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
import sys
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
