"""Checkpoint contents: trainable weights (safetensors), optimizer, scheduler, RNG and loop state.

Only *trainable* parameters are saved: for adapters that is a few MB instead of the whole model,
and for full fine-tuning it is every weight. Resume loads them back into a freshly prepared model,
so the same code path serves every method.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
STATE = "trainer_state.json"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def capture_rng() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def copy_into_parameters(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved tensors into the model's parameters of the same names (device and dtype kept)."""
    params = dict(model.named_parameters())
    unknown = [n for n in tensors if n not in params]
    if unknown:
        raise ValueError(f"{source} does not match the model: unknown parameters {unknown[:3]}")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, loop_state: dict[str, Any]
) -> None:
    """Write one checkpoint into ``directory`` (the caller makes it atomic)."""
    save_file(trainable_state(model), str(directory / WEIGHTS))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER)
    torch.save(scheduler.state_dict(), directory / SCHEDULER)
    # RNG states hold Python tuples; pickled by torch.save and read back with weights_only=False
    # from our own run directory only.
    torch.save(capture_rng(), directory / RNG)
    (directory / STATE).write_text(json.dumps(loop_state, indent=2), encoding="utf-8")


def load_checkpoint(directory: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``directory``; return the loop state."""
    copy_into_parameters(model, load_file(str(directory / WEIGHTS)), f"checkpoint {directory}")
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER, weights_only=True))
    scheduler.load_state_dict(torch.load(directory / SCHEDULER, weights_only=True))
    restore_rng(torch.load(directory / RNG, weights_only=False))
    return json.loads((directory / STATE).read_text(encoding="utf-8"))
