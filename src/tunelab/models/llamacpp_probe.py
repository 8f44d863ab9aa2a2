"""Does the installed llama.cpp run on this CPU? Asked in a child process, once per library build and CPU.

A llama.cpp library that uses an instruction the CPU does not execute dies with SIGILL and takes the whole
process with it (a test session, an export after a long merge). Before tunelab first loads a model with
llama.cpp it runs :mod:`tunelab.models.llamacpp_child` in a child: default model params first (extra buffer
types on: CPU weight repacking, AMX), and, if that child fails, again with ``use_extra_bufts`` off. tunelab
then opens every model the way a child proved works, or refuses with one line naming the signal, the CPU
and the fix. The verdict is kept in ``$TUNELAB_HOME/llama.cpp/probe/<key>.json``, keyed by the library
files (path, size, mtime), the CPU (model and flags) and the probe's own code, so a rebuilt wheel, another
CPU or a changed probe asks again; crashes by a signal are cached, timeouts and other failures are not.

    python -m tunelab.models.llamacpp_probe    # print the verdict (what `make gguf` runs last)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunelab.assets import tunelab_home
from tunelab.models import llamacpp_child
from tunelab.models.llamacpp_build import cpu_info

PROBE_VERSION = 1
CHILD = Path(llamacpp_child.__file__)
TIMEOUT_S = 300
# Deaths that say the library cannot run here (cached); anything else (SIGKILL from the OOM killer,
# a timeout, an ImportError) may pass, so it is reported but asked again next time.
FAULTS = {
    signal.SIGILL: "illegal instruction",
    signal.SIGSEGV: "segmentation fault",
    signal.SIGBUS: "bus error",
    signal.SIGFPE: "arithmetic fault",
    signal.SIGABRT: "abort",
}
# Run a file as __main__ without putting its folder on sys.path, with core dumps off (a probe that traps
# must not leave a core file behind).
_BOOT = (
    "import runpy, sys\n"
    "try:\n    import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    "except (ImportError, ValueError, OSError):\n    pass\n"
    "sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
)
# other instruction sets a CPU may advertise, named in a refusal because a VM may not execute them
_NOTABLE_FLAGS = ("avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16")


class LlamaCppUnusableError(ValueError):
    """llama.cpp is installed but dies on this machine; the message is one line with the signal, CPU and fix."""


@dataclass(frozen=True)
class Verdict:
    usable: bool
    extra_bufts: bool  # whether models may use llama.cpp's extra buffer types (weight repacking, AMX)
    cpu: str
    key: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""  # the refusal line when not usable
    path: str = ""  # where the verdict is cached


_VERDICTS: dict[str, Verdict] = {}  # this process's verdicts, whatever their fate on disk


def library_files() -> list[Path]:
    """The files that make up the installed llama.cpp: the bindings and the shared libraries they load
    (``$LLAMA_CPP_LIB_PATH`` when set, as llama_cpp itself does)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return []
    package = Path(next(iter(spec.submodule_search_locations)))
    lib = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or package / "lib")
    libraries = [
        p
        for p in lib.glob("*")
        if p.is_file() and (p.suffix in (".so", ".dylib", ".dll") or ".so." in p.name)
    ]
    return sorted([package / "__init__.py", package / "llama_cpp.py", *libraries])


def probe_facts(child: Path) -> dict[str, Any]:
    """What the verdict depends on."""
    name, flags = cpu_info()
    files = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in library_files() if p.is_file()]
    return {
        "probe_version": PROBE_VERSION,
        "probe_code": hashlib.sha256(child.read_bytes()).hexdigest(),
        "python": sys.executable,
        "library": files,
        "cpu": name,
        "cpu_flags": hashlib.sha256(" ".join(sorted(flags or [])).encode()).hexdigest(),
    }


def _key(facts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:20]


def run_child(child: Path, mode: str, workdir: Path, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """One probe child: ``{"ok": bool, "mode": ..., "signal": name or None, "detail": ...}``."""
    command = [sys.executable, "-c", _BOOT, str(child), mode, str(workdir)]
    try:
        done = subprocess.run(
            command, cwd=workdir, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        return {
            "ok": False,
            "mode": mode,
            "signal": None,
            "cacheable": False,
            "detail": f"no answer in {timeout:g} s",
        }
    if done.returncode < 0:
        name, words = _signal_name(-done.returncode), FAULTS.get(-done.returncode)
        detail = f"{name} ({words})" if words else name
        return {"ok": False, "mode": mode, "signal": name, "cacheable": words is not None, "detail": detail}
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    if done.returncode == 0 and lines:
        try:
            return {"ok": True, "mode": mode, "signal": None, "cacheable": True, **json.loads(lines[0])}
        except ValueError:
            pass
    last = lines[-1][:200] if lines else "no output"
    return {
        "ok": False,
        "mode": mode,
        "signal": None,
        "cacheable": False,
        "detail": f"exit {done.returncode}: {last}",
    }


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _refusal(cpu: str, runs: list[dict[str, Any]], path: Path) -> str:
    _, flags = cpu_info()
    notable = [flag for flag in _NOTABLE_FLAGS if flags and flag in flags]
    advertised = f", advertising {' '.join(notable)}" if notable else ""
    how = " and ".join(dict.fromkeys(run["detail"] for run in runs))
    if all(run["cacheable"] for run in runs):  # every child died of a CPU or program fault
        return (
            f"llama.cpp cannot run on this CPU ({cpu}{advertised}): its probe died with {how}, with "
            f"llama.cpp's extra buffer types and without; rebuild it with portable flags (`make gguf`) and, "
            f"if it still dies, report it with {path}"
        )
    return (
        f"llama.cpp could not be checked on this machine ({cpu}{advertised}): its probe failed with {how}; "
        f"run `make gguf` again, and `python -m tunelab.models.llamacpp_probe` to retry"
    )


def probe(child: Path | None = None) -> Verdict:
    """Run the children (cached verdict first); never raises for a crash, it describes it. ``child``: the
    file the children run (default :mod:`tunelab.models.llamacpp_child`)."""
    child = child or CHILD
    facts = probe_facts(child)
    key = _key(facts)
    if key in _VERDICTS:
        return _VERDICTS[key]
    path = tunelab_home() / "llama.cpp" / "probe" / f"{key}.json"
    cached = _read(path, key)
    if cached is not None:
        _VERDICTS[key] = cached
        return cached
    with tempfile.TemporaryDirectory(prefix="tunelab-llamacpp-probe-") as scratch:
        runs = [run_child(child, "extra", Path(scratch))]
        if not runs[0]["ok"]:
            runs.append(run_child(child, "plain", Path(scratch)))
    usable = runs[-1]["ok"]
    verdict = Verdict(
        usable=usable,
        extra_bufts=runs[0]["ok"],
        cpu=facts["cpu"],
        key=key,
        runs=runs,
        message="" if usable else _refusal(facts["cpu"], runs, path),
        path=str(path),
    )
    if all(run["cacheable"] for run in runs):
        _write(path, verdict, facts)
    _VERDICTS[key] = verdict
    return verdict


def _read(path: Path, key: str) -> Verdict | None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Verdict(**{k: raw[k] for k in Verdict.__dataclass_fields__}) if raw.get("key") == key else None
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or unreadable: ask again


def _write(path: Path, verdict: Verdict, facts: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**asdict(verdict), "facts": facts}, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def usable_llama_cpp(child: Path | None = None) -> Verdict:
    """The verdict when llama.cpp runs here; :class:`LlamaCppUnusableError` (one line) when it does not."""
    verdict = probe(child)
    if not verdict.usable:
        raise LlamaCppUnusableError(verdict.message)
    return verdict


def describe(verdict: Verdict) -> str:
    """One line for `make gguf`: whether llama.cpp runs here, and how."""
    if not verdict.usable:
        return verdict.message
    bufts = "on" if verdict.extra_bufts else "off (they crashed the probe: " + verdict.runs[0]["detail"] + ")"
    return (
        f"llama.cpp runs on this CPU ({verdict.cpu}); extra buffer types {bufts}; verdict in {verdict.path}"
    )


def main() -> int:
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp probe: llama_cpp is not installed in this Python", file=sys.stderr)
        return 2
    verdict = probe()
    print(describe(verdict), file=sys.stdout if verdict.usable else sys.stderr)
    return 0 if verdict.usable else 3


if __name__ == "__main__":
    sys.exit(main())
