"""Learning-rate structure that applies to any method: layer-wise decay, per-group multipliers,
gradual unfreezing.

It only reshapes what the method made trainable: groups are split by where each parameter sits
(block i, embeddings, head, norm) and given their own ``lr_scale`` (a factor of the recipe's rate); the unfreezing hook only toggles
parameters the method already trains, so a frozen base weight never becomes trainable.

- ``layerwise_lr_decay`` d: block i of n gets ``lr × d^(n-1-i)`` (top block ×1), the embeddings
  ``lr × d^n`` (one step below the bottom block), the head, final norm and anything outside the
  blocks (prompt encoders) ×1. A tied head *is* the embedding matrix and gets the embeddings' rate.
- ``lr_multipliers`` {embeddings, head, norm}: multiply on top (``norm`` covers every normalisation
  weight, inside blocks too).
- ``gradual_unfreeze_every`` K (ULMFiT): at step 0 only the top block with trainable parameters,
  plus the head, final norm and the rest outside the blocks, trains; every K steps one more block
  from the top is unfrozen; the embeddings come last. Blocks where the method trains nothing are
  skipped, so every K steps something new learns.

Per-group rates survive the schedule: ``LambdaLR`` (every transformers scheduler) stores each
group's ``lr`` as its ``initial_lr`` and scales it, so the ratios between groups hold throughout.
Groups are ordered by rate, highest first, so the logged ``lr`` (group 0) is the top rate.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from tunelab.methods.base import Hook, Prepared
from tunelab.methods.blocks import Layout, layout


def structure_learning_rates(prepared: Prepared, training: Any) -> Prepared:
    """Return ``prepared`` with param groups / hooks reshaped by the recipe's ``training`` section;
    unchanged (the same object) when no LR-structure field is set."""
    decay = training.layerwise_lr_decay
    multipliers = dict(training.lr_multipliers or {})
    every = training.gradual_unfreeze_every
    if decay is None and not multipliers and every is None:
        return prepared
    try:
        where = layout(prepared.model)
    except ValueError as err:
        raise ValueError(f"training.layerwise_lr_decay / gradual_unfreeze_every: {err}") from err
    if where.tied and (decay is not None or "head" in multipliers):
        warnings.warn(
            "training: the model ties its head to the input embeddings; the shared matrix learns at the "
            "embeddings' rate (layerwise_lr_decay^n_blocks × lr_multipliers.embeddings), not the head's",
            stacklevel=2,
        )
    if decay is not None or multipliers:
        prepared.param_groups = split_groups(prepared.param_groups, where, decay or 1.0, multipliers)
    if every is not None:
        prepared.hooks = [*prepared.hooks, GradualUnfreeze(unfreeze_units(prepared, where), every)]
    prepared.notes["lr_structure"] = {
        "layerwise_lr_decay": decay,
        "lr_multipliers": multipliers,
        "gradual_unfreeze_every": every,
    }
    return prepared


def lr_factor(param: nn.Parameter, where: Layout, decay: float, multipliers: dict[str, float]) -> float:
    """The multiplier of the base learning rate for one parameter."""
    part, index = where.of(param)
    factor = {"block": decay ** (where.n_blocks - 1 - index), "embeddings": decay**where.n_blocks}.get(
        part, 1.0
    )
    factor *= multipliers.get(part, 1.0) if part in ("embeddings", "head") else 1.0
    if id(param) in where.norm:
        factor *= multipliers.get("norm", 1.0)
    return factor


def split_groups(
    groups: list[dict[str, Any]], where: Layout, decay: float, multipliers: dict[str, float]
) -> list[dict[str, Any]]:
    """Split each group by rate, keeping its other keys (weight decay, name); the parameter's factor is
    appended to the group's ``lr_scale`` (after LoRA+'s ratio, the order the rate was always
    multiplied in). Highest factor first (stable)."""
    out: list[tuple[float, dict[str, Any]]] = []
    for group in groups:
        by_factor: dict[float, list[nn.Parameter]] = {}
        for param in group["params"]:
            by_factor.setdefault(lr_factor(param, where, decay, multipliers), []).append(param)
        for factor, params in by_factor.items():
            name = f"{group.get('group', 'group')}@x{factor:.6g}"
            out.append(
                (
                    factor,
                    {
                        **group,
                        "params": params,
                        "lr_scale": (*group.get("lr_scale", ()), factor),
                        "group": name,
                    },
                )
            )
    out.sort(key=lambda item: -item[0])
    return [group for _, group in out]


def unfreeze_units(prepared: Prepared, where: Layout) -> list[list[nn.Parameter]]:
    """The method's trainable parameters in unfreezing order: [top block + head + rest], the blocks
    below it one by one, then the embeddings. Empty units (blocks the method leaves frozen) are dropped."""
    trainable = [p for group in prepared.param_groups for p in group["params"]]
    blocks: list[list[nn.Parameter]] = [[] for _ in range(where.n_blocks)]
    top: list[nn.Parameter] = []
    embeddings: list[nn.Parameter] = []
    for param in trainable:
        part, index = where.of(param)
        if part == "block":
            blocks[index].append(param)
        else:
            (embeddings if part == "embeddings" else top).append(param)
    ordered = [b for b in reversed(blocks) if b]
    units = [top + (ordered[0] if ordered else []), *ordered[1:], embeddings]
    return [unit for unit in units if unit]


class GradualUnfreeze(Hook):
    """Before step s, units ``0 .. s // every`` train and the rest are frozen (a pure function of s,
    so a resumed run lands in the same state)."""

    def __init__(self, units: list[list[nn.Parameter]], every: int) -> None:
        self.units = units
        self.every = every

    def on_step_start(self, model: nn.Module, step: int, total_steps: int) -> None:
        open_units = 1 + step // self.every
        for i, unit in enumerate(self.units):
            for param in unit:
                param.requires_grad_(i < open_units)
