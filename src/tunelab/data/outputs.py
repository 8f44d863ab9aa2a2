"""Where `data clean` and `data split` write: checked before any work, written atomically.

Nothing is lost: an output that is (or resolves to, through symlinks, hard links or relative
paths) an input is refused even with ``overwrite``; an existing output is replaced only with
``overwrite``; two outputs may not be the same file. Files are written to a fresh hidden temporary
name in the same directory and renamed into place; the temporary file is removed on failure.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tunelab.data.loaders import DataError
from tunelab.runs.atomic import OutputPathError

__all__ = ["check_outputs", "check_output_dir", "atomic_open"]


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_outputs(
    inputs: Sequence[str | os.PathLike], outputs: Sequence[str | os.PathLike], *, overwrite: bool
) -> None:
    """Raise :class:`DataError` naming the output (and the fix) unless every output may be written."""
    seen: list[Path] = []
    for out in map(Path, outputs):
        for inp in map(Path, inputs):
            if _same(out, inp):
                raise DataError(out, 0, "", "is the input file; write the output to another path")
        if out.is_dir():
            raise DataError(out, 0, "", "is a directory; give a file path to write")
        if out.exists() and not overwrite:
            raise DataError(out, 0, "", "already exists; pass --overwrite to replace it")
        if any(_same(out, s) for s in seen):
            raise DataError(out, 0, "", "is given for two outputs; give each output its own path")
        seen.append(out)


def check_output_dir(out_dir: str | os.PathLike) -> None:
    """An output directory must be a directory (or not exist yet)."""
    p = Path(out_dir)
    if p.exists() and not p.is_dir():
        raise DataError(p, 0, "", "is a file, not a directory; give a directory to write the splits to")


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Write ``path`` through a new hidden temporary file beside it, renamed into place on success
    and removed on failure. The temporary name is fresh (exclusive create), so no file of the
    user's, an input included, can ever be the one written."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode as umask allows
            break
        except FileExistsError:
            continue
        except OSError as err:  # named as the user wrote it, not as the temporary beside it
            raise OutputPathError(path, err) from None
    try:
        with open(fd, "w", encoding="utf-8") as fh:
            yield fh
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
