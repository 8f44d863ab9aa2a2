"""The run manifest: everything needed to tell later how a run was produced.

A result is only worth as much as our ability to reproduce it, so the manifest pins the
library versions, the code revision, the exact bytes of the data (sha256), the seed and the
hardware. Every probe here is best-effort: a missing package or a machine without git yields
``null``, never an exception, because a run must not fail for want of provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from tunelab.runs.atomic import atomic_write_json

MANIFEST_SCHEMA_VERSION = 1
TRACKED_PACKAGES = ("tunelab", "torch", "transformers", "peft", "accelerate", "datasets", "safetensors")
_CHUNK = 1 << 20


def utc_now() -> str:
    """ISO-8601 UTC timestamp with seconds precision; sortable and timezone-unambiguous."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file, streamed so multi-GB data files do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _tree_sha256(root: Path) -> str:
    """One digest for a directory (e.g. a saved HF dataset): relative paths and file hashes, sorted."""
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(root).as_posix()}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


def describe_data_file(path: Path) -> dict[str, Any]:
    """Path, size and sha256 of a data file or directory, so a run can prove which data it saw."""
    path = Path(path)
    if path.is_dir():
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return {"path": str(path.resolve()), "kind": "dir", "size": size, "sha256": _tree_sha256(path)}
    return {
        "path": str(path.resolve()),
        "kind": "file",
        "size": path.stat().st_size,
        "sha256": file_sha256(path),
    }


def package_versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str | None]:
    """Installed versions via importlib.metadata (no imports, so this stays fast); missing -> None."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_info(cwd: Path | None = None) -> dict[str, Any] | None:
    """Commit sha and dirty flag of the repo containing ``cwd``; None outside git or without git."""
    cwd = Path.cwd() if cwd is None else cwd
    sha = _git(["rev-parse", "HEAD"], cwd)
    if not sha:
        return None
    status = _git(["status", "--porcelain", "--untracked-files=no"], cwd)
    return {"sha": sha, "dirty": None if status is None else bool(status)}


def _total_ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _accelerators() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"cuda_device_count": 0, "cuda_devices": [], "mps": False}
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = getattr(torch.backends, "mps", None)
    return {
        "cuda_device_count": count,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(count)],
        "cuda_version": torch.version.cuda,
        "mps": bool(mps is not None and mps.is_available()),
    }


def hardware_info() -> dict[str, Any]:
    """Platform, CPU count, RAM and accelerators: the facts that explain speed and numeric drift."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "ram_bytes": _total_ram_bytes(),
        **_accelerators(),
    }


def recipe_sha256(recipe: dict[str, Any]) -> str:
    """Digest of the recipe in canonical JSON, so two runs can be compared for identical settings."""
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def build_manifest(
    *, recipe: dict[str, Any], data_files: list[Path], seed: int, run_name: str
) -> dict[str, Any]:
    """Assemble the manifest written at the start of a run (status ``running``)."""
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "run_name": run_name,
        "status": "running",
        "started_at": utc_now(),
        "ended_at": None,
        "seed": seed,
        "recipe_sha256": recipe_sha256(recipe),
        "data": [describe_data_file(Path(p)) for p in data_files],
        "versions": package_versions(),
        "git": git_info(),
        "hardware": hardware_info(),
        "argv": list(sys.argv),
    }


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a manifest; unknown fields are kept as-is (tolerant with saved artefacts)."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def update_manifest(path: str | os.PathLike[str], **fields: Any) -> dict[str, Any]:
    """Read-modify-write a manifest atomically and return the new content."""
    manifest = read_manifest(path)
    manifest.update(fields)
    atomic_write_json(path, manifest)
    return manifest
