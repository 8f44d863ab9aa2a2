"""Two compute levers of the fast path: regional ``torch.compile`` and Liger's Triton kernels.

``training.compile: true`` compiles each decoder layer in place (``layer.compile()``), after the method
(LoRA) and checkpointing shaped the model: the repeated block is the whole of a decoder's compute
outside the head, and torch reuses one layer's compiled code for every layer of the same class, so
compile time is one layer's (per layer type), not the whole model's. The first steps pay for it;
its extra time is measured and reported (console and manifest).

``training.kernels`` chooses Liger's kernels (RMSNorm, SwiGLU, RoPE, fused linear cross-entropy),
applied through Liger's public ``apply_liger_kernel_to_<model_type>(model=...)`` for the model's type.
``auto`` takes them only where they run (installed, CUDA, a supported type) and otherwise says why it
did not; ``liger`` where they cannot run is refused with the reason. Liger's fused loss itself is
taken by the SFT objective from the hidden states (tunelab computes its own losses; the model's
forward is left as it is), and wins over ``objective.fused_cross_entropy`` when both are on.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import shutil
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tunelab.methods.blocks import find_blocks, unwrap

LIGER_KERNELS = ("RMSNorm", "SwiGLU", "RoPE")


class FastPathUnavailable(ValueError):
    """A lever the recipe asked for cannot apply here; the message names the setting, why, and the fix."""


# ---- training.compile ------------------------------------------------------------------------------


def _c_compiler() -> str | None:
    """The C++ compiler inductor would build CPU kernels with ($CXX, else g++ / c++ / clang++)."""
    for name in filter(None, (os.environ.get("CXX"), "g++", "c++", "clang++")):
        if shutil.which(name):
            return name
    return None


def compile_problem(model: nn.Module, device: str) -> str | None:
    """Why the decoder layers cannot be compiled here (None when they can)."""
    if not callable(getattr(nn.Module, "compile", None)):
        return f"torch {torch.__version__} has no nn.Module.compile (torch 2.2 or newer has)"
    kind = torch.device(device).type
    if kind == "cpu" and _c_compiler() is None:
        return (
            "torch.compile builds CPU kernels with a C++ compiler and none was found (install g++ or set CXX)"
        )
    if kind == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile builds CUDA kernels with Triton, which is not installed"
    try:
        find_blocks(model)
    except ValueError as err:
        return f"{err}: regional compilation compiles that layer list"
    return None


@dataclass
class CompiledLayers:
    """What was compiled, and the step times that show what compiling cost."""

    count: int
    layer_types: list[str]
    step_seconds: list[float] = field(default_factory=list)

    def describe(self) -> str:
        types = ", ".join(self.layer_types)
        return (
            f"compile: {self.count} decoder layers ({types}) compiled in place, one compile per layer type; "
            "the first step includes compiling them"
        )

    def record_step(self, seconds: float) -> str | None:
        """Note one optimizer step's wall time; returns the line to print after the first one."""
        self.step_seconds.append(seconds)
        if len(self.step_seconds) == 1:
            return f"compile: first step took {seconds:.1f} s (compiling included)"
        return None

    def final_line(self) -> str | None:
        """The cost in one line at the end of training (None before two steps: no median to compare)."""
        entry = self.summary()
        if "compile_overhead_s" not in entry:
            return None
        return (
            f"compile: about {entry['compile_overhead_s']:.1f} s of the run went to compiling "
            f"(first step {entry['first_step_s']:.1f} s, median step {entry['median_step_s']:.2f} s)"
        )

    def summary(self) -> dict[str, Any]:
        """For the manifest: compile overhead = the time all steps took beyond the median step's
        (recompiles for new shapes included), an estimate that is exact when steps are alike."""
        times = self.step_seconds
        entry: dict[str, Any] = {"layers": self.count, "layer_types": self.layer_types}
        if times:
            median = statistics.median(times[1:]) if len(times) > 1 else None
            entry["first_step_s"] = round(times[0], 3)
            if median is not None:
                entry["median_step_s"] = round(median, 4)
                entry["compile_overhead_s"] = round(max(sum(t - median for t in times if t > median), 0.0), 3)
        return entry


def compile_decoder_layers(model: nn.Module, device: str, *, backend: str = "inductor") -> CompiledLayers:
    """Compile every decoder layer of ``model`` in place; refused (FastPathUnavailable) where it cannot."""
    problem = compile_problem(model, device)
    if problem is not None:
        raise FastPathUnavailable(
            f"training.compile: cannot be used here: {problem}; set training.compile: false"
        )
    _, layers = find_blocks(model)
    for layer in layers:
        # in place: the module keeps its name, parameters and hooks (checkpointing, LoRA), so checkpoints,
        # the optimizer's groups and the saved adapter see the same model as in eager mode
        layer.compile(backend=backend)
    return CompiledLayers(len(layers), sorted({type(layer).__name__ for layer in layers}))


# ---- training.kernels ------------------------------------------------------------------------------


@dataclass
class KernelChoice:
    """The kernels in effect and why."""

    name: str  # "liger" or "none"
    reason: str

    def manifest(self) -> dict[str, str]:
        return {"in_effect": self.name, "reason": self.reason}


def liger_apply_function(model: nn.Module) -> Any:
    """Liger's public ``apply_liger_kernel_to_<model_type>`` for the model, or None if it has none."""
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    if not model_type:
        return None
    module = importlib.import_module("liger_kernel.transformers")
    return getattr(module, f"apply_liger_kernel_to_{model_type}", None)


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def liger_problem(model: nn.Module, device: str) -> str | None:
    """Why Liger's kernels cannot run on ``model`` here (None when they can)."""
    kind = torch.device(device).type
    if kind != "cuda":  # first: off a GPU, installing Liger would not help
        return f"no CUDA device (Liger's kernels are Triton GPU kernels; this run is on {kind})"
    if not liger_installed():
        return "liger-kernel is not installed (pip install 'tunelab[kernels]')"
    try:
        apply = liger_apply_function(model)
    except ImportError as err:  # e.g. a Triton that does not match the installed torch
        return f"liger-kernel does not import: {err}"
    if apply is None:
        model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
        return f"Liger has no kernels for model type {model_type!r}"
    return None


def choose_kernels(setting: str, model: nn.Module, device: str) -> KernelChoice:
    """Resolve ``training.kernels``; ``liger`` where it cannot apply raises FastPathUnavailable."""
    if setting == "none":
        return KernelChoice("none", "training.kernels: none")
    problem = liger_problem(model, device)
    if problem is None:
        return KernelChoice("liger", f"training.kernels: {setting}")
    if setting == "liger":
        raise FastPathUnavailable(
            f"training.kernels: liger cannot be used here: {problem}; set training.kernels: auto or none"
        )
    return KernelChoice("none", f"auto: {problem}")


def apply_liger(model: nn.Module) -> list[str]:
    """Patch the model's RMSNorm, SwiGLU MLP and RoPE with Liger's kernels (through Liger's own public
    function for its type); returns the kernels applied. Liger's API patches the transformers module
    of that model type for the rest of the process, as well as this instance.

    Liger's loss kernels are not installed into the model's forward (tunelab never passes labels to
    it): the SFT objective calls Liger's fused linear cross-entropy on the hidden states itself."""
    apply = liger_apply_function(model)
    wanted = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False}
    wanted["fused_linear_cross_entropy"] = False
    accepted = inspect.signature(apply).parameters
    apply(model=unwrap(model), **{k: v for k, v in wanted.items() if k in accepted})
    names = {"rms_norm": "RMSNorm", "swiglu": "SwiGLU", "rope": "RoPE"}
    return [names[k] for k in ("rms_norm", "swiglu", "rope") if k in accepted]
