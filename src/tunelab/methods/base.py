"""The method contract: which parameters learn.

A method takes a loaded model and its recipe config and returns the model ready to train plus the
optimizer parameter groups. It never knows about the objective (the loss), which keeps the
method × objective matrix open: any method trains with any objective.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict
from torch import nn

from tunelab.registry import Registry


class MethodConfig(BaseModel):
    """Base of every method's recipe section; strict so typos fail at the door."""

    model_config = ConfigDict(extra="forbid")
    name: str


@dataclass
class Prepared:
    """A model ready to train and the optimizer groups for its trainable parameters."""

    model: nn.Module
    param_groups: list[dict[str, Any]]
    is_adapter: bool = False
    notes: dict[str, Any] = field(default_factory=dict)


class Method(Protocol):
    def __call__(self, model: nn.Module, cfg: Any, *, weight_decay: float) -> Prepared: ...


METHODS: Registry[Method] = Registry("method")

_NO_DECAY_HINTS = ("bias", "norm", "ln_", "layernorm")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable parameters into decayed and non-decayed groups.

    Biases and normalisation weights are not decayed: decaying them pulls scales towards zero,
    which hurts and is what every major trainer avoids.
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        lowered = name.lower()
        skip = param.ndim < 2 or any(h in lowered for h in _NO_DECAY_HINTS)
        (no_decay if skip else decay).append(param)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "group": "decay"})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "group": "no_decay"})
    return groups


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    trainable = total = 0
    for param in model.parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
