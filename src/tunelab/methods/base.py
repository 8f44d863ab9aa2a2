"""The method contract: which parameters learn.

A method takes a loaded model and its recipe config and returns the model ready to train plus the
optimizer parameter groups. It never knows about the objective (the loss), which keeps the
method × objective matrix open: any method trains with any objective whose model head it can
shape. A method that cannot shape some heads says so in ``model_kinds`` (e.g. virtual-token methods
work on causal LMs only), and the recipe refuses those pairs before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

from tunelab.registry import Registry

if TYPE_CHECKING:  # the recipe schema reads this registry; `recipe check` must not import torch
    import torch
    from torch import nn


class MethodConfig(BaseModel):
    """Base of every method's recipe section; strict so typos fail at the door."""

    # NaN and infinity are no setting (a learning rate of 1e999 is inf): refused at the door
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str


class Hook:
    """Per-step behaviour a method (or LR structure) adds to the loop; every method is a no-op by default.

    ``on_step_start`` runs before the step's forward passes (gradual unfreezing); ``before_zero_grad``
    after ``optimizer.step()`` while gradients still exist (AdaLoRA's rank reallocation);
    ``penalty`` returns a regulariser added once per optimizer step (EWC).
    """

    def on_step_start(self, model: nn.Module, step: int, total_steps: int) -> None:
        return None

    def before_zero_grad(self, model: nn.Module, step: int, total_steps: int) -> None:
        return None

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        return None


@dataclass
class Prepared:
    """A model ready to train, the optimizer groups for its trainable parameters, and its hooks.

    A group may carry an ``lr_scale``: the factors (LoRA+'s B ratio, then layer-wise decay and
    multipliers) its rate is the recipe's learning rate times, applied in that order by
    :func:`with_learning_rates`; groups without one learn at the recipe's rate. Methods never see
    the learning rate itself. ``optimizer`` names the optimizer the method needs (QLoRA's paged
    AdamW); ``notes`` are only printed.
    """

    model: nn.Module
    param_groups: list[dict[str, Any]]
    is_adapter: bool = False
    notes: dict[str, Any] = field(default_factory=dict)
    hooks: list[Hook] = field(default_factory=list)
    optimizer: str = "adamw"


def with_learning_rates(groups: list[dict[str, Any]], learning_rate: float) -> list[dict[str, Any]]:
    """Optimizer groups with each ``lr_scale`` turned into an ``lr``; groups without one are kept as they
    are (they take the optimizer's default, the same rate). The factors multiply one at a time, left
    to right, so the rate is the same float as ``learning_rate * ratio * factor`` computed in order."""
    out = []
    for group in groups:
        if "lr_scale" not in group:
            out.append(group)
            continue
        resolved = {k: v for k, v in group.items() if k != "lr_scale"}
        lr = learning_rate
        for factor in group["lr_scale"]:
            lr = lr * factor
        resolved["lr"] = lr
        out.append(resolved)
    return out


Artifact = Literal["full", "peft", "custom"]


class Apply(Protocol):
    def __call__(self, model: nn.Module, cfg: Any, *, weight_decay: float) -> Prepared: ...


@dataclass(frozen=True)
class MethodSpec:
    """How a method prepares a model and how its result is saved and loaded.

    ``artifact`` says what ``final/`` holds: ``full`` (the whole model, ``save_pretrained``),
    ``peft`` (a PEFT adapter: ``save_pretrained`` on the PeftModel, ``PeftModel.from_pretrained``
    to load) or ``custom`` (the method's own ``save(model, directory)`` and
    ``load(base_model, directory, cfg) -> model``).
    """

    apply: Apply
    artifact: Artifact = "full"
    save: Callable[[nn.Module, Path], None] | None = None
    load: Callable[[nn.Module, Path, Any], nn.Module] | None = None
    model_kinds: tuple[str, ...] | None = None
    """The model heads (an objective's ``model_kind``) this method can train; None: every head.
    The recipe refuses any other objective up front, with ``limitation`` as the reason."""
    limitation: str = ""

    def trains(self, model_kind: str) -> bool:
        return self.model_kinds is None or model_kind in self.model_kinds


METHODS: Registry[MethodSpec] = Registry("method")


def register_method(
    name: str,
    config_cls: type[BaseModel],
    *,
    artifact: Artifact = "full",
    save: Callable[[nn.Module, Path], None] | None = None,
    load: Callable[[nn.Module, Path, Any], nn.Module] | None = None,
    model_kinds: tuple[str, ...] | None = None,
    limitation: str = "",
) -> Callable[[Apply], Apply]:
    """Decorator on a method's ``apply`` function: one line registers the method everywhere.

    ``model_kinds`` limits the method to objectives whose model has one of those heads (e.g.
    ``("causal_lm",)``); ``limitation`` says why, for the recipe error that refuses the others."""
    if artifact == "custom" and (save is None or load is None):
        raise ValueError(f"method '{name}': a custom artifact needs save and load functions")
    if model_kinds is not None and not limitation:
        raise ValueError(f"method '{name}': say why it cannot train other heads (limitation=...)")

    def add(apply: Apply) -> Apply:
        spec = MethodSpec(apply, artifact, save, load, model_kinds, limitation)
        METHODS.register(name, config_cls)(spec)
        return apply

    return add


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


def peft_task_type(model: nn.Module) -> str:
    """PEFT's task type for this model's head: with SEQ_CLS, PEFT also trains and saves the new
    classification head (``score`` / ``classifier``), which a causal-LM config would leave frozen."""
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else "CAUSAL_LM"


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    trainable = total = 0
    for param in model.parameters():
        # a 4-bit (bitsandbytes) weight packs two values per stored element
        n = param.numel() * (2 if type(param).__name__ == "Params4bit" else 1)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
