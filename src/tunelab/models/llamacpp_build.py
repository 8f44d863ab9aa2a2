"""Build llama-cpp-python's wheel once per build key and cache it in ``$TUNELAB_HOME/wheels/<key>/``.

A wheel compiled for one CPU can die with SIGILL (illegal instruction) on another: ggml's default
``-march=native`` bakes in whatever the build machine advertises (AVX-512, AMX), and a VM may advertise
instructions it does not execute. So tunelab builds with portable flags (``GGML_NATIVE=OFF``: ggml's
x86-64-v3 baseline of SSE4.2, AVX, AVX2, BMI2, FMA and F16C; no AVX-512, no AMX) and keys the cached wheel
by everything the build depends on: the llama-cpp-python version and sdist sha256, the exact CMake
arguments, the compiler, the machine architecture, the Python tag and the CPU features those flags need
(for a native build, the whole CPU). A wheel whose key differs is never reused; wheels lying directly in
``$TUNELAB_HOME/wheels`` (the old unkeyed cache) are ignored.

Standard library only: ``make gguf`` runs this file by path (``python .../llamacpp_build.py``) so it needs
none of tunelab's dependencies. Whether the installed library then *runs* here is a separate question,
answered at run time by :mod:`tunelab.models.llamacpp_probe`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
# Portable x86-64-v3 build: no -march=native, no AVX-512, no AMX; one CPU backend linked in (no
# runtime-loaded variants, whose selection would depend on files beside the library).
PORTABLE_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "
    "-DGGML_CPU_ALL_VARIANTS=OFF -DGGML_BACKEND_DL=OFF"
)
# ggml's x86 instruction-set options, their default when GGML_NATIVE is off (ggml/CMakeLists.txt), and the
# /proc/cpuinfo flag a CPU must advertise to run code built with the option on.
X86_OPTIONS = {
    "GGML_SSE42": (True, "sse4_2"),
    "GGML_AVX": (True, "avx"),
    "GGML_AVX2": (True, "avx2"),
    "GGML_BMI2": (True, "bmi2"),
    "GGML_FMA": (True, "fma"),
    "GGML_F16C": (True, "f16c"),
    "GGML_AVX_VNNI": (False, "avx_vnni"),
    "GGML_AVX512": (False, "avx512f"),
    "GGML_AVX512_VBMI": (False, "avx512vbmi"),
    "GGML_AVX512_VNNI": (False, "avx512_vnni"),
    "GGML_AVX512_BF16": (False, "avx512_bf16"),
    "GGML_AMX_TILE": (False, "amx_tile"),
    "GGML_AMX_INT8": (False, "amx_int8"),
    "GGML_AMX_BF16": (False, "amx_bf16"),
}
X86_MACHINES = ("x86_64", "amd64", "i686", "i386")
BUILD_RECORD = "build.json"
WHEEL_PREFIX = "llama_cpp_python-"


class BuildRefused(ValueError):
    """This machine cannot run what the requested flags build; the message says why and what to change."""


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, frozenset[str] | None]:
    """The CPU's model name and the instruction-set flags it advertises (None where there is no
    /proc/cpuinfo to read, e.g. macOS)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine(), None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    name = fields.get("model name") or fields.get("Hardware") or fields.get("CPU part") or platform.machine()
    flags = fields.get("flags") or fields.get("Features") or ""
    return name, frozenset(flags.split())


def cmake_options(cmake_args: str) -> dict[str, bool]:
    """``-DNAME=ON/OFF`` switches in ``cmake_args`` (the last one of a name wins, as in CMake)."""
    options = {}
    for arg in shlex.split(cmake_args):
        if arg.startswith("-D") and "=" in arg:
            name, value = arg[2:].split("=", 1)
            options[name.split(":")[0]] = value.upper() in ("ON", "1", "TRUE", "YES", "Y")
    return options


def is_native(cmake_args: str) -> bool:
    """ggml's GGML_NATIVE defaults to ON (-march=native); anything but an explicit OFF is native."""
    return cmake_options(cmake_args).get("GGML_NATIVE", True) or "march=native" in cmake_args


def needed_features(cmake_args: str, machine: str | None = None) -> list[str]:
    """The /proc/cpuinfo flags a CPU needs to run what ``cmake_args`` builds (portable builds only)."""
    if (machine or platform.machine()).lower() not in X86_MACHINES:
        return []
    options = cmake_options(cmake_args)
    return sorted(flag for option, (default, flag) in X86_OPTIONS.items() if options.get(option, default))


def _compiler() -> str:
    """First line of ``$CXX --version`` (CMake's default C++ compiler is ``c++``)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or "c++"
    try:
        done = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return f"{compiler} (not runnable)"
    return (done.stdout.strip().splitlines() or [compiler])[0]


def build_facts(sdist_sha256: str, cmake_args: str, version: str = LLAMA_CPP_VERSION) -> dict[str, object]:
    """Everything the wheel depends on; its hash is the cache key."""
    machine = platform.machine().lower()
    facts: dict[str, object] = {
        "llama_cpp_python": version,
        "sdist_sha256": sdist_sha256,
        "cmake_args": " ".join(shlex.split(cmake_args)),
        "compiler": _compiler(),
        "compiler_flags": {
            k: os.environ[k] for k in ("CC", "CXX", "CFLAGS", "CXXFLAGS") if os.environ.get(k)
        },
        "machine": machine,
        "python": f"cp{sys.version_info.major}{sys.version_info.minor}",
        "cpu_features_needed": needed_features(cmake_args, machine),
    }
    if is_native(cmake_args):  # a native build runs only on the CPU it was built on
        name, flags = cpu_info()
        facts["native_cpu"] = {"model": name, "flags": sorted(flags or [])}
    return facts


def build_key(facts: dict[str, object]) -> str:
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return f"{facts['llama_cpp_python']}-{facts['python']}-{facts['machine']}-{digest}"


def check_cpu(facts: dict[str, object]) -> None:
    """Refuse (one line) when this CPU lacks a feature the flags compile in."""
    name, flags = cpu_info()
    needed = list(facts["cpu_features_needed"])  # type: ignore[call-overload]
    missing = [flag for flag in needed if flags is not None and flag not in flags]
    if missing:
        off = " ".join(f"-D{opt}=OFF" for opt, (_, flag) in X86_OPTIONS.items() if flag in missing)
        raise BuildRefused(
            f"llama.cpp build: this CPU ({name}) lacks {', '.join(missing)}, which the flags "
            f"{facts['cmake_args']!r} compile in; add {off} to LLAMA_CMAKE_ARGS and run `make gguf` again"
        )


def cached_wheel(wheels: Path, key: str) -> Path | None:
    """The wheel built for ``key``, if a finished build left one (its build.json is written last)."""
    folder = wheels / key
    found = sorted(folder.glob(f"{WHEEL_PREFIX}*.whl")) if (folder / BUILD_RECORD).is_file() else []
    return found[0] if found else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_wheel(sdist: Path, wheels: Path, cmake_args: str) -> Path:
    """The cached wheel for these flags, building it first if this key has none."""
    version = sdist.name.removeprefix(WHEEL_PREFIX).removesuffix(".tar.gz")
    facts = build_facts(sha256_of(sdist), cmake_args, version)
    check_cpu(facts)
    key = build_key(facts)
    found = cached_wheel(wheels, key)
    if found is not None:
        return found
    wheels.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=wheels))
    try:
        print(
            f"building llama-cpp-python {facts['llama_cpp_python']} once for key {key} (~15 min)", flush=True
        )
        start = time.monotonic()
        env = dict(os.environ, CMAKE_ARGS=cmake_args, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
        # --no-cache-dir: pip's wheel cache is keyed by the sdist's path alone, so it would hand back a
        # wheel built earlier with other CMAKE_ARGS
        command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-cache-dir", "--no-deps", str(sdist)]
        command += ["-w", str(staging)]
        subprocess.run(command, env=env, check=True)
        record = {**facts, "key": key, "seconds": round(time.monotonic() - start), "built": time.ctime()}
        write_record(staging, record)
        target = wheels / key
        if target.exists():  # an unfinished folder from an interrupted build (no build.json): replace it
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"built in {record['seconds']} s", flush=True)
    built = cached_wheel(wheels, key)
    assert built is not None  # pip wheel succeeded, so the folder holds its wheel and our record
    return built


def write_record(folder: Path, record: dict[str, object]) -> None:
    """build.json beside the wheel: what it was built with and for (written last: it marks the build done)."""
    (folder / BUILD_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def installed_from() -> str | None:
    """The wheel file the installed llama-cpp-python came from (pip's direct_url.json), if known."""
    from importlib import metadata  # noqa: PLC0415  (only the install step needs it)

    try:
        raw = metadata.distribution("llama_cpp_python").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    return json.loads(raw).get("url") if raw else None


def install(wheel: Path) -> None:
    """Install ``wheel`` unless it is the one installed already (same version or not: another build of the
    same version is a different library)."""
    if installed_from() == wheel.resolve().as_uri():
        return
    command = [sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)]
    subprocess.run(command, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, required=True, help="llama-cpp-python's sdist")
    parser.add_argument("--wheels", type=Path, required=True, help="the cache: $TUNELAB_HOME/wheels")
    parser.add_argument("--cmake-args", default=PORTABLE_CMAKE_ARGS, help="CMake arguments of the build")
    parser.add_argument("--install", action="store_true", help="also install the wheel into this Python")
    args = parser.parse_args(argv)
    try:
        wheel = build_wheel(args.sdist, args.wheels, args.cmake_args)
    except BuildRefused as err:
        print(err, file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:
        print(f"llama.cpp build failed (exit {err.returncode}); its output is above", file=sys.stderr)
        return 1
    if args.install:
        install(wheel)
    print(f"llama-cpp-python wheel: {wheel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
