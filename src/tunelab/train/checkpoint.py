"""Checkpoint contents: trainable weights (safetensors), optimizer, scheduler, RNG and loop state.

Only *trainable* parameters are saved: for adapters that is a few MB instead of the whole model,
and for full fine-tuning it is every weight. Resume loads them back into a freshly prepared model,
so the same code path serves every method.
"""

from __future__ import annotations

import errno
import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from tunelab.runs.rundir import RunDir

WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
RNG = "rng.pt"
STATE = "trainer_state.json"
# Several processes: every rank's RNG (dropout differs per rank), and for FSDP-sharded runs the whole
# optimizer state keyed by parameter name (torch's distributed state-dict API gathers it).
RNG_PER_RANK = "rng_per_rank.pt"
OPTIMIZER_BY_NAME = "optimizer_by_name.pt"
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# How a full disk shows up: OSError ENOSPC/EDQUOT from Python writes, "No space left on device (os error
# 28)" from safetensors, and from torch.save a RuntimeError of its zip writer, e.g. "[enforce fail at
# inline_container.cc:…] . PytorchStreamWriter failed writing file data/0: file write failed".
_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_DISK_FULL_TEXT = (
    "no space left on device",
    "os error 28",
    "inline_container.cc",
    "pytorchstreamwriter failed",
)


class DiskFullError(OSError):
    """A checkpoint (or final/) could not be written because the disk is full; the message says where
    and which complete checkpoint is still there to resume from."""


def is_disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
        return True
    return isinstance(err, (OSError, RuntimeError)) and any(t in str(err).lower() for t in _DISK_FULL_TEXT)


@contextmanager
def reporting_disk_full(run: RunDir, what: str) -> Iterator[None]:
    """Turn a full disk while writing ``what`` into :class:`DiskFullError`. The write goes through
    ``atomic_directory``, whose temporary directory is gone by now, so the earlier checkpoints are
    exactly as they were."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if isinstance(err, DiskFullError) or not is_disk_full(err):
            raise
        last = run.latest_checkpoint()
        intact = (
            f"the last complete checkpoint, {last}, is intact: free some space, then continue with "
            f"`tunelab train --resume {run.path}`"
            if last is not None
            else "no earlier checkpoint exists, so free some space and start the run again"
        )
        detail = " ".join(str(err).split())[:300]
        raise DiskFullError(f"disk full: could not write {what} in {run.path} ({detail}); {intact}") from err


def is_sharded(model: nn.Module) -> bool:
    """True for an FSDP2 (``fully_shard``) model, whose parameters are DTensor shards."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters as whole CPU tensors; sharded ones are gathered, so on an FSDP model
    every rank must call this (in the same order)."""
    with torch.no_grad():
        return {
            n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().contiguous().cpu()
            for n, p in model.named_parameters()
            if p.requires_grad
        }


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
            param = params[name]
            tensor = tensor.to(param.device, param.dtype)
            if isinstance(param, DTensor):  # FSDP2: keep this rank's shard of the whole tensor
                tensor = distribute_tensor(tensor, param.device_mesh, param.placements)
            param.copy_(tensor)


def collect_checkpoint(
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    loop_state: dict[str, Any],
    rng_per_rank: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Everything a checkpoint holds, in memory. On an FSDP model every rank calls this (it gathers
    shards); then only rank 0 passes the result to :func:`write_checkpoint`."""
    sharded = is_sharded(model)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    return {
        WEIGHTS: trainable_state(model),
        OPTIMIZER_BY_NAME if sharded else OPTIMIZER: (
            get_optimizer_state_dict(model, inner, options=_FULL) if sharded else optimizer.state_dict()
        ),
        SCHEDULER: scheduler.state_dict(),
        RNG: capture_rng(),
        RNG_PER_RANK: rng_per_rank,
        STATE: loop_state,
    }


def write_checkpoint(directory: Path, contents: dict[str, Any]) -> None:
    """Write collected checkpoint contents into ``directory`` (the caller makes it atomic)."""
    save_file(contents[WEIGHTS], str(directory / WEIGHTS))
    # RNG states hold Python tuples; pickled by torch.save and read back with weights_only=False
    # from our own run directory only.
    for name in (OPTIMIZER, OPTIMIZER_BY_NAME, SCHEDULER, RNG, RNG_PER_RANK):
        if contents.get(name) is not None:
            torch.save(contents[name], directory / name)
    (directory / STATE).write_text(json.dumps(contents[STATE], indent=2), encoding="utf-8")


def save_checkpoint(
    directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, loop_state: dict[str, Any]
) -> None:
    """Write one checkpoint of a single-process run into ``directory`` (the caller makes it atomic)."""
    write_checkpoint(directory, collect_checkpoint(model, optimizer, scheduler, loop_state))


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: Any, scheduler: Any, rank: int = 0
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG (this ``rank``'s, where each rank's was saved)
    from ``directory``; return the loop state."""
    copy_into_parameters(model, load_file(str(directory / WEIGHTS)), f"checkpoint {directory}")
    if (directory / OPTIMIZER_BY_NAME).exists():
        inner = getattr(optimizer, "optimizer", optimizer)
        state = torch.load(directory / OPTIMIZER_BY_NAME, weights_only=True)
        set_optimizer_state_dict(model, inner, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER, weights_only=True))
    scheduler.load_state_dict(torch.load(directory / SCHEDULER, weights_only=True))
    per_rank = directory / RNG_PER_RANK
    states = torch.load(per_rank, weights_only=False) if per_rank.exists() else None
    restore_rng(
        states[rank] if states and rank < len(states) else torch.load(directory / RNG, weights_only=False)
    )
    return json.loads((directory / STATE).read_text(encoding="utf-8"))
