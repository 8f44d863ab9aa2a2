"""The one way tunelab loads a model and its tokenizer.

A model spec is a local HF directory, a `.gguf` file, or a Hugging Face Hub id. Everything below
turns that spec into `(model, tokenizer)` on the right device and dtype, with errors that say what
to do next. GGUF files are converted once and cached as safetensors, because transformers' GGUF
path (tokenizer conversion plus dequantisation) takes tens of seconds even for a 135M model.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from tunelab.assets import asset_path, tunelab_home
from tunelab.models import varlen

Source = Literal["gguf", "local", "hub"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TRUTHY = {"1", "true", "yes", "on"}
_CONVERSION_INFO = "tunelab_conversion.json"


class ModelNotFoundError(FileNotFoundError):
    """A model spec that names nothing tunelab can load; the message says what to pass instead."""


def resolve_device(pref: str = "auto") -> torch.device:
    """`auto` picks the fastest available backend; an explicit choice that cannot run is an error
    now rather than a confusing failure deep inside the first forward pass."""
    pref = pref.strip().lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(pref)
    except RuntimeError as err:
        raise ValueError(f"Unknown device {pref!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.") from err
    if device.type == "cuda":
        _check_cuda(device)
    elif device.type == "mps" and not _mps_available():
        raise ValueError(
            "device='mps' was requested but MPS is not available here; use device='auto' or 'cpu'."
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"Unsupported device {pref!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    return device


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _check_cuda(device: torch.device) -> None:
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={str(device)!r} was requested but CUDA is not available "
            f"(torch {torch.__version__}); use device='auto' or 'cpu'."
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device={str(device)!r} was requested but only {count} CUDA device(s) exist.")


def resolve_dtype(pref: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """`auto` is bf16 on CUDA that supports it, fp16 on older CUDA, and fp32 on CPU and MPS, where
    half precision is slow or numerically fragile for training."""
    if isinstance(pref, torch.dtype):
        return pref
    key = pref.strip().lower().removeprefix("torch.")
    if key == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if key not in _DTYPES:
        choices = ["auto", *_DTYPES]
        hint = difflib.get_close_matches(key, choices, n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(f"Unknown dtype {pref!r}; choose one of {choices}.{suggestion}")
    return _DTYPES[key]


def classify_source(spec: str | os.PathLike[str]) -> Source:
    """Say what kind of spec this is, without touching the network or checking existence.

    `org/name` is ambiguous (a hub id or a relative path), so it is local only when it exists or
    its first component does; anything else shaped like a path is local, so a typo in a path gives
    "not found" instead of a confusing hub lookup.
    """
    text = os.fspath(spec)
    if text.lower().endswith(".gguf"):
        return "gguf"
    path = Path(text).expanduser()
    if path.exists() or _looks_like_path(text):
        return "local"
    return "hub"


def _looks_like_path(text: str) -> bool:
    if text in (".", "..") or text.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    parts = Path(text).parts
    if len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).exists()):
        return True
    return _HUB_ID.fullmatch(text) is None


def load_tokenizer(
    spec: str | os.PathLike[str], *, trust_remote_code: bool = False, cache: bool = True
) -> PreTrainedTokenizerBase:
    """Load the tokenizer for a spec, ready for training (pad token set, right padding)."""
    source = classify_source(spec)
    if source == "gguf":
        gguf = _existing_path(spec)
        cached = _converted_dir(gguf) if cache else None
        if cached is not None and _is_complete(cached):
            return _prepare_tokenizer(AutoTokenizer.from_pretrained(cached))
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        return _prepare_tokenizer(tokenizer)
    location = _existing_path(spec) if source == "local" else os.fspath(spec)
    kwargs = {"trust_remote_code": trust_remote_code, **_hub_kwargs(source)}
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, location, source, **kwargs)
    return _prepare_tokenizer(tokenizer)


def load_causal_lm(
    spec: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    model_cls: Any = None,
    cache: bool = True,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `(model, tokenizer)` from a local dir, a `.gguf` file or a hub id.

    Weights are safetensors only (pickled `.bin` files can execute code on load). A `.gguf` is
    dequantised to `dtype`; with `cache=True` the converted model is kept under
    `$TUNELAB_HOME/converted/` so the slow conversion runs once per file.
    """
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    model_cls = model_cls or AutoModelForCausalLM
    source = classify_source(spec)
    if source == "gguf":
        gguf = _existing_path(spec)
        converted = _ensure_converted(gguf) if cache else None
        if converted is None:
            model = _from_gguf(model_cls, gguf, torch_dtype, model_kwargs)
            return _finish(model, load_tokenizer(gguf, cache=False), target)
        source, spec = "local", converted
    location = _existing_path(spec) if source == "local" else os.fspath(spec)
    if source == "local":
        _require_safetensors(location)
    kwargs = {"trust_remote_code": trust_remote_code, **_hub_kwargs(source)}
    if kwargs.get("local_files_only"):
        # transformers does not forward `local_files_only` to its PEFT adapter probe, which then
        # retries the network for ~20 s before giving up.
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    model = _from_pretrained(
        model_cls.from_pretrained,
        location,
        source,
        dtype=torch_dtype,
        use_safetensors=True,
        **kwargs,
        **(model_kwargs or {}),
    )
    tokenizer = load_tokenizer(location, trust_remote_code=trust_remote_code)
    return _finish(model, tokenizer, target)


def _finish(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Put the model where it will run and let generation know the pad id, so it never warns.

    Only the device moves: `from_pretrained` already applied `dtype` and knows which modules must
    stay fp32, which a blanket cast would undo.
    """
    model = model.to(device)
    for config in (model.config, getattr(model, "generation_config", None)):
        if config is not None and getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Batching needs a pad token. Many chat models ship none; their EOS is safe to reuse because
    padded positions are masked out of attention and loss. Right padding keeps labels aligned with
    inputs during training (generation code switches to left padding itself)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _existing_path(spec: str | os.PathLike[str]) -> Path:
    path = Path(os.fspath(spec)).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"Model path {os.fspath(spec)!r} does not exist (resolved to {path.resolve()}). "
            "Pass an existing model directory, a .gguf file, or a Hugging Face Hub id like 'org/name'."
        )
    return path


def _require_safetensors(path: Path) -> None:
    """Refuse pickled checkpoints up front, with the reason, instead of transformers' generic error."""
    if path.is_file() or any(path.glob("*.safetensors")):
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickled:
        raise ModelNotFoundError(
            f"{path} has only pickled weights ({', '.join(pickled)}); tunelab loads safetensors only, "
            "because pickle files can run code when loaded. Convert them once with "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)`."
        )
    raise ModelNotFoundError(f"{path} contains no *.safetensors weights; is it a model directory?")


def _hub_offline() -> bool:
    return any(
        os.environ.get(name, "").strip().lower() in _TRUTHY
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _hub_kwargs(source: Source) -> dict[str, Any]:
    """huggingface_hub reads HF_HUB_OFFLINE once at import; pass it per call so it always counts."""
    return {"local_files_only": True} if source == "hub" and _hub_offline() else {}


def _from_pretrained(loader: Callable[..., Any], location: str | Path, source: Source, **kwargs: Any) -> Any:
    """Call a transformers loader, turning hub failures into an error that says what to do."""
    if source != "hub":
        return loader(location, **kwargs)
    try:
        return loader(location, **kwargs)
    except OSError as err:
        raise ModelNotFoundError(_hub_failure(location, err)) from err


def _hub_failure(location: str | Path, err: OSError) -> str:
    if _hub_offline():
        why = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
        fix = "Go online (unset HF_HUB_OFFLINE)"
    else:
        why = f"it could not be fetched ({err})"
        fix = "Check the id, or go online"
    return (
        f"Could not load {str(location)!r} from the Hugging Face Hub: {why}. "
        f"{fix}, or pass a local model directory or a .gguf file instead."
    )


def _gguf_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def _converted_dir(gguf: Path, digest: str | None = None) -> Path:
    """Cache entries are keyed by content, so a renamed or copied file reuses its conversion."""
    return tunelab_home() / "converted" / (digest or _gguf_digest(gguf))[:16]


def _is_complete(directory: Path) -> bool:
    return (directory / _CONVERSION_INFO).is_file()


def _from_gguf(
    model_cls: Any, gguf: Path, dtype: torch.dtype, model_kwargs: dict[str, Any] | None = None
) -> PreTrainedModel:
    """Load a GGUF through transformers, dequantised to `dtype`, as an ordinary model.

    transformers tags every GGUF-loaded model with a quantizer that forbids training and saving,
    even when (as for llama) every weight is already a dense tensor. When nothing is left packed we
    drop that tag through the quantizer's own `remove_quantization_config`.
    """
    model = model_cls.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype, **(model_kwargs or {}))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and _is_dense(model):
        quantizer.remove_quantization_config(model)
    return model


def _is_dense(model: PreTrainedModel) -> bool:
    packed = getattr(getattr(model, "hf_quantizer", None), "packed_modules", None)
    return not packed and all(p.is_floating_point() for p in model.parameters())


def _ensure_converted(gguf: Path) -> Path | None:
    """Return the cached safetensors copy of a GGUF, converting it first if needed.

    The copy is fp32 (exactly what dequantisation yields), so loading it in any dtype gives the same
    weights as loading the GGUF directly. It is written to a temp dir and renamed into place, so an
    interrupted or concurrent conversion never leaves a half-written entry. Returns None when the
    model stays packed in GGUF blocks (a kernel-backed architecture), which cannot be saved.
    """
    digest = _gguf_digest(gguf)
    final = _converted_dir(gguf, digest)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        if not _convert_gguf(gguf, tmp, digest):
            return None
        if final.exists() and not _is_complete(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError:
        if not _is_complete(final):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _convert_gguf(gguf: Path, out: Path, digest: str) -> bool:
    model = _from_gguf(AutoModelForCausalLM, gguf, torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        return False
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    info = {"source": str(gguf.resolve()), "sha256": digest, "transformers": transformers.__version__}
    (out / _CONVERSION_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return True


TINY_PREFIX = "tiny:"
MODEL_CLASSES: dict[str, Any] = {
    "causal_lm": AutoModelForCausalLM,
    "sequence_classification": AutoModelForSequenceClassification,
}
"""Head by objective ``model_kind``."""
ASSET_PREFIX = "asset:"


def load_model(
    spec: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    seed: int = 0,
    model_cls: Any = None,
    model_kwargs: dict[str, Any] | None = None,
    attention: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Like :func:`load_causal_lm`, plus two tunelab specs.

    ``tiny:llama`` is a 2-layer random model built from config: example recipes and tests run
    anywhere in seconds with nothing downloaded. ``asset:NAME`` is an embedded default asset
    (e.g. ``asset:smollm2-135m-instruct``) fetched by ``tunelab assets fetch``. ``model_cls`` (an
    ``AutoModelFor...`` class) and ``model_kwargs`` (e.g. ``num_labels``) serve objectives that need
    another head than the language-model one. ``attention`` is transformers' ``attn_implementation``
    (resolved from ``model.attention`` by :func:`tunelab.models.attention.decide_attention`); None
    keeps the model's default.
    """
    if spec.startswith(ASSET_PREFIX):
        spec = str(asset_path(spec[len(ASSET_PREFIX) :]))
    if attention == varlen.NAME:
        varlen.register()  # transformers must know the name before the model is built
    if spec.startswith(TINY_PREFIX):
        model, tokenizer = _tiny(spec, seed, resolve_device(device), model_cls, model_kwargs)
        if attention is not None:
            model.set_attn_implementation(attention)
        return model, tokenizer
    if attention is not None:
        model_kwargs = {**(model_kwargs or {}), "attn_implementation": attention}
    return load_causal_lm(
        spec,
        dtype=dtype,
        device=device,
        trust_remote_code=trust_remote_code,
        model_cls=model_cls,
        model_kwargs=model_kwargs,
    )


def load_config(spec: str, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of any model spec :func:`load_model` accepts, without the weights
    (what the attention and the plan are decided from before the model loads)."""
    if spec.startswith(TINY_PREFIX):
        from tunelab.models.tiny import tiny_llama_config

        if spec != "tiny:llama":
            raise ModelNotFoundError(f"unknown tiny model {spec!r}; the built-in one is 'tiny:llama'")
        return tiny_llama_config()
    if spec.startswith(ASSET_PREFIX):
        spec = str(asset_path(spec[len(ASSET_PREFIX) :]))
    source = classify_source(spec)
    if source == "gguf":
        gguf = _existing_path(spec)
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)  # the header, no tensors
    location = _existing_path(spec) if source == "local" else spec
    kwargs = {"trust_remote_code": trust_remote_code, **_hub_kwargs(source)}
    return _from_pretrained(AutoConfig.from_pretrained, location, source, **kwargs)


def _tiny(
    spec: str, seed: int, device: torch.device, model_cls: Any, model_kwargs: dict[str, Any] | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The tiny model; with another head class, the same seeded body under that head."""
    from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer

    _check_tiny(spec)
    tokenizer = build_tiny_tokenizer()
    causal = build_tiny_llama(tokenizer, seed=seed)
    if model_cls is None or model_cls is AutoModelForCausalLM:
        return _finish(causal, tokenizer, device)
    config = causal.config
    for key, value in (model_kwargs or {}).items():
        setattr(config, key, value)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_cls.from_config(config)
    model.base_model.load_state_dict(causal.base_model.state_dict())
    return _finish(model, tokenizer, device)


def _check_tiny(spec: str) -> None:
    if spec != "tiny:llama":
        raise ModelNotFoundError(f"unknown tiny model {spec!r}; the built-in one is 'tiny:llama'")


def tokenizer_for(spec: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of any model spec :func:`load_model` accepts (without loading the weights)."""
    if spec.startswith(TINY_PREFIX):
        from tunelab.models.tiny import build_tiny_tokenizer

        _check_tiny(spec)
        return build_tiny_tokenizer()
    if spec.startswith(ASSET_PREFIX):
        spec = str(asset_path(spec[len(ASSET_PREFIX) :]))
    return load_tokenizer(spec, trust_remote_code=trust_remote_code)
