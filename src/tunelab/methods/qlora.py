"""QLoRA: the frozen base in 4-bit NF4 with double quantisation, LoRA adapters trained in 16/32-bit.

The engine hands ``apply`` an already loaded model, so the base is quantised in place: every
``nn.Linear`` that transformers would quantise (its own ``replace_with_bnb_linear`` and skip list,
so ``lm_head`` stays dense) becomes a bitsandbytes ``Linear4bit`` whose ``Params4bit`` is built from
the loaded weight, exactly what ``from_pretrained(quantization_config=...)`` does per tensor. Why in
place rather than re-loading from ``model.name_or_path``: it works the same for a model built from
config (the tiny test model has no path) and for a real model directory, it never reads the weights
twice, and each dense weight is freed as soon as its 4-bit copy exists. NF4 quantisation is
deterministic, so ``load`` re-quantises the same base and the saved adapter reproduces the trained
model's logits exactly, on any CPU (bitsandbytes' AVX512-BF16 eval repacking is turned off per layer).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tunelab.methods.base import Prepared, decay_groups, register_method
from tunelab.methods.lora import LoraConfig, attach_lora, loraplus_groups

if TYPE_CHECKING:  # the config class is part of the recipe schema, which loads without the ML stack
    import torch
    from torch import nn


class QLoraConfig(LoraConfig):
    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="dtype of the 4-bit matmuls; auto: bf16 on GPUs with it, fp16 on older GPUs, fp32 on CPU",
    )
    double_quant: bool = Field(
        True, description="quantise the quantisation constants too (~0.4 bit/param saved)"
    )
    optimizer: Literal["adamw", "paged_adamw_8bit", "paged_adamw_32bit"] = Field(
        "adamw",
        description="paged AdamW (bitsandbytes) moves optimizer state to CPU under GPU memory pressure",
    )

    @model_validator(mode="after")
    def _plain_init(self) -> QLoraConfig:
        if self.init in ("pissa", "olora"):
            raise ValueError(
                f"method.init: {self.init} rewrites the base weights, which are 4-bit here; use init: default "
                "or gaussian with qlora, or train pissa/olora with method.name: lora"
            )
        return self


def compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    import torch

    if choice != "auto":
        return getattr(torch, choice)  # bfloat16, float16 or float32: the config's Literal
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def require_4bit(device: torch.device) -> None:
    """Fail early, naming the alternative, where bitsandbytes cannot quantise on this device."""
    import torch

    try:
        import bitsandbytes as bnb  # noqa: PLC0415  (optional dependency)

        bnb.functional.quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
    except Exception as err:  # noqa: BLE001  (any failure means "no 4-bit here")
        raise RuntimeError(
            f"method qlora needs 4-bit bitsandbytes kernels on {device.type}, and they are unavailable here "
            f"({type(err).__name__}: {err}). Install bitsandbytes with a backend for this device (CUDA, or its "
            "CPU backend), or use method.name: lora, which trains the same adapters on a 16/32-bit base."
        ) from err


def _no_cpu_repack(layer: nn.Module) -> None:
    """Keep a ``Linear4bit`` on the one CPU path that training uses, on every CPU.

    On CPUs with AVX512-BF16, bitsandbytes (0.49 on) repacks a layer's 4-bit weight in place on its
    first eval-mode, no-grad forward: the frozen weight's bytes change, the absmax constants are rounded
    to bf16, activations are cast to bf16, and later training steps multiply by the repacked weight
    outside bitsandbytes' autograd function. Saving unpacks it again, re-quantising the double-quant
    constants from the rounded values (weights off by up to 2.5e-2; without double quant the constants
    come back transposed). So evaluation computes other logits than training and than a reloaded
    adapter, and the base drifts on every eval/save.
    ``support_avx512bf16_for_cpu`` is the layer's own switch for that path; off, the CPU path is the
    same dequantise-and-matmul everywhere, and the frozen base stays bit-identical.
    """
    layer.support_avx512bf16_for_cpu = False


def quantize_4bit(model: nn.Module, cfg: QLoraConfig) -> nn.Module:
    """Replace the model's linear layers by NF4 ``Linear4bit`` layers holding the same weights, in place."""
    import bitsandbytes as bnb  # noqa: PLC0415
    from peft import prepare_model_for_kbit_training
    from torch import nn
    from transformers import BitsAndBytesConfig  # noqa: PLC0415
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear  # noqa: PLC0415
    from transformers.quantizers.auto import AutoHfQuantizer  # noqa: PLC0415

    device = next(model.parameters()).device
    require_4bit(device)
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=compute_dtype(cfg.compute_dtype, device),
    )
    quantizer = AutoHfQuantizer.from_config(bnb_config)
    skip = quantizer.get_modules_to_not_convert(
        model, bnb_config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None)
    )
    dense = {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=bnb_config)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            source = dense[name]
            weight = source.weight.data
            module.weight = bnb.nn.Params4bit(weight, requires_grad=False, **module.weight.__dict__).to(
                weight.device
            )
            if source.bias is not None:
                module.bias = source.bias
            _no_cpu_repack(module)
    del dense
    # what from_pretrained(quantization_config=...) leaves behind; PEFT reads is_loaded_in_4bit to pick
    # its 4-bit LoRA layer, and the config records how the base was quantised
    model.is_loaded_in_4bit = True
    model.config.quantization_config = bnb_config
    # norms, embeddings and head in fp32 and the base frozen (PEFT's k-bit preparation); gradient
    # checkpointing and its input-grads hook stay the recipe's choice (training.gradient_checkpointing)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def save_qlora(model: nn.Module, directory: Path) -> None:
    """Only the adapter: the 4-bit base is re-derived from the base model on load."""
    model.save_pretrained(directory, safe_serialization=True)


def load_qlora(base: nn.Module, directory: Path, cfg: QLoraConfig) -> nn.Module:
    """Quantise the base exactly as training did, then attach the adapter (identical logits)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(quantize_4bit(base, cfg), str(directory)).eval()


@register_method("qlora", QLoraConfig, artifact="custom", save=save_qlora, load=load_qlora)
def apply_qlora(model: nn.Module, cfg: QLoraConfig, *, weight_decay: float) -> Prepared:
    peft_model = attach_lora(quantize_4bit(model, cfg), cfg)
    groups = loraplus_groups(decay_groups(peft_model, weight_decay), peft_model, cfg.loraplus_lr_ratio)
    notes: dict[str, Any] = {
        "optimizer": cfg.optimizer,  # printed; the optimizer itself is chosen by Prepared.optimizer
        "quantization": "nf4" + ("+double-quant" * cfg.double_quant),
    }
    return Prepared(
        model=peft_model, param_groups=groups, is_adapter=True, notes=notes, optimizer=cfg.optimizer
    )
