"""Continual learning: learn a new task without forgetting the previous one.

Two standard remedies, usable together:

- **EWC** (Kirkpatrick et al., 2017): before training on the new task, estimate how much each
  trainable parameter mattered for the previous task (the diagonal Fisher information, from
  squared gradients of its loss) and anchor the parameters there; the loss gains
  ``lambda/2 · Σ F·(θ − θ*)²``, so important weights move little and unimportant ones are free.
- **Replay**: mix a fraction of the previous task's examples into the new training set.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from tunelab.methods.base import Hook

T = TypeVar("T")


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def estimate_fisher(
    model: nn.Module,
    objective: Any,
    features: Sequence[dict[str, Any]],
    batch_size: int = 1,
    n_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the trainable parameters: squared loss gradients averaged over batches.

    ``features`` are the previous task's encoded examples (``objective.encode`` output), taken in
    order. ``batch_size=1`` gives the per-example empirical Fisher; larger batches are cheaper but
    square an averaged gradient, which underestimates it. ``n_batches=None`` uses every example.
    The model's gradients are left cleared and its train/eval mode restored.
    """
    params = _trainable(model)
    if not params:
        raise ValueError("EWC: the model has no trainable parameters to anchor")
    starts = list(range(0, len(features), batch_size))[:n_batches]
    if not starts:
        raise ValueError("EWC: no examples of the previous task to estimate the Fisher information from")
    device = next(iter(params.values())).device
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the deterministic model
    for start in starts:
        model.zero_grad(set_to_none=True)
        batch = {
            k: v.to(device) for k, v in objective.collate(list(features[start : start + batch_size])).items()
        }
        out = objective.loss(model, batch)
        (out.loss_sum / out.n_units.clamp(min=1)).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach().float() ** 2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {name: f / len(starts) for name, f in fisher.items()}


class EwcHook(Hook):
    """Adds ``lambda/2 · Σ F·(θ − θ*)²`` to the loss once per optimizer step.

    ``anchor`` (θ*) is a copy of the trainable parameters taken when the hook is built, so build it
    on the model as it starts the new task (after the previous task's training).
    """

    def __init__(self, model: nn.Module, fisher: dict[str, torch.Tensor], lam: float) -> None:
        if lam < 0:
            raise ValueError(f"EWC lambda must be >= 0, got {lam}")
        params = _trainable(model)
        missing = sorted(set(fisher) - set(params))
        if missing:
            raise ValueError(f"EWC: Fisher given for parameters the model does not train: {missing[:3]}")
        self.lam = lam
        self.fisher = fisher
        self.anchor = {name: params[name].detach().clone() for name in fisher}

    @classmethod
    def from_previous_task(
        cls,
        model: nn.Module,
        objective: Any,
        features: Sequence[dict[str, Any]],
        lam: float,
        *,
        batch_size: int = 1,
        n_batches: int | None = None,
    ) -> EwcHook:
        """Estimate the Fisher on the previous task's features and anchor at the current weights."""
        return cls(model, estimate_fisher(model, objective, features, batch_size, n_batches), lam)

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        if self.lam == 0:
            return None
        params = dict(model.named_parameters())
        total = sum(
            (
                self.fisher[n].to(params[n].device) * (params[n] - self.anchor[n].to(params[n].device)) ** 2
            ).sum()
            for n in self.fisher
        )
        return 0.5 * self.lam * total


def mix_replay(new: Sequence[T], old: Sequence[T], fraction: float, seed: int = 0) -> list[T]:
    """All of ``new`` plus old examples making up ``fraction`` of the result, shuffled, deterministic.

    Old examples are drawn without replacement, then cycled if more are needed than exist (a small
    previous set replayed into a big new one).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    if fraction > 0 and not old:
        raise ValueError("replay: the previous task's data is empty")
    n_old = replay_count(len(new), fraction)
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < n_old:
        cycle = list(range(len(old)))
        rng.shuffle(cycle)
        order += cycle
    mixed = list(new) + [old[i] for i in order[:n_old]]
    rng.shuffle(mixed)
    return mixed


def replay_count(n_new: int, fraction: float) -> int:
    """How many old examples :func:`mix_replay` adds to ``n_new`` new ones."""
    return round(fraction / (1 - fraction) * n_new) if fraction else 0


__all__ = ["EwcHook", "estimate_fisher", "mix_replay", "replay_count"]
