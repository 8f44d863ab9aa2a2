"""Full fine-tuning: every parameter learns."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from tunelab.methods.base import MethodConfig, Prepared, decay_groups, register_method

if TYPE_CHECKING:
    from torch import nn


class FullConfig(MethodConfig):
    name: Literal["full"] = "full"
    freeze_embeddings: bool = False
    """Keep input embeddings fixed; saves optimizer memory on large vocabularies."""


@register_method("full", FullConfig, artifact="full")
def apply_full(model: nn.Module, cfg: FullConfig, *, weight_decay: float) -> Prepared:
    for param in model.parameters():
        param.requires_grad_(True)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return Prepared(model=model, param_groups=decay_groups(model, weight_decay))
