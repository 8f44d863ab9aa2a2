"""Crash-safe file and directory writes.

A run can be killed at any instant (Ctrl-C, OOM killer, preemption). Every artefact tunelab
writes goes through these helpers so that a reader afterwards sees either the previous version
or the new one, never a torn file. The pattern is the classic one: write to a temporary name in
the same directory, flush and fsync it, ``os.replace`` it over the final name, fsync the
directory so the rename itself is durable.

Temporary names start with a dot and end in ``.tmp`` (or ``.old`` for a directory being
replaced), so directory scans that skip dot-files never mistake them for real artefacts.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


class OutputPathError(OSError, ValueError):
    """An output that cannot be written where the user asked, named as the user wrote it (never the
    hidden temporary beside it). An OSError (``filename``, ``strerror``) for callers that report file
    errors, and a ValueError so every command reports it as the user's input to fix (exit 2)."""

    def __init__(self, path: str | os.PathLike[str], err: OSError) -> None:
        blocker = blocking_file(Path(path).parent)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else (err.strerror or str(err))
        super().__init__(err.errno, reason, str(path))

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}; choose another place for it"


def blocking_file(path: Path) -> Path | None:
    """The file standing where ``path`` or one of the folders above it must be a folder, if any
    (``runs`` in ``runs/demo`` when ``runs`` is a file); None when every existing level is a folder."""
    for level in [path, *path.parents]:
        if level.exists():
            return None if level.is_dir() else level
    return None


@contextmanager
def creating(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError raised while creating ``path`` (or a temporary for it, or its parents) into an
    :class:`OutputPathError` naming ``path``."""
    try:
        yield
    except OutputPathError:
        raise
    except OSError as err:
        raise OutputPathError(path, err) from None


def hidden_sibling(path: Path, suffix: str) -> Path:
    """A unique dot-name next to ``path``; same directory, so a rename to ``path`` is atomic."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{suffix}")


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` with ``data`` so that readers never see a partial file."""
    path = Path(path)
    tmp = hidden_sibling(path, TMP_SUFFIX)
    with creating(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # os.open with 0o666 honours the umask, unlike mkstemp's 0o600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically write UTF-8 text (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON; serialisation happens first so a bad object writes nothing."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False) + "\n"
    return atomic_write_text(path, text)


def append_jsonl(path: str | os.PathLike[str], obj: Any) -> None:
    """Append one JSON line with a single write, flushed and fsynced.

    If a previous crash left a torn last line (no trailing newline), a newline is written first
    so the new row starts on its own line instead of being glued onto the broken one.
    """
    path = Path(path)
    line = json.dumps(obj, ensure_ascii=False) + "\n"
    with open(path, "ab") as f:
        if f.tell() > 0 and not _ends_with_newline(path):
            line = "\n" + line
        f.write(line.encode("utf-8"))
        f.flush()
        os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` before it is published by a rename."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def remove_tree(path: Path) -> None:
    """Delete a directory by first renaming it to a hidden name.

    A kill during ``rmtree`` could otherwise leave a half-deleted directory under its real name
    that still looks valid (say, a checkpoint whose marker survived but whose weights did not).
    """
    if not path.exists():
        return
    doomed = hidden_sibling(path, OLD_SUFFIX)
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def atomic_directory(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling directory that becomes ``final`` only if the block succeeds.

    If the block raises, the temporary directory is deleted and ``final`` (if any) is untouched.
    If ``final`` already exists it is renamed aside, the new one renamed in, then the old one
    deleted. Between those two renames ``final`` is briefly absent, but both complete versions
    still exist under hidden names, so nothing torn is ever visible under the real name.
    """
    final = Path(final)
    tmp = hidden_sibling(final, TMP_SUFFIX)
    with creating(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(tmp)
    try:
        yield tmp
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)


def _publish(tmp: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = hidden_sibling(final, OLD_SUFFIX)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
