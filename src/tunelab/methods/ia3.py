"""(IA)³ through PEFT: learned vectors that rescale keys, values and the MLP's inner activations.

A few thousand parameters per layer, starting at ones (the base model unchanged), mergeable into
the base weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tunelab.methods.base import MethodConfig, Prepared, decay_groups, peft_task_type, register_method

if TYPE_CHECKING:  # the config class is part of the recipe schema, which loads without the ML stack
    from peft import IA3Config as PeftIA3Config
    from torch import nn


class IA3Config(MethodConfig):
    name: Literal["ia3"] = "ia3"
    target_modules: str | list[str] | None = Field(
        None, description="modules to rescale; default: PEFT's choice for the architecture (k, v, MLP down)"
    )
    feedforward_modules: list[str] | None = Field(
        None,
        description="those of target_modules whose input (not output) is rescaled; default: PEFT's choice",
    )
    modules_to_save: list[str] | None = Field(
        None, description="modules trained in full and saved with the adapter"
    )

    @model_validator(mode="after")
    def _feedforward_targeted(self) -> IA3Config:
        if self.feedforward_modules is not None:
            if not isinstance(self.target_modules, list):
                raise ValueError("method.feedforward_modules needs method.target_modules as a list of names")
            missing = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if missing:
                raise ValueError(
                    f"method.feedforward_modules {missing} must also be in method.target_modules"
                )
        return self


def peft_config(cfg: IA3Config, task_type: str = "CAUSAL_LM") -> PeftIA3Config:
    from peft import IA3Config as PeftIA3Config

    return PeftIA3Config(
        target_modules=cfg.target_modules,
        feedforward_modules=cfg.feedforward_modules,
        modules_to_save=cfg.modules_to_save,
        task_type=task_type,
    )


@register_method("ia3", IA3Config, artifact="peft")
def apply_ia3(model: nn.Module, cfg: IA3Config, *, weight_decay: float) -> Prepared:
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, peft_config(cfg, peft_task_type(model)))
    except ValueError as err:
        raise ValueError(f"method.target_modules: {err}") from err
    return Prepared(model=peft_model, param_groups=ia3_groups(peft_model, weight_decay), is_adapter=True)


def ia3_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The scaling vectors are never decayed: they start at 1 ("unchanged"), and decay pulls them towards 0,
    i.e. towards switching the layer off. Other trainable parameters (``modules_to_save``) decay as usual."""
    vectors = {id(p): p for n, p in model.named_parameters() if p.requires_grad and "ia3_l" in n}
    groups = []
    for group in decay_groups(model, weight_decay):
        rest = [p for p in group["params"] if id(p) not in vectors]
        if rest:
            groups.append({**group, "params": rest})
    return [*groups, {"params": list(vectors.values()), "weight_decay": 0.0, "group": "ia3_vectors"}]
