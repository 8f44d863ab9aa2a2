"""``export_run``: a finished run's model in a format other programs load, with its provenance.

Three kinds: ``merged`` (a standard Hugging Face directory that plain transformers loads), ``adapter``
(PEFT's own adapter format, for runs that trained one) and ``gguf`` (merged, then converted, quantised
and loaded by llama.cpp itself: see ``export/gguf.py``). The output is built in a hidden sibling directory and
renamed into place, so a crash or a refusal midway leaves no partial export under the real name; it
always holds ``tunelab_export.json`` saying which run, recipe and base it came from, and the sha256
of every weight file written.

Heavy imports (torch, transformers, PEFT) happen inside the functions: ``tunelab --help`` imports
this module and should stay fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml

from tunelab import __version__
from tunelab.runs.atomic import atomic_directory, atomic_write_json
from tunelab.runs.manifest import file_sha256, package_versions, recipe_sha256, utc_now

ExportKind = Literal["merged", "adapter", "gguf"]
KINDS: tuple[str, ...] = ("merged", "adapter", "gguf")
# what tunelab.models.llamacpp makes (GGUF_TYPES there; a test keeps them equal): spelled out here
# because importing tunelab.models loads torch, and `tunelab --help` imports this module
GGUF_TYPES: tuple[str, ...] = ("f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
EXPORT_META = "tunelab_export.json"
EXPORT_SCHEMA_VERSION = 1
FINAL_META = "tunelab.json"
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")
# tunelab's own model specs; no plain `from_pretrained` can load them, so an adapter keeps them as is
_TUNELAB_SPECS = ("tiny:", "asset:")


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    kind: ExportKind,
    gguf_type: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    max_shard_size: str | int = "2GB",
    ollama: bool = False,
) -> Path:
    """Export ``run`` (a run directory or its ``final/``) to the new directory ``out``; returns ``out``.

    ``dtype`` is the dtype of the written safetensors: ``auto`` keeps what the base model was stored
    in (the adapter's own dtype for ``adapter``). ``max_shard_size`` splits a merged model's weights
    into files of at most that size (``"2GB"``, ``"500MB"`` or bytes). An existing ``out`` is refused
    unless ``overwrite``; even then it is only replaced once the new export is complete. ``ollama``
    (GGUF only) also writes an Ollama ``Modelfile`` next to the GGUF.
    """
    final = final_dir(run)
    _check_options(kind, gguf_type, dtype)
    if ollama and kind != "gguf":
        raise ValueError("--ollama writes a Modelfile for a GGUF file; use it with --gguf TYPE")
    out = Path(out)
    _check_destination(out, final, overwrite)
    meta = read_final_meta(final)
    gguf_details: dict[str, Any] = {}
    with atomic_directory(out) as tmp:
        if kind == "merged":
            written_dtype = _write_merged(final, tmp, dtype, max_shard_size)
        elif kind == "adapter":
            written_dtype = _write_adapter(final, meta, tmp, dtype)
        else:
            gguf_details = _write_gguf(final, meta, tmp, gguf_type or "", run_dir_of(final).name, ollama)
            written_dtype = gguf_type or ""
        provenance = build_provenance(final, meta, tmp, kind=kind, dtype=written_dtype, gguf_type=gguf_type)
        if gguf_details:
            provenance["gguf"] = gguf_details
        atomic_write_json(tmp / EXPORT_META, provenance)
    return out


def final_dir(run: str | Path) -> Path:
    """A run directory or its ``final/`` → the ``final/`` folder, with its weights (FileNotFoundError
    otherwise)."""
    path = Path(run)
    for candidate in (path / "final", path):
        if (candidate / FINAL_META).is_file():
            _check_weights(candidate)
            return candidate
    raise FileNotFoundError(
        f"{run}: no final/{FINAL_META} in it; export needs a finished run directory "
        "(runs/<name>, written by `tunelab train`) or its final/ folder"
    )


def _check_weights(final: Path) -> None:
    """Every method writes safetensors, an adapter as ``adapter_model.safetensors``; without them the
    loaders would look for the folder on the Hugging Face hub and fail with a message about repo ids."""
    if (final / "adapter_config.json").is_file():
        missing = None if (final / "adapter_model.safetensors").is_file() else "adapter_model.safetensors"
    else:
        missing = None if any(final.glob("*.safetensors")) else "its weights (*.safetensors)"
    if missing is not None:
        raise FileNotFoundError(
            f"{final}: {missing} is missing, so this run's final model is incomplete; restore the file "
            "or train the run again"
        )


def check_out_path(out: str | Path) -> None:
    """An export folder is a plain path: one starting with '-' (``--help`` taken as ``--out``'s value)
    or holding control characters is a mistake, refused before anything is written. The command
    line and the studio both call this."""
    text = str(out)
    if not text.strip():
        raise ValueError("--out is empty; give a folder path for the export")
    if text.startswith("-"):
        raise ValueError(
            f"--out {text!r} starts with '-', so it looks like an option, not a folder; give a folder "
            f"path (write ./{text} if you mean it)"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError(f"--out {text!r} holds control characters; give a plain folder path")


def read_final_meta(final: Path) -> dict[str, Any]:
    """A run's ``final/tunelab.json``: how it trained (method, head, base)."""
    return json.loads((final / FINAL_META).read_text(encoding="utf-8"))


def run_dir_of(final: Path) -> Path:
    """The run directory a ``final/`` folder belongs to."""
    return final.parent if final.name == "final" else final


def _check_options(kind: str, gguf_type: str | None, dtype: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"export kind {kind!r}: choose one of {', '.join(KINDS)}")
    if kind == "gguf" and gguf_type not in GGUF_TYPES:
        raise ValueError(f"GGUF type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    if kind != "gguf" and gguf_type is not None:
        raise ValueError(f"a GGUF type ({gguf_type}) only applies to the gguf export kind, not {kind}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if kind == "gguf" and dtype != "auto":
        raise ValueError(
            f"dtype {dtype} does not apply to GGUF: its weights are stored as the GGUF type ({gguf_type})"
        )


def _check_destination(out: Path, final: Path, overwrite: bool) -> None:
    """Refuse to clobber an export, and never let ``--overwrite`` delete the run being exported or a
    folder that is not an earlier export (one holding its ``tunelab_export.json``)."""
    check_out_path(out)
    target, run = out.resolve(), run_dir_of(final).resolve()
    if target == run or target in run.parents or run in target.parents:
        raise ValueError(
            f"--out {out} is the run itself, inside it, or contains it; choose a folder outside {run}"
        )
    if out.is_file():
        raise FileExistsError(f"--out {out} is a file; give a directory path")
    if not (out.is_dir() and any(out.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} already exists and is not empty; choose a new folder or pass --overwrite to replace it"
        )
    if not (out / EXPORT_META).is_file():
        raise FileExistsError(
            f"{out} is not a tunelab export (no {EXPORT_META} in it), so --overwrite will not replace it: it "
            "replaces only an earlier export. Choose a new folder"
        )


def _write_merged(final: Path, out: Path, dtype: str, max_shard_size: str | int) -> str:
    """Standard HF directory: config, generation config, tokenizer, (sharded) safetensors."""
    import torch  # noqa: PLC0415

    from tunelab.export.merge import merged_model  # noqa: PLC0415

    model, tokenizer = merged_model(final)
    target = stored_dtype(model) if dtype == "auto" else dtype
    model = model.to(getattr(torch, target))
    model.save_pretrained(out, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out)
    return target


def stored_dtype(model: Any) -> str:
    """The dtype the weights were stored in on disk (``config.json`` of the loaded directory), so an
    export of a bf16 model stays bf16; fp32 for models built from config (``tiny:``) or unknown."""
    config_file = Path(str(getattr(model.config, "_name_or_path", "") or "")) / "config.json"
    if not config_file.is_file():
        return "float32"
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    stored = str(saved.get("dtype") or saved.get("torch_dtype") or "float32")
    return stored if stored in DTYPES else "float32"


def _write_adapter(final: Path, meta: dict[str, Any], out: Path, dtype: str) -> str:
    """PEFT's format (adapter_config.json + adapter_model.safetensors) and the tokenizer, with
    ``base_model_name_or_path`` pointing at the base wherever plain transformers can load it from."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    from tunelab.export.merge import is_peft_folder  # noqa: PLC0415

    if not is_peft_folder(final):
        raise ValueError(
            f"{final}: method '{meta.get('method')}' saved a {meta.get('artifact', 'full')} model, not a PEFT "
            "adapter, so there is no adapter to export; use --merge (a standard model directory) or --gguf"
        )
    config = json.loads((final / "adapter_config.json").read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = base_for_adapter(meta["base_model"])
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tensors = load_file(str(final / "adapter_model.safetensors"))
    if dtype == "auto":
        shutil.copyfile(final / "adapter_model.safetensors", out / "adapter_model.safetensors")
        written = {str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()}
    else:
        import torch  # noqa: PLC0415

        target = getattr(torch, dtype)
        cast = {k: t.to(target) if t.is_floating_point() else t for k, t in tensors.items()}
        save_file(cast, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
        written = {dtype}
    AutoTokenizer.from_pretrained(str(final)).save_pretrained(out)
    return ",".join(sorted(written)) or "float32"


def base_for_adapter(spec: str) -> str:
    """A hub id or local directory as ``from_pretrained`` takes it (local paths made absolute);
    ``tiny:``/``asset:`` specs and ``.gguf`` files stay as the tunelab spec, since plain transformers
    cannot load them: load that base with ``tunelab.models.load.load_model(spec)``."""
    if spec.startswith(_TUNELAB_SPECS) or spec.lower().endswith(".gguf"):
        return spec
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def _write_gguf(
    final: Path, meta: dict[str, Any], out: Path, gguf_type: str, name: str, ollama: bool
) -> dict[str, Any]:
    """Merge, then ``<run>-<type>.gguf`` made and loaded by llama.cpp (and a Modelfile for ``ollama``)."""
    from tunelab.export.gguf import write_gguf  # noqa: PLC0415
    from tunelab.export.merge import merged_model, refuse_prompt_learning  # noqa: PLC0415
    from tunelab.models.llamacpp import require_llama_cpp  # noqa: PLC0415

    kind = meta.get("model_kind", "causal_lm")
    if kind != "causal_lm":
        raise ValueError(
            f"{final}: this run trained a {kind} head; GGUF holds causal language models only. "
            "Use --merge for a directory that AutoModelForSequenceClassification loads"
        )
    refuse_prompt_learning(final, meta, "a GGUF file")
    require_llama_cpp()  # before the merge, which can take minutes on a real model
    model, tokenizer = merged_model(final)
    details = write_gguf(model, tokenizer, out, gguf_type, name, stored_dtype(model))
    if ollama:
        from tunelab.export.modelfile import write_modelfile  # noqa: PLC0415

        details["modelfile"] = write_modelfile(out, out / details["file"], tokenizer, model.generation_config)
    return details


def build_provenance(
    final: Path, meta: dict[str, Any], out: Path, *, kind: str, dtype: str, gguf_type: str | None
) -> dict[str, Any]:
    """Where an export came from and what it holds, so a served model can be traced back to its run."""
    run = run_dir_of(final)
    manifest = _read_json(run / "manifest.json")
    return {
        "schema_version": EXPORT_SCHEMA_VERSION,
        "kind": kind,
        "gguf_type": gguf_type,
        "dtype": dtype,
        "source_run": str(run.resolve()),
        "run_name": manifest.get("run_name") or run.name,
        "recipe_sha256": manifest.get("recipe_sha256") or _recipe_digest(run / "recipe.yaml"),
        "base_model": meta.get("base_model"),
        "base_model_seed": meta.get("seed") if str(meta.get("base_model", "")).startswith("tiny:") else None,
        "method": meta.get("method"),
        "artifact": meta.get("artifact"),
        "objective": meta.get("objective"),
        "model_kind": meta.get("model_kind", "causal_lm"),
        "trained_steps": meta.get("step"),
        "tunelab_version": __version__,
        "versions": package_versions(),
        "created_at": utc_now(),
        "weights": weight_files(out),
        "notes": export_notes(kind, meta),
    }


def export_notes(kind: str, meta: dict[str, Any]) -> list[str]:
    """What a user of the artefact must know to get the trained behaviour back."""
    if kind == "adapter" and meta.get("method") == "qlora":
        return [
            "this adapter was trained against the base quantised to 4-bit NF4 (see method_config); load the "
            "base the same way (bitsandbytes, as in the recipe) to reproduce the trained model. On the dense "
            "base it is an approximation; `tunelab export --merge --qlora-merge dequantized` folds it into the "
            "de-quantised base exactly."
        ]
    return []


def weight_files(directory: Path) -> list[dict[str, Any]]:
    """Name, size and sha256 of every weight file (safetensors shards, GGUF) in ``directory``."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    return [{"file": p.name, "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files]


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _recipe_digest(path: Path) -> str | None:
    """The same digest the manifest records, for runs whose manifest is missing it."""
    if not path.is_file():
        return None
    return recipe_sha256(yaml.safe_load(path.read_text(encoding="utf-8")))
