"""AdaLoRA through PEFT: SVD-shaped adapters whose rank budget moves to the layers that need it.

Every adapted layer starts at rank ``init_r``; after ``tinit`` warm-up steps the total budget shrinks
on a cubic schedule to ``target_r`` per layer on average, reallocated every ``deltaT`` steps by
importance, and stays fixed for the last ``tfinal`` steps. PEFT needs the run's length
(``total_step``) when the adapter is created, but only the engine knows it: the adapter is created
with a placeholder and :class:`AdaLoraHook` writes the real length before the first step (PEFT reads
it live from the config, and the saved ``adapter_config.json`` records the real value).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from tunelab.methods.base import Hook, MethodConfig, Prepared, decay_groups, peft_task_type, register_method

if TYPE_CHECKING:  # the config class is part of the recipe schema, which loads without the ML stack
    import torch
    from peft import AdaLoraConfig as PeftAdaLoraConfig
    from torch import nn


class AdaLoraConfig(MethodConfig):
    name: Literal["adalora"] = "adalora"
    init_r: int = Field(12, ge=1, description="initial rank of every adapted layer")
    target_r: int = Field(8, ge=1, description="average rank per layer once the budget has shrunk")
    tinit: int = Field(0, ge=0, description="warm-up steps at full rank before the budget starts to shrink")
    tfinal: int = Field(0, ge=0, description="final steps with the rank pattern frozen")
    deltaT: int = Field(1, ge=1, description="steps between two rank reallocations")
    beta1: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance (sensitivity) score")
    beta2: float = Field(0.85, gt=0, lt=1, description="EMA factor of the importance uncertainty")
    orth_reg_weight: float = Field(0.5, ge=0, description="weight of the orthogonality penalty on A and B")
    alpha: float = Field(32.0, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field("all-linear", description="'all-linear' or module names")

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one module name, or 'all-linear'")
        return value


class AdaLoraHook(Hook):
    """Sets the schedule's length, adds the orthogonality penalty, and reallocates ranks each step."""

    def __init__(self, adapter: str = "default") -> None:
        self.adapter = adapter

    def on_step_start(self, model: nn.Module, step: int, total_steps: int) -> None:
        config = model.peft_config[self.adapter]
        if config.total_step != total_steps:
            if config.tinit >= total_steps - config.tfinal:
                raise ValueError(
                    f"method.tinit ({config.tinit}) + method.tfinal ({config.tfinal}) leave no step of the "
                    f"{total_steps}-step run to reallocate ranks; lower them or train longer"
                )
            config.total_step = total_steps

    def before_zero_grad(self, model: nn.Module, step: int, total_steps: int) -> None:
        model.base_model.update_and_allocate(step)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """PEFT adds this inside ``forward`` only when the model computes the loss from ``labels``;
        tunelab's objectives compute their own loss, so it comes in here (same formula)."""
        import torch

        weight = model.peft_config[self.adapter].orth_reg_weight
        terms = []
        for name, param in model.named_parameters():
            if param.requires_grad and ("lora_A" in name or "lora_B" in name) and self.adapter in name:
                cov = param @ param.T if "lora_A" in name else param.T @ param
                terms.append(
                    torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype))
                )
        if not terms or weight == 0:
            return None
        return weight * torch.stack(terms).mean()


def peft_config(cfg: AdaLoraConfig, task_type: str = "CAUSAL_LM") -> PeftAdaLoraConfig:
    from peft import AdaLoraConfig as PeftAdaLoraConfig

    return PeftAdaLoraConfig(
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        tinit=cfg.tinit,
        tfinal=cfg.tfinal,
        deltaT=cfg.deltaT,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        total_step=cfg.tinit + cfg.tfinal + 1,  # placeholder; AdaLoraHook sets the run's real length
        task_type=task_type,
    )


@register_method("adalora", AdaLoraConfig, artifact="peft")
def apply_adalora(model: nn.Module, cfg: AdaLoraConfig, *, weight_decay: float) -> Prepared:
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, peft_config(cfg, peft_task_type(model)))
    except ValueError as err:
        raise ValueError(f"method.target_modules: {err}") from err
    return Prepared(
        model=peft_model,
        param_groups=decay_groups(peft_model, weight_decay),
        is_adapter=True,
        hooks=[AdaLoraHook()],
    )
