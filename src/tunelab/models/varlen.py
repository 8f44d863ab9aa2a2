"""Padding-free attention for packed batches through PyTorch's own variable-length FlashAttention.

A packed row holds several examples, each with position ids restarting at 0 and no 2-D padding
mask. With SDPA, transformers turns that into a dense block-diagonal mask of ``b·s²`` elements per
layer, which sends SDPA to its slow kernels on a GPU (measured on an H200, 1B Llama shape: packed
rows through SDPA made 5,743 real tokens/s against 8,493 for plain padded batches). FlashAttention's
variable-length kernel takes the examples as one flat sequence with cumulative lengths
(``cu_seqlens``) instead: no mask, no padding, no token attending across examples.

``flash-attn`` (the package transformers' ``flash_attention_2`` needs) does not build without a
CUDA toolchain and has no wheel on PyPI; PyTorch ships the same FlashAttention-2 kernels and, since
2.9, exposes them as ``torch.nn.attention.varlen.varlen_attn`` with autograd. This module registers
that as a transformers attention implementation (``attn_implementation="tunelab_varlen"``) through
transformers' public ``AttentionInterface`` / ``AttentionMaskInterface``, so any model whose
attention goes through the interface (Llama, Qwen, Mistral, Gemma, Phi...) can use it.

The kernel computes plain causal softmax attention inside each example: models whose attention
does more (softcapping, sinks, a sliding window narrower than an example) are refused from their
config by :func:`tunelab.models.attention.varlen_refusal`, and the attention function below raises
if such a request still reaches it rather than computing something else.

Where the kernel cannot run (CPU, float32), the same function computes each example with SDPA in
a loop: the exact reference the tests compare against, and what a CPU run gets. A batch that
carries a padding mask, or a decoding step with a KV cache, is handed to transformers' SDPA path.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

NAME = "tunelab_varlen"
_CU = "_tunelab_cu_seqlens"  # cached on the position-ids tensor: every layer sees the same object


def kernel_available() -> str | None:
    """None when PyTorch's varlen FlashAttention is there, else why not."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401, PLC0415
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (PyTorch 2.9 or newer has it)"
    if not torch.cuda.is_available():
        return "no CUDA device: PyTorch's varlen FlashAttention runs on NVIDIA GPUs only"
    return None


def register() -> str:
    """Make ``attn_implementation=NAME`` known to transformers (idempotent); returns the name."""
    from transformers import AttentionInterface  # noqa: PLC0415
    from transformers.masking_utils import AttentionMaskInterface  # noqa: PLC0415

    AttentionInterface.register(NAME, varlen_attention)
    AttentionMaskInterface.register(NAME, varlen_mask)
    return NAME


def varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """No mask for unpadded batches (the position ids say where examples start); a padded batch
    gets SDPA's mask, and the attention below hands it to SDPA."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask  # noqa: PLC0415

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def cu_seqlens(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Cumulative example lengths over the flattened batch, and the longest example.

    An example starts where the position does not continue the previous one, and at every row's
    start (rows never run into each other)."""
    cached = getattr(position_ids, _CU, None)
    if cached is not None:
        return cached
    rows, width = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    index = starts.flatten().nonzero().flatten()
    total = torch.tensor([rows * width], device=index.device, dtype=index.dtype)
    cu = torch.cat([index, total]).to(torch.int32)
    result = (cu, int((cu[1:] - cu[:-1]).max()))  # one device sync per forward, not per layer
    setattr(position_ids, _CU, result)
    return result


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: q (b, h, s, d), k/v (b, h_kv, s, d) → (b, s, h, d)."""
    position_ids = kwargs.get("position_ids")
    packed = attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2]
    if not packed or (dropout and module.training):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout
        )
    b, h, s, d = query.shape
    if position_ids.shape[0] != b:
        position_ids = position_ids.expand(b, -1)
    cu, longest = cu_seqlens(position_ids)
    if (asked := _beyond_plain_attention(kwargs, longest)) is not None:
        raise ValueError(
            f"model.attention: varlen cannot compute {type(module).__name__}'s attention: it asks for {asked}, "
            "which the varlen kernel does not do; use model.attention: sdpa or auto"
        )
    q, k, v = (t.transpose(1, 2).reshape(b * s, t.shape[1], d) for t in (query, key, value))
    fast = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and kernel_available() is None
    out = _flash(q, k, v, cu, longest, scaling) if fast else _reference(q, k, v, cu, scaling)
    return out.reshape(b, s, h, d), None


def _beyond_plain_attention(kwargs: dict[str, Any], longest: int) -> str | None:
    """What the model asks of its attention beyond plain causal softmax over each example (the
    resolver refuses such models from their config first; this catches a config that hides it)."""
    if kwargs.get("softcap") is not None:
        return f"attention-logit softcapping ({kwargs['softcap']})"
    if kwargs.get("s_aux") is not None:
        return "attention sinks"
    window = kwargs.get("sliding_window")
    if window is not None and longest > window:  # a key is hidden only when q - k >= window
        return f"a sliding window of {window} tokens over a packed example of {longest}"
    return None


def _flash(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, longest: int, scale: float | None
) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn  # noqa: PLC0415

    return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **_causal_kwargs(varlen_attn))


def _causal_kwargs(fn: Any) -> dict[str, Any]:
    """The keyword that asks for causal attention (and GQA) in this PyTorch's varlen_attn."""
    params = inspect.signature(fn).parameters
    kwargs: dict[str, Any] = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True  # FlashAttention shares each KV head across its query-head group
    return kwargs


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """The same attention one example at a time through SDPA (CPU, float32, and the tests)."""
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        if ks.shape[1] != qs.shape[1]:
            ks, vs = (t.repeat_interleave(qs.shape[1] // t.shape[1], dim=1) for t in (ks, vs))
        attended = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[start:end] = attended.squeeze(0).transpose(0, 1)
    return out
