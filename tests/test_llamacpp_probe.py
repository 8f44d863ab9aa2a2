"""llama.cpp that cannot trap the caller: the wheel cache keyed by what the build depends on, the child-process
probe that catches a CPU trap (SIGILL) and reports it as one line, the fallback without extra buffer types,
and the cached verdict."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from llamacpp_gate import usable_llama_cpp
from tunelab.models import llamacpp, llamacpp_build, llamacpp_child, llamacpp_probe

CHILD = """
import json, os, signal, sys
mode, workdir = sys.argv[1:]
with open(os.environ["PROBE_LOG"], "a") as log:
    log.write(mode + "\\n")
if mode in os.environ.get("PROBE_TRAP", "").split(","):
    os.kill(os.getpid(), signal.SIGILL)
if mode in os.environ.get("PROBE_FAIL", "").split(","):
    sys.exit("ImportError: no module named gguf")
print(json.dumps({"extra_bufts": mode == "extra", "prompt_tokens": 40, "generated_tokens": 4}))
"""
# a library that traps as soon as it is loaded: what a wheel built for another CPU does
TRAP_C = "__attribute__((constructor)) static void trap(void) { __builtin_trap(); }\n"


@pytest.fixture
def probe_env(tmp_path, monkeypatch):
    """An injected child (behaviour set by PROBE_TRAP / PROBE_FAIL), a fake library file, a fresh home."""
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    library = tmp_path / "libllama.so"
    library.write_bytes(b"v1")
    log = tmp_path / "runs.log"
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PROBE_LOG", str(log))
    monkeypatch.setattr(llamacpp_probe, "library_files", lambda: [library])
    monkeypatch.setattr(llamacpp_probe, "_VERDICTS", {})
    return child, library, log


def _runs(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


# --- the wheel cache ------------------------------------------------------------------------------


def _key(
    cmake_args: str = llamacpp_build.PORTABLE_CMAKE_ARGS, version: str = "0.3.36", sha: str = "a"
) -> str:
    return llamacpp_build.build_key(llamacpp_build.build_facts(sha, cmake_args, version))


def test_build_key_changes_with_flags_version_sdist_and_needed_features(monkeypatch):
    monkeypatch.setattr(llamacpp_build.platform, "machine", lambda: "x86_64")
    portable = _key()
    assert portable.startswith("0.3.36-cp") and "-x86_64-" in portable
    assert _key(version="0.3.37") != portable
    assert _key(sha="b") != portable
    assert _key(llamacpp_build.PORTABLE_CMAKE_ARGS + " -DGGML_OPENMP=OFF") != portable
    with_avx512 = llamacpp_build.PORTABLE_CMAKE_ARGS + " -DGGML_AVX512=ON"
    assert _key(with_avx512) != portable
    assert "avx512f" in llamacpp_build.needed_features(with_avx512)
    assert llamacpp_build.needed_features(llamacpp_build.PORTABLE_CMAKE_ARGS) == [
        "avx",
        "avx2",
        "bmi2",
        "f16c",
        "fma",
        "sse4_2",
    ]
    monkeypatch.setenv("CXXFLAGS", "-march=native")
    assert _key() != portable


def test_a_portable_wheel_is_shared_across_cpus_a_native_one_is_not(monkeypatch):
    monkeypatch.setattr(llamacpp_build.platform, "machine", lambda: "x86_64")
    epyc = ("AMD EPYC", frozenset({"avx", "avx2", "bmi2", "f16c", "fma", "sse4_2"}))
    xeon = ("Intel Xeon", epyc[1] | {"avx512f", "amx_tile", "amx_int8"})
    native = "-DGGML_NATIVE=ON"
    keys = {}
    for cpu in (epyc, xeon):
        monkeypatch.setattr(llamacpp_build, "cpu_info", lambda cpu=cpu: cpu)
        keys[cpu[0]] = (_key(), _key(native))
    assert keys["AMD EPYC"][0] == keys["Intel Xeon"][0]
    assert keys["AMD EPYC"][1] != keys["Intel Xeon"][1]
    assert llamacpp_build.is_native("") and llamacpp_build.is_native(native)
    assert not llamacpp_build.is_native(llamacpp_build.PORTABLE_CMAKE_ARGS)


def test_build_refuses_in_one_line_on_a_cpu_without_avx2(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(llamacpp_build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(llamacpp_build, "cpu_info", lambda: ("Old Atom", frozenset({"sse4_2", "avx"})))
    monkeypatch.setattr(llamacpp_build.subprocess, "run", _no_build)
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    sdist.write_bytes(b"sdist")
    code = llamacpp_build.main(["--sdist", str(sdist), "--wheels", str(tmp_path / "wheels")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "Old Atom" in err[0] and "avx2" in err[0] and "-DGGML_AVX2=OFF" in err[0]
    assert not (tmp_path / "wheels").exists()


def _no_build(command, *args, **kwargs):
    if "--version" in command:  # the compiler's name, for the key
        return subprocess.CompletedProcess(command, 0, "c++ (test) 1.0\n", "")
    raise AssertionError(f"nothing may be built or installed here: {command}")


def test_the_keyed_wheel_is_reused_and_an_unkeyed_one_never(tmp_path, monkeypatch):
    monkeypatch.setattr(llamacpp_build.subprocess, "run", _no_build)
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    sdist.write_bytes(b"sdist")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl").write_bytes(b"old native build")
    with pytest.raises(AssertionError, match="pip"):  # the old unkeyed wheel does not count: it builds
        llamacpp_build.build_wheel(sdist, wheels, llamacpp_build.PORTABLE_CMAKE_ARGS)
    facts = llamacpp_build.build_facts(llamacpp_build.sha256_of(sdist), llamacpp_build.PORTABLE_CMAKE_ARGS)
    folder = wheels / llamacpp_build.build_key(facts)
    folder.mkdir()
    wheel = folder / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"portable build")
    with pytest.raises(AssertionError, match="pip"):  # no build.json: an interrupted build, not a wheel
        llamacpp_build.build_wheel(sdist, wheels, llamacpp_build.PORTABLE_CMAKE_ARGS)
    llamacpp_build.write_record(folder, facts)
    assert llamacpp_build.build_wheel(sdist, wheels, llamacpp_build.PORTABLE_CMAKE_ARGS) == wheel


def test_a_build_runs_pip_with_the_flags_and_without_its_wheel_cache(tmp_path, monkeypatch):
    sdist = tmp_path / "llama_cpp_python-0.3.36.tar.gz"
    sdist.write_bytes(b"sdist")
    ran = []

    def pip_wheel(command, *args, env=None, **kwargs):
        if "--version" in command:
            return subprocess.CompletedProcess(command, 0, "c++ (test) 1.0\n", "")
        ran.append((command, env["CMAKE_ARGS"]))
        out = Path(command[command.index("-w") + 1])
        (out / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl").write_bytes(b"built")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(llamacpp_build.subprocess, "run", pip_wheel)
    args = llamacpp_build.PORTABLE_CMAKE_ARGS
    wheel = llamacpp_build.build_wheel(sdist, tmp_path / "wheels", args)
    [(command, cmake_args)] = ran
    assert "--no-cache-dir" in command and cmake_args == args
    record = json.loads((wheel.parent / "build.json").read_text())
    assert record["key"] == wheel.parent.name and record["cmake_args"] == args
    assert record["cpu_features_needed"] == llamacpp_build.needed_features(args)
    assert llamacpp_build.build_wheel(sdist, tmp_path / "wheels", args) == wheel and len(ran) == 1
    assert [p.name for p in (tmp_path / "wheels").iterdir()] == [wheel.parent.name]  # no staging left


# --- the probe ------------------------------------------------------------------------------------


def test_a_child_that_dies_of_sigill_is_one_refusal_line_and_the_parent_lives(probe_env, monkeypatch):
    child, _, log = probe_env
    monkeypatch.setenv("PROBE_TRAP", "extra,plain")
    verdict = llamacpp_probe.probe(child)
    assert not verdict.usable and _runs(log) == ["extra", "plain"]
    assert [run["signal"] for run in verdict.runs] == ["SIGILL", "SIGILL"]
    message = verdict.message
    assert "\n" not in message and message.startswith("llama.cpp cannot run on this CPU (")
    assert "SIGILL (illegal instruction)" in message and "`make gguf`" in message and verdict.path in message
    with pytest.raises(llamacpp_probe.LlamaCppUnusableError, match="SIGILL") as raised:
        llamacpp_probe.usable_llama_cpp(child)
    assert isinstance(raised.value, ValueError)  # the CLI prints a ValueError as one line, exit 2


def test_only_the_extra_buffer_types_trap_so_models_open_without_them(probe_env, monkeypatch):
    child, _, log = probe_env
    monkeypatch.setenv("PROBE_TRAP", "extra")
    verdict = llamacpp_probe.usable_llama_cpp(child)
    assert verdict.usable and not verdict.extra_bufts and _runs(log) == ["extra", "plain"]
    assert verdict.runs[0]["signal"] == "SIGILL" and verdict.runs[1]["ok"]
    assert "extra buffer types off (they crashed the probe: SIGILL" in llamacpp_probe.describe(verdict)


def test_the_verdict_is_cached_and_asked_again_when_the_library_changes(probe_env, monkeypatch):
    child, library, log = probe_env
    first = llamacpp_probe.probe(child)
    assert first.usable and first.extra_bufts and _runs(log) == ["extra"]
    assert json.loads(Path(first.path).read_text())["key"] == first.key
    monkeypatch.setattr(llamacpp_probe, "_VERDICTS", {})  # a new process: only the file remains
    assert llamacpp_probe.probe(child) == first and _runs(log) == ["extra"]
    library.write_bytes(b"rebuilt")
    monkeypatch.setenv("PROBE_TRAP", "extra")
    again = llamacpp_probe.probe(child)
    assert again.key != first.key and not again.extra_bufts and _runs(log) == ["extra", "extra", "plain"]


def test_a_failure_that_is_not_a_cpu_fault_is_reported_but_not_cached(probe_env, monkeypatch):
    child, _, log = probe_env
    monkeypatch.setenv("PROBE_FAIL", "extra,plain")
    verdict = llamacpp_probe.probe(child)
    assert not verdict.usable and "exit 1: ImportError: no module named gguf" in verdict.message
    assert verdict.message.startswith("llama.cpp could not be checked") and "\n" not in verdict.message
    assert not Path(verdict.path).exists()
    monkeypatch.setattr(llamacpp_probe, "_VERDICTS", {})
    monkeypatch.delenv("PROBE_FAIL")
    assert llamacpp_probe.probe(child).usable and _runs(log) == ["extra", "plain", "extra"]


def test_without_extra_buffer_types_the_model_params_say_so_and_are_restored():
    class Params:
        use_extra_bufts = True

    class Low:
        @staticmethod
        def llama_model_default_params():
            return Params()

    module = type("llama_cpp", (), {"llama_cpp": Low})
    original = Low.llama_model_default_params
    with llamacpp_child.model_params_without_extra_bufts(module):
        assert Low.llama_model_default_params().use_extra_bufts is False
    assert Low.llama_model_default_params is original and original().use_extra_bufts is True


# --- with the real llama.cpp ------------------------------------------------------------------------


def _llama_cpp_installed() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed; run `make gguf`")


def test_the_real_probe_passes_on_this_machine(tmp_path, monkeypatch):
    _llama_cpp_installed()
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    monkeypatch.setattr(llamacpp_probe, "_VERDICTS", {})
    verdict = llamacpp_probe.probe()
    assert verdict.usable, verdict.message
    ran = verdict.runs[-1]
    assert ran["prompt_tokens"] == llamacpp_child.PROMPT_TOKENS
    assert ran["generated_tokens"] == llamacpp_child.GENERATED_TOKENS


def test_a_model_opens_without_extra_buffer_types_when_the_probe_says_so(tmp_path, monkeypatch):
    usable_llama_cpp()  # skips (with the probe's line) where llama.cpp cannot run in this process
    path = llamacpp_child.write_probe_gguf(tmp_path / "probe.gguf")
    without = dataclasses.replace(llamacpp_probe.usable_llama_cpp(), extra_bufts=False)
    monkeypatch.setattr(llamacpp, "usable_llama_cpp", lambda: without)
    default = sys.modules["llama_cpp"].llama_cpp.llama_model_default_params
    for extra_bufts, llama in (
        (False, llamacpp.open_llama(path, n_ctx=64, verbose=False)),
        (True, llamacpp_child.open_llama(path, extra_bufts=True, n_ctx=64, verbose=False)),
    ):
        try:
            assert llama.model_params.use_extra_bufts is extra_bufts
            llama.eval([1, 5, 9])
            assert llamacpp_child.last_logits(llama).shape == (llamacpp_child.N_VOCAB,)
        finally:
            llama.close()
    assert sys.modules["llama_cpp"].llama_cpp.llama_model_default_params is default


def _trapping_library(tmp_path: Path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a library that traps")
    lib = tmp_path / "trap-lib"
    lib.mkdir()
    source = tmp_path / "trap.c"
    source.write_text(TRAP_C)
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(lib / "libllama.so"), str(source)], check=True)
    for name in ("libggml.so", "libggml-base.so", "libggml-cpu.so"):
        shutil.copy(lib / "libllama.so", lib / name)
    return lib


@pytest.mark.skipif(sys.platform != "linux", reason="a constructor that traps: Linux")
def test_export_with_a_library_that_traps_is_one_line_not_a_dead_process(tmp_path, monkeypatch):
    """The whole path a user takes: `tunelab export --gguf` loads nothing in its own process; the probe's
    child dies of SIGILL and the user gets one line, before the merge."""
    _llama_cpp_installed()
    from tunelab.cli import app

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(_trapping_library(tmp_path)))
    monkeypatch.setattr(llamacpp_probe, "_VERDICTS", {})
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    meta = {"base_model": "tiny:llama", "artifact": "full", "method": "full", "model_kind": "causal_lm"}
    (run / "final" / "tunelab.json").write_text(json.dumps(meta))
    save_file({"w": torch.zeros(1)}, str(run / "final" / "model.safetensors"))  # a final/ export accepts
    out = tmp_path / "g"
    result = CliRunner().invoke(
        app, ["export", str(run), "--out", str(out), "--gguf", "q4_k_m", "--no-verify"]
    )
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error: llama.cpp cannot run on this CPU"), lines
    assert "SIGILL (illegal instruction)" in lines[0] and "Traceback" not in result.output
    assert not out.exists()
    with pytest.raises(llamacpp.LlamaCppUnusableError):
        llamacpp.open_llama(tmp_path / "any.gguf")
    assert os.environ["LLAMA_CPP_LIB_PATH"].endswith("trap-lib")
