"""Which attention kernel a run uses (``model.attention``), decided before the model loads.

Packing needs attention that keeps packed examples apart. ``sdpa`` and ``eager`` do it with a
dense ``(b, 1, s, s)`` block-diagonal mask that transformers builds from the restarting position
ids (on a GPU that mask forces SDPA off its fast kernels). The *varlen* paths do it without a
mask: FlashAttention-2 derives cumulative sequence lengths from the position ids of one flattened
row, and FlexAttention gets a block-sparse document mask (a ``BlockMask``) from transformers'
masking utilities. Those two make padding-free packing worth turning on by default.
"""

from __future__ import annotations

import importlib.util

import torch

ATTENTION_CHOICES = ("auto", "sdpa", "eager", "flex_attention", "flash_attention_2")
VARLEN_ATTENTION = frozenset({"flex_attention", "flash_attention_2"})
"""Attention that isolates packed examples without a dense mask (see the module docstring)."""


class AttentionUnavailable(ValueError):
    """``model.attention`` names a kernel this machine cannot train with; the message says why."""


def flash_attn_installed() -> bool:
    """The flash-attn package is importable (found without importing it: that takes seconds)."""
    return importlib.util.find_spec("flash_attn") is not None


def flex_attention_in_torch() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def resolve_attention(choice: str, device_type: str, *, packing: bool, fp32: bool = False) -> str | None:
    """The attention a run uses on ``device_type`` ("cuda", "cpu", "mps"); None keeps the model's
    own default (what transformers picks, sdpa for Llama-family models).

    ``auto`` changes nothing off CUDA, so CPU runs behave as before. On CUDA it is
    flash_attention_2 when flash-attn is installed, else flex_attention when the run may pack
    (``packing``: the objective packs and ``data.packing`` is not false), else sdpa; ``fp32`` (the
    model is asked for in float32) skips flash-attn, whose kernels take half precision only. An
    explicit choice that cannot train here raises :class:`AttentionUnavailable`.
    """
    device_type = torch.device(device_type).type  # "cuda:1" is cuda
    if choice == "auto":
        if device_type != "cuda":
            return None
        if flash_attn_installed() and not fp32:
            return "flash_attention_2"
        return "flex_attention" if packing and flex_attention_in_torch() else "sdpa"
    problem = attention_problem(choice, device_type)
    if problem is not None:
        raise AttentionUnavailable(f"model.attention: {choice} {problem}")
    return choice


def attention_problem(choice: str, device_type: str) -> str | None:
    """Why ``choice`` cannot train on ``device_type``, as the end of a sentence; None when it can."""
    if choice not in ATTENTION_CHOICES:
        return f"is not one of {', '.join(ATTENTION_CHOICES)}"
    if choice == "flash_attention_2":
        if not flash_attn_installed():
            return "needs the flash-attn package (pip install flash-attn); use flex_attention or sdpa"
        if device_type != "cuda":
            return f"runs on CUDA GPUs only (this run is on {device_type}); use sdpa"
    if choice == "flex_attention":
        if not flex_attention_in_torch():
            return f"needs torch >= 2.5 (this is torch {torch.__version__}); use sdpa"
        if device_type != "cuda":
            # torch raises "FlexAttention does not support backward on CPU" at the first forward
            return f"has no backward pass on {device_type} in torch {torch.__version__}; use sdpa here"
    return None
