"""Which attention kernel a run uses (``model.attention``), decided before the model loads.

Packing needs attention that keeps packed examples apart. ``sdpa`` and ``eager`` do it with a
dense ``(b, 1, s, s)`` block-diagonal mask that transformers builds from the restarting position
ids (on a GPU that mask forces SDPA off its fast kernels). The *varlen* paths do it without a
mask: FlashAttention-2 derives cumulative sequence lengths from the position ids of one flattened
row, FlexAttention gets a block-sparse document mask (a ``BlockMask``) from transformers'
masking utilities, and ``varlen`` (:mod:`tunelab.models.varlen`) calls PyTorch's own build of the
FlashAttention-2 varlen kernel, so it needs no flash-attn package. Those make padding-free packing
worth turning on by default.

``auto`` on CUDA prefers varlen to flex_attention: on an H200 (torch 2.11, transformers 5.17, 1B
Llama shape) FlexAttention's backward failed to compile (inductor: "NoValidChoicesError"), while
the varlen kernel needs no compilation at all.

The varlen kernel computes plain causal softmax attention inside each packed example, so the
model's config decides whether it may run (:func:`varlen_refusal`): attention-logit softcapping,
attention sinks (a model class that cannot run on SDPA), a sliding or chunked window narrower than
``data.max_length``, and layers that are not softmax attention (linear attention, Mamba, short
convolutions) all rule it out. The window rule, precisely: in transformers a sliding-window layer
lets query ``q`` see key ``k`` when ``q - k < window``; inside one example of ``L`` tokens
``q - k <= L - 1``, and no example (nor pack) is longer than ``data.max_length``, so a window of at
least ``data.max_length`` never removes a key and the kernel is exact. Layers that are not softmax
attention keep no packed boundary at all (Qwen3-Next and Qwen3.5's linear attention would need the
boundaries as explicit sequence lengths, which tunelab does not pass), so those models do not pack
(:func:`packing_refusal`). The decision is pure over (:class:`ModelAttention`, :class:`Machine`,
the recipe's settings), so tests take it on CPU for a simulated CUDA machine.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.models import varlen

ATTENTION_CHOICES = ("auto", "sdpa", "eager", "varlen", "flex_attention", "flash_attention_2")
VARLEN_ATTENTION = frozenset({"flex_attention", "flash_attention_2", "varlen", varlen.NAME})
"""Attention that isolates packed examples without a dense mask (see the module docstring)."""

SOFTMAX_LAYERS = frozenset({"full_attention", "sliding_attention", "chunked_attention", "attention"})
"""Layer types that are softmax attention through transformers' attention interface."""
MIXING_FREE_LAYERS = frozenset({"mlp", "moe", "dense", "sparse"})
"""Layer types that move no information between tokens (no attention at all)."""
WINDOW_FIELDS = ("sliding_window", "attention_chunk_size", "sliding_window_size", "attention_window_size")
"""Config fields that narrow what a query sees, in the order they are read."""
LAYER_FIELDS = ("layer_types", "layers_block_type", "block_types")
"""Config fields that name each layer's kind."""


class AttentionUnavailable(ValueError):
    """``model.attention`` names a kernel this machine cannot train with; the message says why."""


def flash_attn_installed() -> bool:
    """The flash-attn package is importable (found without importing it: that takes seconds)."""
    return importlib.util.find_spec("flash_attn") is not None


def flex_attention_in_torch() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


@dataclass(frozen=True)
class Machine:
    """What the device offers the decision (tests build one by hand for a machine they lack)."""

    device_type: str
    flash_attn: bool = False
    varlen_kernel: str | None = None
    """None when PyTorch's varlen FlashAttention runs here, else why not."""
    flex: bool = True

    @classmethod
    def probe(cls, device_type: str) -> Machine:
        return cls(
            device_type=torch.device(device_type).type,  # "cuda:1" is cuda
            flash_attn=flash_attn_installed(),
            varlen_kernel=varlen.kernel_available(),
            flex=flex_attention_in_torch(),
        )


@dataclass(frozen=True)
class ModelAttention:
    """What a model's config says about its attention, read without building the model.

    ``window``, ``softcap`` and ``other_layers`` each carry the config text that set them, so a
    refusal names the field to look at."""

    model_type: str = "unknown"
    window: tuple[str, int] | None = None
    """(field, tokens) of the sliding or chunked window some layer applies (the first field set)."""
    softcap: tuple[str, float] | None = None
    other_layers: str | None = None
    """Layers that are not softmax attention, as "field has value, ..." (linear attention, Mamba)."""
    head_dim: int | None = None
    sdpa: bool | None = None
    """Whether the model's class runs on SDPA (False: its attention needs more, e.g. sinks);
    None when the class is not known to transformers' auto mapping."""
    class_name: str = ""

    @classmethod
    def from_config(cls, config: Any) -> ModelAttention:
        if config is None:
            return cls()
        try:
            text = config.get_text_config() if hasattr(config, "get_text_config") else config
        except ValueError:  # several text configs (encoder-decoder): read the top level
            text = config
        cap = getattr(text, "attn_logit_softcapping", None)
        model_class = _causal_lm_class(config)
        return cls(
            model_type=str(getattr(config, "model_type", "unknown")),
            window=_window(text),
            softcap=("attn_logit_softcapping", float(cap)) if cap else None,
            other_layers=_other_layers(text),
            head_dim=_head_dim(text),
            sdpa=None if model_class is None else bool(getattr(model_class, "_supports_sdpa", True)),
            class_name=getattr(model_class, "__name__", ""),
        )


def _window(config: Any) -> tuple[str, int] | None:
    """The window some layer applies: ``use_sliding_window: false`` or a ``layer_types`` with no
    sliding or chunked layer turns a configured ``sliding_window`` off, as transformers does."""
    if getattr(config, "use_sliding_window", True) is False:
        return None
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and not any("sliding" in str(k) or "chunk" in str(k) for k in kinds):
        return None
    for field in WINDOW_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return field, value
    return None


def _other_layers(config: Any) -> str | None:
    """Layers that keep no packed boundary: named layer kinds outside softmax attention, or the
    Mamba / state-space fields of hybrid models that do not list their layers."""
    for field in LAYER_FIELDS:
        kinds = getattr(config, field, None) or ()
        odd = sorted({str(k) for k in kinds} - SOFTMAX_LAYERS - MIXING_FREE_LAYERS)
        if odd:
            return f"{field} has {', '.join(odd)}"
    names = sorted(k for k in vars(config) if k.startswith(("mamba_", "ssm_")))
    if names:
        return f"{names[0]} in config (Mamba / state-space layers)"
    return None


def _head_dim(config: Any) -> int | None:
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    heads, hidden = getattr(config, "num_attention_heads", None), getattr(config, "hidden_size", None)
    return hidden // heads if heads and hidden else None


def _causal_lm_class(config: Any) -> type | None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING  # noqa: PLC0415

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (KeyError, ValueError):
        return None


def packing_refusal(model: ModelAttention, max_length: int) -> str | None:
    """Why no attention keeps this model's packed examples apart, naming the config field; None
    when packing is exact (sdpa and eager then isolate examples with their dense mask, which carries
    sliding windows too)."""
    if model.other_layers:
        return (
            f"{model.other_layers}: those layers are not softmax attention and take packed boundaries only "
            "as explicit sequence lengths, which tunelab does not pass"
        )
    if model.window and model.window[0] == "attention_chunk_size" and model.window[1] < max_length:
        field, size = model.window
        return (
            f"{field}={size} in config is below data.max_length {max_length}: attention chunks count from "
            "the row's start, not each packed example's"
        )
    return None


def varlen_refusal(model: ModelAttention, max_length: int) -> str | None:
    """Why the varlen kernel (plain causal softmax attention per example) would not compute this
    model's attention exactly, naming the config field; None when it would."""
    if model.softcap:
        field, value = model.softcap
        return f"{field}={value:g} in config: the varlen kernel does not cap attention logits"
    if model.sdpa is False:
        return (
            f"{model.class_name} does not run on SDPA (its attention has terms such as sinks that plain "
            "softmax attention lacks), and the varlen kernel computes what SDPA computes"
        )
    if model.window and model.window[1] < max_length:
        field, size = model.window
        return (
            f"{field}={size} in config is below data.max_length {max_length}, and the varlen kernel has no "
            "window"
        )
    if model.other_layers:
        return packing_refusal(model, max_length)
    if model.head_dim and (model.head_dim > 256 or model.head_dim % 8):
        return f"head dimension {model.head_dim}: FlashAttention needs a multiple of 8 up to 256"
    return None


@dataclass(frozen=True)
class Attention:
    """The attention a run uses: transformers' ``attn_implementation`` (None keeps the model's own
    default: sdpa where transformers supports it for the model, else eager) and, when ``auto`` did
    not take the fast kernel it would take for a plain Llama here, why."""

    name: str | None
    why: str = ""


def decide_attention(
    choice: str,
    machine: Machine,
    model: ModelAttention,
    *,
    packing: bool,
    fp32: bool = False,
    max_length: int = 0,
) -> Attention:
    """``model.attention`` resolved for ``machine`` and ``model`` (pure: no probing, no loading).

    ``auto`` changes nothing off CUDA, so CPU runs behave as before. On CUDA it is
    flash_attention_2 when flash-attn is installed (transformers' FlashAttention applies windows and
    softcapping itself), else, when the run may pack (``packing``), PyTorch's varlen kernel where
    :func:`varlen_refusal` allows it, flex_attention on a torch without the kernel; else the model's
    default. ``fp32`` (the model is asked for in float32) skips the FlashAttention kernels, which take
    half precision only. An explicit choice that cannot train here, or that would compute another
    attention than the model's, raises :class:`AttentionUnavailable`.
    """
    if choice == "auto":
        return _auto(machine, model, packing=packing, fp32=fp32, max_length=max_length)
    problem = attention_problem(choice, machine)
    if choice == "varlen":
        if refusal := varlen_refusal(model, max_length):
            problem = (
                f"would compute another attention than {model.model_type}'s: {refusal}; use sdpa or auto"
            )
        elif problem is None and fp32:
            problem = "runs FlashAttention, which takes bfloat16 or float16; set model.dtype: bfloat16"
    if choice == "sdpa" and model.sdpa is False:
        problem = f"is not supported by {model.class_name} (transformers says so); use eager or auto"
    if problem is not None:
        raise AttentionUnavailable(f"model.attention: {choice} {problem}")
    return Attention(varlen.NAME if choice == "varlen" else choice)


def _auto(
    machine: Machine, model: ModelAttention, *, packing: bool, fp32: bool, max_length: int
) -> Attention:
    if machine.device_type != "cuda":
        return Attention(None)
    if machine.flash_attn and not fp32:
        return Attention("flash_attention_2")
    if not packing:
        return Attention(None)
    if not fp32 and machine.varlen_kernel is None:
        refusal = varlen_refusal(model, max_length)
        if refusal is None:
            return Attention(varlen.NAME)
        return Attention(None, f"varlen refused: {refusal}")
    return Attention("flex_attention") if machine.flex else Attention(None)


@dataclass(frozen=True)
class FastPath:
    """The attention and packing a run uses (``Recipe.fast_path``), with auto's reasons."""

    attention: str | None
    packing: bool
    attention_why: str = ""
    """Why ``model.attention: auto`` did not take the fast kernel, e.g. "varlen refused: ..."."""
    packing_why: str = ""
    """Why ``data.packing: auto`` does not pack this model, e.g. "refused: layer_types has ..."."""

    def describe(self, attention_setting: str, packing_setting: bool | str, in_effect: str) -> str:
        """The run's settings line: "attention: sdpa (model.attention: auto: varlen refused: ...);
        packing: off (data.packing: auto)"."""
        attention = f"model.attention: {attention_setting}" + (
            f": {self.attention_why}" if self.attention_why else ""
        )
        packing = f"data.packing: {str(packing_setting).lower()}" + (
            f": {self.packing_why}" if self.packing_why else ""
        )
        return f"attention: {in_effect} ({attention}); packing: {'on' if self.packing else 'off'} ({packing})"


def attention_problem(choice: str, machine: Machine) -> str | None:
    """Why ``choice`` cannot train on ``machine``, as the end of a sentence; None when it can."""
    device_type = machine.device_type
    if choice not in ATTENTION_CHOICES:
        return f"is not one of {', '.join(ATTENTION_CHOICES)}"
    if choice == "flash_attention_2":
        if not machine.flash_attn:
            return "needs the flash-attn package (pip install flash-attn); use flex_attention or sdpa"
        if device_type != "cuda":
            return f"runs on CUDA GPUs only (this run is on {device_type}); use sdpa"
    if choice == "varlen" and machine.varlen_kernel is not None:
        return f"cannot run: {machine.varlen_kernel}; use sdpa here"
    if choice == "flex_attention":
        if not machine.flex:
            return f"needs torch >= 2.5 (this is torch {torch.__version__}); use sdpa"
        if device_type != "cuda":
            # torch raises "FlexAttention does not support backward on CPU" at the first forward
            return f"has no backward pass on {device_type} in torch {torch.__version__}; use sdpa here"
    return None
