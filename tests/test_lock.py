"""requirements/lock.txt, what `make setup` installs: every dependency pyproject.toml names is pinned
there to one exact version inside pyproject's range (the package keeps ranges for users)."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("dev", "gguf", "qlora", "rl", "track", "kernels")


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, line in enumerate((ROOT / "requirements/lock.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and not req.extras and not req.marker, f"line {number}: {line}"
        assert req.name not in pins, f"line {number}: {req.name} pinned twice"
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def _named() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = project["dependencies"] + [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]
    return [Requirement(line) for line in lines]


def test_every_dependency_is_pinned_inside_its_range():
    pins = _lock()
    for req in _named():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} ({req}) is not in requirements/lock.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements/lock.txt pins {req.name}=={pins[name]}, outside pyproject's {req}: run `make lock`"
        )


def test_torch_pin_fits_cpu_and_cuda_builds():
    """``torch==2.13.0`` is met by ``2.13.0+cpu`` and the CUDA wheel alike; a local label would pin one."""
    torch = _lock()["torch"]
    assert torch.local is None
    assert Requirement(f"torch=={torch}").specifier.contains(f"{torch}+cpu")
