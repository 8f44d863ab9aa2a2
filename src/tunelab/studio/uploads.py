"""Files uploaded on the Data page, stored in ``RUNS/uploads/`` (never over an existing file).

The browser sends the file as the raw request body (``PUT /data/upload?name=FILE``, ``Content-Type: application/octet-stream``), so no multipart
parser is needed and the body is streamed to disk, never held whole in memory.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

from tunelab.data.loaders import SUFFIXES

UPLOAD_TYPE = "application/octet-stream"  # the only body type the upload takes (415 otherwise)
MAX_BYTES = 2 * 1024**3  # an upload is a convenience; larger files are given by path


class UploadError(ValueError):
    """An upload refused: the message says why and what to do."""


def upload_target(runs_dir: Path, name: str) -> Path:
    """Where ``name`` is stored: its base name made safe, numbered when taken (``a-2.jsonl``)."""
    base = Path(name.replace("\\", "/")).name
    stem, suffix = Path(base).stem, Path(base).suffix.lower()
    if suffix not in SUFFIXES:
        raise UploadError(
            f"{base or name!r}: upload a data file ({', '.join(SUFFIXES)}); give other data by path"
        )
    stem = "".join(c if c.isalnum() or c in "-_." else "-" for c in stem).strip(".-") or "upload"
    folder = runs_dir / "uploads"
    path, k = folder / f"{stem}{suffix}", 1
    while path.exists():
        k += 1
        path = folder / f"{stem}-{k}{suffix}"
    return path


async def store(runs_dir: Path, name: str, chunks: AsyncIterator[bytes]) -> Path:
    """Stream the body into ``RUNS/uploads/``; a hidden partial file is renamed into place at the end."""
    path = upload_target(runs_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    size = 0
    try:
        with open(partial, "xb") as f:
            async for chunk in chunks:
                size += len(chunk)
                if size > MAX_BYTES:
                    raise UploadError(
                        f"{name}: over {MAX_BYTES // 1024**3} GiB; give a file this large by its path"
                    )
                f.write(chunk)
        if size == 0:
            raise UploadError(f"{name}: the file is empty; nothing to audit")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
