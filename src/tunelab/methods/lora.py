"""LoRA through PEFT: low-rank adapters on chosen linear layers, base weights frozen.

One config covers the LoRA family: DoRA (``use_dora``, also registered as method ``dora``),
rank-stabilised scaling (``use_rslora``), PiSSA / OLoRA initialisation (``init``), fully trained
extra modules (``modules_to_save``) and LoRA+ (``loraplus_lr_ratio``).
"""

from __future__ import annotations

import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from tunelab.methods.base import MethodConfig, Prepared, decay_groups, peft_task_type, register_method

if TYPE_CHECKING:  # the config class is part of the recipe schema, which loads without the ML stack
    from peft import LoraConfig as PeftLoraConfig
    from torch import nn

# Our names for PEFT's ``init_lora_weights``. "pissa" is PEFT's exact SVD (not the randomised
# "pissa_niter_k") and OLoRA's QR is deterministic too, so even PEFT's plain save of such an adapter
# reloads exactly (``from_pretrained`` re-runs the decomposition on the untouched base); ``save_lora``
# goes further and writes an ordinary LoRA that leaves the base alone (see there).
_INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora"}
# Inits (ours, or PEFT's ``init_lora_weights`` values such as "pissa_niter_4") that move part of the
# base weights into the adapter; tunelab offers pissa and olora, PEFT also corda and loftq.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def rewrites_base(init: object) -> bool:
    """True when the init moves part of the base weights into the adapter: with the adapter switched
    off, such a model is not the one training started from (DPO's reference), and saving it as a plain
    adapter needs the conversion in ``save_lora``."""
    return isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS)


# PiSSA/OLoRA runs: the adapter as initialised, which ``save_lora`` subtracts; kept for the model's lifetime
_INITIAL_ADAPTERS: weakref.WeakKeyDictionary[nn.Module, tempfile.TemporaryDirectory] = (
    weakref.WeakKeyDictionary()
)


class LoraConfig(MethodConfig):
    name: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="scaling numerator; effective scale is alpha / r")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="dropout on the adapter input; 0 by default: with dropout PEFT keeps a dropped copy of "
        "every adapted layer's input, which doubled the CPU step time of SmolLM2-135M in our measurement",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or module names such as [q_proj, v_proj]"
    )
    bias: Literal["none", "all", "lora_only"] = "none"
    use_dora: bool = Field(
        False, description="DoRA: learn a per-column magnitude on top of the LoRA direction"
    )
    use_rslora: bool = Field(False, description="rank-stabilised scale alpha / sqrt(r) instead of alpha / r")
    init: Literal["default", "gaussian", "pissa", "olora"] = Field(
        "default",
        description="default: Kaiming-uniform A, zero B; gaussian: Gaussian A; pissa / olora: A and B from "
        "the base weight's SVD / QR (the base keeps the residual, so the start is unchanged)",
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved with the adapter, e.g. [lm_head]"
    )
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: the B matrices learn at learning_rate × this ratio (16 in the paper)"
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one module name, or 'all-linear'")
        return value

    @model_validator(mode="after")
    def _convertible(self) -> LoraConfig:
        if rewrites_base(self.init) and (self.use_dora or self.modules_to_save):
            extra = "use_dora" if self.use_dora else "modules_to_save"
            raise ValueError(
                f"method.init: {self.init} is saved as a plain LoRA (A·B minus its starting value), which has no "
                f"place for method.{extra}; use init: default or gaussian with {extra}"
            )
        return self


class DoraConfig(LoraConfig):
    """DoRA as its own method name: LoRA with weight decomposition switched on."""

    name: Literal["dora"] = "dora"  # type: ignore[assignment]
    use_dora: bool = True


def peft_config(cfg: LoraConfig, task_type: str = "CAUSAL_LM") -> PeftLoraConfig:
    """Translate our recipe section into PEFT's config (PEFT owns the layers and the file format)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        use_dora=cfg.use_dora,
        use_rslora=cfg.use_rslora,
        init_lora_weights=_INIT[cfg.init],
        modules_to_save=cfg.modules_to_save,
        task_type=task_type,
    )


def loraplus_groups(
    groups: list[dict[str, Any]], model: nn.Module, ratio: float | None
) -> list[dict[str, Any]]:
    """Split each group so the LoRA B matrices learn at the recipe's rate × ratio (``lr_scale``).

    LoRA+ (Hayou et al., 2024): with B initialised at zero, A and B play different roles and a larger
    step for B speeds up feature learning. Same split as PEFT's ``create_loraplus_optimizer``, returned
    as groups so the engine keeps owning the optimizer.
    """
    if ratio is None:
        return groups
    is_b = {id(p) for n, p in model.named_parameters() if "lora_B" in n or "lora_embedding_B" in n}
    split = []
    for group in groups:
        others = [p for p in group["params"] if id(p) not in is_b]
        b_params = [p for p in group["params"] if id(p) in is_b]
        if others:
            split.append({**group, "params": others})
        if b_params:
            split.append(
                {
                    **group,
                    "params": b_params,
                    "lr_scale": (ratio,),
                    "group": f"{group['group']}_lora_B",
                }
            )
    return split


def attach_lora(model: nn.Module, cfg: LoraConfig) -> nn.Module:
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, peft_config(cfg, peft_task_type(model)))
    except ValueError as err:
        raise ValueError(f"method.target_modules: {err}") from err
    if rewrites_base(cfg.init):
        initial = tempfile.TemporaryDirectory(prefix="tunelab-initial-adapter-")
        peft_model.save_pretrained(Path(initial.name) / "initial", safe_serialization=True)
        _INITIAL_ADAPTERS[peft_model] = initial
    return peft_model


def save_lora(model: nn.Module, directory: Path) -> None:
    """Save the adapter so that it applies to the *original* base model.

    PiSSA and OLoRA move the adapter's starting value out of the base weights (W = W_res + B0·A0).
    Saved as is, loading re-decomposes the base, so such an adapter cannot share a base with other
    adapters or be served by tools that only know LoRA. PEFT's ``path_initial_model_for_weight_conversion``
    instead stores ΔW = B·A − B0·A0 as an ordinary LoRA of rank 2r, which any PEFT loader applies to
    the untouched base. Other inits save unchanged.
    """
    initial = _INITIAL_ADAPTERS.get(model)
    if initial is None:
        model.save_pretrained(directory, safe_serialization=True)
        return
    model.save_pretrained(
        directory,
        safe_serialization=True,
        path_initial_model_for_weight_conversion=str(Path(initial.name) / "initial"),
    )


@register_method("lora", LoraConfig, artifact="peft", save=save_lora)
def apply_lora(model: nn.Module, cfg: LoraConfig, *, weight_decay: float) -> Prepared:
    peft_model = attach_lora(model, cfg)
    groups = loraplus_groups(decay_groups(peft_model, weight_decay), peft_model, cfg.loraplus_lr_ratio)
    return Prepared(model=peft_model, param_groups=groups, is_adapter=True)


@register_method("dora", DoraConfig, artifact="peft", save=save_lora)
def apply_dora(model: nn.Module, cfg: DoraConfig, *, weight_decay: float) -> Prepared:
    return apply_lora(model, cfg, weight_decay=weight_decay)
