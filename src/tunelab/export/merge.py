"""A run's ``final/`` as one plain transformers model: the function the run computes, with no PEFT or
tunelab module left in it, so it saves as a standard checkpoint that ``from_pretrained`` loads.

Each artifact kind merges its own way. PEFT adapters (LoRA, DoRA, AdaLoRA, IA3) fold into the base
weights with PEFT's ``merge_and_unload``; full runs and ``freeze`` runs already are plain models.
QLoRA has two choices (``qlora_merge``): ``base16`` (the default) folds the adapter into the original
16/32-bit base, the model users want to ship (full-precision weights, not the NF4 rounding error baked
into every layer); ``dequantized`` folds it into the de-quantised NF4 base, the weights the adapter was
trained against, which reproduces the trained 4-bit model exactly. The export gate measures the choice
against the run and prints the other one next to it. Virtual-token
methods (prompt, prefix, P-tuning) and bottleneck adapters add computation that a plain architecture has
no place for, so they are refused with what to do instead. Everything happens in fp32 on the CPU, where
merging is exact up to rounding; the output dtype is applied by the caller afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from tunelab.evaluate.run import FINAL_META, MODEL_CLASSES, head_kwargs, load_for_eval
from tunelab.methods.blocks import unwrap
from tunelab.models.load import load_model

# Modules from these packages make up a standard checkpoint; anything else (a tunelab wrapper, a
# bitsandbytes layer) means the model would not load with plain transformers.
_PLAIN_PACKAGES = ("torch.", "transformers.")
QLORA_MERGES = ("base16", "dequantized")
# The QLoRA merge `export_run` uses; a context variable so `tunelab export --qlora-merge` reaches the
# merge without threading one more option through every writer.
_QLORA_MERGE: ContextVar[str] = ContextVar("qlora_merge", default="base16")


@contextmanager
def qlora_merge_mode(choice: str) -> Iterator[None]:
    """Merge QLoRA adapters into ``choice`` (``base16`` or ``dequantized``) inside the block."""
    if choice not in QLORA_MERGES:
        raise ValueError(f"QLoRA merge {choice!r}: choose one of {', '.join(QLORA_MERGES)}")
    token = _QLORA_MERGE.set(choice)
    try:
        yield
    finally:
        _QLORA_MERGE.reset(token)


def read_final_meta(final: Path) -> dict[str, Any]:
    return json.loads((final / FINAL_META).read_text(encoding="utf-8"))


def is_peft_folder(final: Path) -> bool:
    """A folder in PEFT's own format (``peft`` artifacts, and QLoRA's custom one). The file names alone
    do not tell: bottleneck adapters use the same two names for their own format, without ``peft_type``."""
    config = final / "adapter_config.json"
    if not (config.is_file() and (final / "adapter_model.safetensors").is_file()):
        return False
    return "peft_type" in json.loads(config.read_text(encoding="utf-8"))


def refuse_prompt_learning(final: Path, meta: dict[str, Any], what: str) -> None:
    """Virtual tokens are extra inputs, not weight deltas: nothing to fold them into."""
    if meta.get("artifact") == "peft" and PeftConfig.from_pretrained(str(final)).is_prompt_learning:
        raise ValueError(
            f"{final}: method '{meta.get('method')}' learns virtual tokens that are prepended to every "
            f"input; they are not a change to any weight, so they cannot be merged into the base model "
            f"and {what} cannot hold them. Export the adapter with --adapter (PEFT loads it with "
            "PeftModel.from_pretrained), or train a mergeable method such as lora."
        )


def merged_model(
    final: Path, *, qlora_merge: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The run's model as a plain transformers model in fp32 on the CPU, with its tokenizer.

    ``qlora_merge`` (QLoRA runs): ``base16`` or ``dequantized``; None takes :func:`qlora_merge_mode`'s."""
    meta = read_final_meta(final)
    refuse_prompt_learning(final, meta, "a merged checkpoint")
    if meta.get("method") == "qlora" and is_peft_folder(final):
        model, tokenizer = _merge_qlora(final, meta, qlora_merge or _QLORA_MERGE.get())
    else:
        model, tokenizer = load_for_eval(str(final), device="cpu", dtype="float32")
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
    require_plain(model, meta.get("method", "?"))
    _ensure_generation_config(model, tokenizer)
    return model.eval(), tokenizer


def require_plain(model: nn.Module, method: str) -> None:
    """Refuse a model that still holds modules a standard checkpoint cannot describe."""
    foreign = [
        (name, type(module))
        for name, module in model.named_modules()
        if not type(module).__module__.startswith(_PLAIN_PACKAGES)
    ]
    if not foreign:
        return
    name, cls = foreign[0]
    raise ValueError(
        f"method '{method}' adds modules that a plain {type(model).__name__} has no place for "
        f"({cls.__module__}.{cls.__name__} at '{name}', {len(foreign)} in all); the nonlinear layers it "
        "inserts cannot be folded into the existing weights, so this run cannot be exported as a merged "
        "model or GGUF, and PEFT has no format for it either. Its final/ folder loads with tunelab "
        "(`tunelab eval RUN`); for a portable export, train a mergeable method (lora, dora, ia3, full, freeze)."
    )


def _merge_qlora(
    final: Path, meta: dict[str, Any], choice: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Fold a QLoRA adapter into the base: the original 16/32-bit weights (``base16``), or the base
    quantised to NF4 exactly as training did and de-quantised (``dequantized``: the trained model
    itself, NF4 rounding error included)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from tunelab.methods import METHODS  # noqa: PLC0415
    from tunelab.methods.qlora import quantize_4bit  # noqa: PLC0415

    cfg = METHODS.get("qlora").config_cls.model_validate(meta["method_config"])
    cfg = cfg.model_copy(update={"compute_dtype": "float32"})
    head = {
        "model_cls": MODEL_CLASSES[meta.get("model_kind", "causal_lm")],
        "model_kwargs": head_kwargs(meta),
    }
    base, _ = load_model(meta["base_model"], device="cpu", dtype="float32", seed=meta.get("seed", 0), **head)
    if choice not in QLORA_MERGES:
        raise ValueError(f"QLoRA merge {choice!r}: choose one of {', '.join(QLORA_MERGES)}")
    if choice == "dequantized":
        base = dequantize_linears(quantize_4bit(base, cfg))
    model = PeftModel.from_pretrained(base, str(final)).merge_and_unload()
    return model, AutoTokenizer.from_pretrained(str(final))


def dequantize_linears(model: PreTrainedModel) -> PreTrainedModel:
    """Replace every bitsandbytes 4-bit linear layer by a dense ``nn.Linear`` with its dequantised weight."""
    import bitsandbytes as bnb  # noqa: PLC0415  (only QLoRA runs get here)

    for name, module in list(model.named_modules()):
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        dense.weight = nn.Parameter(weight.to(torch.float32), requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(module.bias.data.to(torch.float32), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, dense)
    # what quantize_4bit set to mark the model as 4-bit; the model is dense again
    model.is_loaded_in_4bit = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _ensure_generation_config(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """A generating model ships ``generation_config.json`` with the tokenizer's stop and pad ids, so a
    plain ``generate`` stops where the trained model does."""
    base = unwrap(model)
    if not base.can_generate():
        return
    if getattr(base, "generation_config", None) is None:
        base.generation_config = GenerationConfig.from_model_config(base.config)
    generation = base.generation_config
    if generation.eos_token_id is None and tokenizer.eos_token_id is not None:
        generation.eos_token_id = tokenizer.eos_token_id
    if generation.pad_token_id is None and tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
