"""Activation memory: gradient checkpointing of one decoder layer in k, and host offload of what the
checkpointed layers keep.

Checkpointing goes through transformers' own switch (``activation_checkpointing_enable``, or
``gradient_checkpointing_enable`` before transformers renamed it): every decoder layer is a
``GradientCheckpointingLayer`` whose ``gradient_checkpointing`` flag says whether it runs under
torch's non-reentrant checkpoint. The switch sets every layer's flag; for one layer in k this module
then clears all but layers 0, k, 2k, ... (the rule of transformers' newer ``every_n_layers``, which
older versions lack). A checkpointed layer keeps only its input and recomputes the rest in backward;
the others keep every activation, so k trades memory back for the recompute's time.

Offload wraps each checkpointed layer's checkpoint call in ``torch.autograd.graph.save_on_cpu``: the
checkpoint stores its input through the saved-tensor hooks in effect, so that input goes to (pinned)
host memory in the forward and comes back when backward recomputes the layer. Inside the layer
torch's checkpoint pushes its own hooks, so nothing else is copied. transformers' ``offload=True`` does the
same but asks for pinned memory even where there is no accelerator (a RuntimeError on a CPU-only
torch), and counts nothing; this module pins only on CUDA and counts the bytes it moved.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import save_on_cpu


class ActivationCheckpointingUnsupported(ValueError):
    """The model has no decoder layers transformers can checkpoint one by one."""


class HostOffload(save_on_cpu):
    """``save_on_cpu`` that counts what it packed (bytes of the tensors sent to host memory)."""

    def __init__(self, device_type: str) -> None:
        # pinned host memory makes the copies asynchronous; only CUDA has a pinned allocator here
        super().__init__(pin_memory=device_type == "cuda", device_type=device_type)
        pack, unpack = self.pack_hook, self.unpack_hook
        self.packed_bytes = 0
        self.packed_tensors = 0

        def counting_pack(tensor: torch.Tensor) -> Any:
            self.packed_bytes += tensor.numel() * tensor.element_size()
            self.packed_tensors += 1
            return pack(tensor)

        self.pack_hook, self.unpack_hook = counting_pack, unpack


@dataclass
class ActivationPlan:
    """What is in effect for a run: which decoder layers are checkpointed, whether their inputs are
    offloaded, and the counter of offloaded bytes (None without offload)."""

    layers: int
    checkpointed: list[int]
    every: int
    offload: bool
    device: str
    offloader: HostOffload | None = None

    def describe(self) -> str:
        """One console line (None-free): what checkpointing and offload do in this run."""
        if not self.checkpointed:
            return "activation checkpointing: off"
        which = "every decoder layer" if self.every == 1 else f"one decoder layer in {self.every}"
        line = (
            f"activation checkpointing: {which} ({len(self.checkpointed)} of {self.layers}: "
            f"layers {_ranges(self.checkpointed)})"
        )
        if self.offload and self.device == "cpu":
            return line + "; offload: nothing to move on the CPU (activations already live in host memory)"
        if self.offload:
            return (
                line
                + f"; their inputs offloaded to host memory ({'pinned' if self.device == 'cuda' else 'pageable'})"
            )
        return line

    def manifest(self) -> dict[str, Any]:
        return {
            "checkpointed_layers": self.checkpointed,
            "decoder_layers": self.layers,
            "checkpoint_every": self.every if self.checkpointed else None,
            "offload_activations": self.offload and self.device != "cpu",
        }


def _ranges(indices: list[int]) -> str:
    return (
        ", ".join(str(i) for i in indices)
        if len(indices) <= 8
        else f"{indices[0]}, {indices[1]}, ..., {indices[-1]}"
    )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules transformers checkpoints one by one, in the order ``every_n_layers`` counts them."""
    from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: PLC0415

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def setup_activation_memory(
    model: nn.Module, *, checkpointing: bool, every: int | None, offload: bool, device: str
) -> ActivationPlan:
    """Turn on checkpointing of one decoder layer in ``every`` (None: all) and, with ``offload``,
    send the checkpointed layers' inputs to host memory. Returns what is in effect."""
    layers = decoder_layers(model)
    device = torch.device(device).type  # "cuda:0" -> "cuda"
    if not checkpointing:
        return ActivationPlan(len(layers), [], 1, False, device)
    every = every or 1
    if not layers and (every > 1 or offload):
        field_name = "checkpoint_every" if every > 1 else "offload_activations"
        raise ActivationCheckpointingUnsupported(
            f"training.{field_name}: {type(model).__name__} has no decoder layers that transformers "
            f"checkpoints one by one; remove training.{field_name} (checkpointing then covers the whole model)"
        )
    _enable_checkpointing(model)
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index % every == 0
    chosen = [i for i, layer in enumerate(layers) if layer.gradient_checkpointing]
    plan = ActivationPlan(len(layers), chosen, every, offload, device)
    if offload:
        plan.offloader = HostOffload(device)
        for i in chosen:
            _offload_inputs(layers[i], plan.offloader)
    return plan


def _enable_checkpointing(model: nn.Module) -> None:
    """Every layer checkpointed, non-reentrant, with input gradients on (a frozen embedding would
    otherwise leave the checkpointed layers' inputs without grad, and LoRA without gradients)."""
    # transformers 5.2x renamed gradient checkpointing to activation checkpointing (the old name
    # warns there); 5.17, the oldest version tunelab supports, has only the old name
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def _offload_inputs(layer: nn.Module, offloader: HostOffload) -> None:
    """Run the layer's checkpoint call under the offload hooks (popped again also when it raises).

    The hooks must be in effect where torch's checkpoint saves the layer's input, and not inside the
    layer, where they would sit above the checkpoint's own hooks and send every activation to host
    memory instead of letting the checkpoint drop it. Module hooks cannot promise that: transformers
    5.17 checkpoints a layer's whole ``__call__``, hooks included (an H200 run moved 1.99 GB where the
    plan counts 33.5 MB), newer versions only its ``forward``. Both call the function transformers
    keeps in ``_gradient_checkpointing_func`` (its documented slot for the checkpoint function), so
    the offload wraps that; the recompute in backward calls the layer itself and copies nothing."""
    checkpoint = layer._gradient_checkpointing_func

    @functools.wraps(checkpoint)
    def offloaded(*args: Any, **kwargs: Any) -> Any:
        with offloader:
            return checkpoint(*args, **kwargs)

    layer._gradient_checkpointing_func = offloaded
