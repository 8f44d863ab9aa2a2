"""llama.cpp on a CPU it cannot run on (issue 26, section 1): a library that traps with SIGILL the moment it
is loaded stands in for a wheel built for another CPU (or an AMX path a VM advertises but does not
execute). tunelab must answer with one line naming the signal and the fix, never die with the process;
and an old unkeyed wheel in the cache must not be reused."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from hostile import REPO, Case, Outcome, refused, tunelab

AREA = "llamacpp"
TRAP_C = "__attribute__((constructor)) static void trap(void) { __builtin_trap(); }\n"
LIBRARIES = ("libllama.so", "libggml.so", "libggml-base.so", "libggml-cpu.so", "libmtmd.so")


def _trap_env(scratch: Path) -> dict[str, str] | Outcome:
    """LLAMA_CPP_LIB_PATH at libraries that die of SIGILL when loaded, and a fresh TUNELAB_HOME."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return Outcome("ok", "no C compiler here: the trapping library cannot be built (case not run)")
    lib = scratch / "trap-lib"
    lib.mkdir()
    (scratch / "trap.c").write_text(TRAP_C)
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-o", str(lib / LIBRARIES[0]), str(scratch / "trap.c")], check=True
    )
    for name in LIBRARIES[1:]:
        shutil.copy(lib / LIBRARIES[0], lib / name)
    return {"LLAMA_CPP_LIB_PATH": str(lib), "TUNELAB_HOME": str(scratch / "home")}


# a valid safetensors file holding no tensors: an 8-byte header length, then the header "{}" padded
_EMPTY_SAFETENSORS = (8).to_bytes(8, "little") + b"{}      "


def export_gguf_with_a_trapping_library(scratch: Path) -> Outcome:
    env = _trap_env(scratch)
    if isinstance(env, Outcome):
        return env
    final = scratch / "run" / "final"
    final.mkdir(parents=True)
    meta = {"base_model": "tiny:llama", "artifact": "full", "method": "full", "model_kind": "causal_lm"}
    (final / "tunelab.json").write_text(json.dumps(meta))
    (final / "model.safetensors").write_bytes(_EMPTY_SAFETENSORS)  # a final/ the export accepts
    ran = tunelab(
        "export", str(scratch / "run"), "--gguf", "q4_k_m", "--no-verify", "--out", "g", cwd=scratch, env=env
    )
    outcome = refused(ran, mentions=("SIGILL (illegal instruction)", "make gguf"))
    return Outcome("loss", "wrote g/ before refusing") if (scratch / "g").exists() else outcome


def eval_gguf_with_a_trapping_library(scratch: Path) -> Outcome:
    env = _trap_env(scratch)
    if isinstance(env, Outcome):
        return env
    sys.path.insert(0, str(REPO / "src"))
    from tunelab.models.llamacpp_child import write_probe_gguf  # noqa: PLC0415

    model = write_probe_gguf(scratch / "model.gguf")
    (scratch / "data.jsonl").write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    ran = tunelab("eval", str(model), "--data", "data.jsonl", cwd=scratch, env=env)
    return refused(ran, mentions=("SIGILL (illegal instruction)", "make gguf"))


def unkeyed_cached_wheel_is_not_reused(scratch: Path) -> Outcome:
    """A wheel left directly in $TUNELAB_HOME/wheels by the old Makefile (built natively on some other CPU)."""
    wheels = scratch / "wheels"
    wheels.mkdir()
    old = wheels / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
    old.write_bytes(b"a native build from another machine")
    sdist = scratch / "llama_cpp_python-0.3.36.tar.gz"
    sdist.write_bytes(b"not really an sdist: the build fails fast")
    script = REPO / "src" / "tunelab" / "models" / "llamacpp_build.py"
    command = [sys.executable, str(script), "--sdist", str(sdist), "--wheels", str(wheels), "--install"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    said = done.stdout + done.stderr
    if str(old) in said or done.returncode == 0:
        return Outcome("silent", f"the unkeyed wheel was used (exit {done.returncode})")
    if "building llama-cpp-python 0.3.36 once for key 0.3.36-" not in said:
        return Outcome("silent", f"exit {done.returncode}: {said.strip()[-160:]}")
    return Outcome("ok", "ignored; built for its own key (and this fake sdist failed, exit 1)")


CASES = [
    Case(AREA, "export --gguf: llama.cpp traps (SIGILL)", export_gguf_with_a_trapping_library),
    Case(AREA, "eval MODEL.gguf: llama.cpp traps (SIGILL)", eval_gguf_with_a_trapping_library),
    Case(AREA, "old unkeyed wheel in the cache", unkeyed_cached_wheel_is_not_reused),
]
