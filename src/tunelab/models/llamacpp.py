"""llama.cpp as tunelab's GGUF engine: its own converter, its own quantiser, its own loader.

A GGUF file is only as good as the program that reads it, and the programs that serve GGUF (llama.cpp,
llama-server, Ollama, LM Studio) all run llama.cpp. So tunelab writes GGUF with llama.cpp's
``convert_hf_to_gguf.py`` (every architecture it knows), quantises with llama.cpp's quantiser (the
k-quants people download) and checks the file by loading it in llama.cpp.

Both come from one pinned release of ``llama-cpp-python``: its wheel gives the quantiser and loader
(``import llama_cpp``), its sdist vendors the converter and the matching ``gguf-py``, which are
extracted once into ``$TUNELAB_HOME/llama.cpp/<version>/``. ``make gguf`` downloads the sdist into
``$TUNELAB_HOME/sdist`` and builds the wheel from it with portable CPU flags, cached in
``$TUNELAB_HOME/wheels/<build key>/`` (:mod:`tunelab.models.llamacpp_build`).

Before the first model is loaded in a process, a child process proves the library runs on this CPU
(:mod:`tunelab.models.llamacpp_probe`); every model is then opened through :func:`open_llama`, with llama.cpp's
extra buffer types only where the probe proved them.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from tunelab.assets import tunelab_home
from tunelab.models import llamacpp_child
from tunelab.models.llamacpp_build import LLAMA_CPP_VERSION
from tunelab.models.llamacpp_probe import LlamaCppUnusableError as LlamaCppUnusableError
from tunelab.models.llamacpp_probe import usable_llama_cpp

SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
# PyPI's sdist of llama-cpp-python 0.3.36; the converter we run is the code in exactly this file.
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
GGUF_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
CONVERTER_TYPES: tuple[str, ...] = ("f32", "f16", "bf16", "q8_0")
# llama.cpp's file types (enum llama_ftype) for what its quantiser makes
QUANT_FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
}
MISSING_MESSAGE = (
    "GGUF export/eval needs llama.cpp: run `make gguf` (builds llama-cpp-python once, ~15 min, cached "
    "under $TUNELAB_HOME/wheels) or pip install 'tunelab[gguf]'"
)
# What the converter imports beyond the standard library (sentencepiece even for BPE Llama models:
# its Llama vocab code tries a SentencePiece tokenizer first).
CONVERTER_MODULES = ("torch", "numpy", "sentencepiece", "transformers", "yaml", "tqdm")
_VENDOR = f"llama_cpp_python-{LLAMA_CPP_VERSION}/vendor/llama.cpp/"
_EXTRACT = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
_STAMP = "tunelab_extract.json"

# The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a probe text, so a
# tokenizer trained from scratch (tunelab's tiny one, any custom BPE) is refused even when it splits
# exactly like a known one. When the hash is unknown but tokenizer.json's pre-tokenizer *is* one llama.cpp
# implements (GPT-2's byte-level regex split; Qwen2's split, which transformers installs for any
# tokenizer loaded with a Qwen2 config), that llama.cpp pre-tokenizer reproduces it. Nothing else is guessed.
_QWEN2_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
    "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
KNOWN_PRE_TOKENIZERS = {
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
    "qwen2": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
        ],
    },
}
_RUNNER = """
import json, sys
from pathlib import Path
import convert_hf_to_gguf
from conversion.base import TextModel

KNOWN = json.loads(sys.argv.pop(1))
original = TextModel.get_vocab_base_pre

def without_offsets(value):
    if isinstance(value, dict):
        return {k: without_offsets(v) for k, v in value.items() if k != "trim_offsets"}
    if isinstance(value, list):
        return [without_offsets(v) for v in value]
    return value

def vocab_base_pre(self, tokenizer):
    try:
        return original(self, tokenizer)
    except NotImplementedError:
        path = Path(self.dir_model) / "tokenizer.json"
        pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") if path.is_file() else None
        for name, known in KNOWN.items():
            if without_offsets(pre) == known:
                print(f"tunelab: unknown BPE tokenizer hash; its pre-tokenizer is llama.cpp's {name!r}", file=sys.stderr)
                return name
        raise

TextModel.get_vocab_base_pre = vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
convert_hf_to_gguf.main()
"""


class LlamaCppMissingError(ValueError):
    """llama.cpp (the ``llama_cpp`` bindings, the sdist or a converter dependency) is not installed."""


class GGUFConversionError(ValueError):
    """llama.cpp's converter or quantiser refused or failed; the message says which and why."""


def require_llama_cpp() -> ModuleType:
    """The ``llama_cpp`` module once a child process proved it runs on this CPU; otherwise
    :class:`LlamaCppMissingError` or :class:`LlamaCppUnusableError`, each one line saying what to do."""
    try:
        if importlib.util.find_spec("llama_cpp") is None:
            raise ImportError("llama_cpp")
        usable_llama_cpp()  # before this process loads the library: a trap kills the child, not us
        return importlib.import_module("llama_cpp")
    except ImportError as err:
        raise LlamaCppMissingError(MISSING_MESSAGE) from err


def open_llama(path: str | Path, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path=path, **kwargs)`` the way the probe proved it runs here: with llama.cpp's
    extra buffer types (weight repacking, AMX) only when a child ran them. Every model tunelab loads in
    llama.cpp goes through here."""
    require_llama_cpp()
    extra_bufts = usable_llama_cpp().extra_bufts
    return llamacpp_child.open_llama(path, extra_bufts=extra_bufts, **kwargs)


def sdist_path() -> Path:
    return tunelab_home() / "sdist" / SDIST_NAME


def converter_dir() -> Path:
    """``$TUNELAB_HOME/llama.cpp/<version>/`` holding convert_hf_to_gguf.py, conversion/ and gguf-py/,
    extracted from the pinned sdist on first use (its sha256 checked and recorded in tunelab_extract.json)."""
    target = tunelab_home() / "llama.cpp" / LLAMA_CPP_VERSION
    if (target / _STAMP).is_file() and (target / "convert_hf_to_gguf.py").is_file():
        return target
    sdist = sdist_path()
    if not sdist.is_file():
        raise LlamaCppMissingError(
            f"{sdist} is missing (llama.cpp's converter comes from it). {MISSING_MESSAGE}"
        )
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise LlamaCppMissingError(
            f"{sdist}: sha256 {digest} is not the pinned {SDIST_SHA256} of llama-cpp-python "
            f"{LLAMA_CPP_VERSION}; delete it and run `make gguf` to download it again"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{LLAMA_CPP_VERSION}-", dir=target.parent))
    try:
        _extract_converter(sdist, staging)
        stamp = {"sdist": SDIST_NAME, "sha256": digest, "version": LLAMA_CPP_VERSION}
        (staging / _STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # a half-extracted folder from an interrupted run: no stamp, replace it
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract_converter(sdist: Path, into: Path) -> None:
    """Only the converter's files, and only regular files and folders inside ``into``."""
    with tarfile.open(sdist, "r:gz") as tar:
        for member in tar.getmembers():
            if not member.name.startswith(_VENDOR):
                continue
            relative = member.name[len(_VENDOR) :]
            if not relative.startswith(_EXTRACT) or ".." in Path(relative).parts:
                continue
            destination = into / relative
            if member.isdir():
                destination.mkdir(parents=True, exist_ok=True)
            elif member.isfile():
                destination.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None  # a regular file always has contents
                destination.write_bytes(source.read())


def check_converter_modules() -> None:
    """The converter runs in a subprocess; say up front which of its imports is missing."""
    missing = [name for name in CONVERTER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise LlamaCppMissingError(
            f"llama.cpp's converter needs {', '.join(missing)}, not installed here; {MISSING_MESSAGE}"
        )


def convert_to_gguf(hf_dir: Path, out: Path, outtype: str, *, model_name: str | None = None) -> Path:
    """Convert a Hugging Face model directory to ``out`` with llama.cpp's own converter
    (``model_name``: the file's general.name; the converter otherwise guesses it from the folder)."""
    if outtype not in CONVERTER_TYPES:
        raise ValueError(f"converter output type {outtype!r}: choose one of {', '.join(CONVERTER_TYPES)}")
    converter = converter_dir()
    check_converter_modules()
    env = dict(os.environ)
    # the vendored gguf-py first: it is the version this converter was written against
    paths = [str(converter / "gguf-py"), str(converter), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    known = json.dumps(KNOWN_PRE_TOKENIZERS)
    command = [sys.executable, "-c", _RUNNER, known, str(hf_dir), "--outfile", str(out), "--outtype", outtype]
    command += ["--model-name", model_name] if model_name else []
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not out.is_file():
        raise GGUFConversionError(_conversion_failure(hf_dir, done.stdout + done.stderr))
    return out


def _conversion_failure(hf_dir: Path, log: str) -> str:
    """One line: the architecture llama.cpp refused, or the converter's last error, plus the full log."""
    log_file = Path(tempfile.mkstemp(prefix="tunelab-convert-", suffix=".log")[1])
    log_file.write_text(log, encoding="utf-8")
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    refused = [line for line in lines if "is not supported" in line or "not supported!" in line]
    architecture = _architecture(hf_dir)
    if refused:
        return (
            f"llama.cpp's converter (llama-cpp-python {LLAMA_CPP_VERSION}) does not support the architecture "
            f"{architecture}, so it cannot be written as GGUF; export with --merge instead (full log: {log_file})"
        )
    errors = [line for line in lines if "Error" in line or "error" in line] or lines or ["no output"]
    return f"llama.cpp's converter failed on {architecture} ({hf_dir}): {errors[-1][:300]} (full log: {log_file})"


def _architecture(hf_dir: Path) -> str:
    config = hf_dir / "config.json"
    if not config.is_file():
        return "an unknown architecture (no config.json)"
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or ["?"]
    return str(architectures[0])


def quantize_gguf(src: Path, out: Path, qtype: str) -> Path:
    """Quantise a GGUF (f32/f16/bf16) to ``qtype`` with llama.cpp's quantiser."""
    if qtype not in QUANT_FTYPES:
        raise ValueError(f"quantisation {qtype!r}: choose one of {', '.join(QUANT_FTYPES)}")
    llama_cpp = require_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_FTYPES[qtype])
    params.nthread = max(1, os.cpu_count() or 1)
    with native_output_captured() as log:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0 or not out.is_file():
        last = [
            line for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
        ]
        raise GGUFConversionError(
            f"llama.cpp's quantiser could not make {qtype} from {src.name} (status {status}): "
            f"{last[-1] if last else 'no output'} (full log: {log})"
        )
    log.unlink(missing_ok=True)
    return out


@contextlib.contextmanager
def native_output_captured() -> Iterator[Path]:
    """Send what C code writes to stdout/stderr (the quantiser logs every tensor) to a temporary file
    instead of the user's terminal; yields that file's path."""
    fd, name = tempfile.mkstemp(prefix="tunelab-llama-cpp-", suffix=".log")
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield Path(name)
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for handle in (*saved, fd):
            os.close(handle)


def gguf_metadata(path: str | Path) -> dict[str, Any]:
    """What a server reads from a GGUF to chat with it: architecture, chat template, special token ids."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(path))

    def value(key: str) -> Any:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    tokens = value("tokenizer.ggml.tokens") or []
    meta: dict[str, Any] = {
        "architecture": value("general.architecture"),
        "file_type": value("general.file_type"),
        "chat_template": value("tokenizer.chat_template"),
        "tokenizer_model": value("tokenizer.ggml.model"),
        "tokenizer_pre": value("tokenizer.ggml.pre"),
        "n_vocab": len(tokens),
        "add_bos_token": value("tokenizer.ggml.add_bos_token"),
    }
    for name in ("bos", "eos", "eot", "eom", "padding"):
        token_id = value(f"tokenizer.ggml.{name}_token_id")
        meta[f"{name}_token_id"] = token_id
        meta[f"{name}_token"] = tokens[token_id] if token_id is not None and token_id < len(tokens) else None
    return meta


def set_gguf_token_id(path: Path, key: str, token_id: int) -> None:
    """Rewrite one existing integer field in place (what gguf-py's gguf_set_metadata does)."""
    import gguf  # noqa: PLC0415

    reader = gguf.GGUFReader(str(path), "r+")
    field = reader.get_field(key)
    if field is None:
        raise GGUFConversionError(f"{path}: no {key} field to set")
    field.parts[field.data[0]][0] = token_id
    reader.data.flush()  # the reader memory-maps the file; make the write durable before we re-read
