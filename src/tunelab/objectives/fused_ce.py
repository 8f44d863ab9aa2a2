"""Cross-entropy straight from the last hidden states: the [tokens × vocab] logits never exist whole.

For a 128k-vocabulary model at 8 × 2048 tokens, the fp32 logits and their log-softmax are about
23 GiB of a LoRA run's 27 GiB peak (``tunelab plan``). This computes the loss one chunk of tokens at a
time — logits of the chunk, log-sum-exp, and at once the gradients with respect to the chunk's hidden
states and the output projection — so only [chunk × vocab] is alive at any moment and backward has
nothing left to recompute. It is the approach of Liger's ``FusedLinearCrossEntropy``; written here in
plain PyTorch because Liger's kernels are Triton GPU kernels (Liger installs on CPU, but its kernels do
not run there, so CI could not test them) and the math needs no custom kernel to remove the memory.

Used by the SFT objective when ``objective.fused_cross_entropy: true``; equal to the plain path in
loss and gradients (tests), not yet measured for speed on a GPU (benchmarks/RESULTS.md). When
``training.kernels`` resolves to liger, Liger's own kernel (:func:`liger_linear_cross_entropy_sum`)
computes the same sum instead (docs/training.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from tunelab.data.templates import IGNORE_INDEX

# configs whose logits are not plain `hidden @ lm_head.weight.T` (softcapping, scaling)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over labelled tokens of -log softmax(hidden @ weight.T)[label], gradients made in forward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if ctx.needs_input_grad[1]
            else None
        )
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            valid = y != IGNORE_INDEX
            if not bool(valid.any()):
                continue
            logits = (h @ weight.t()).float()  # the matmul in the compute dtype, the softmax in fp32
            lse = torch.logsumexp(logits, dim=-1)
            target = y.clamp(min=0)
            picked = logits.gather(1, target[:, None])[:, 0]
            total += ((lse - picked) * valid).sum()
            # d(sum CE)/d logits = softmax − one-hot, zero on unlabelled rows
            probs = torch.exp(logits - lse[:, None])
            probs[torch.arange(len(y), device=y.device), target] -= 1.0
            probs *= valid[:, None]
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = (probs.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(probs.t(), h.float())  # in place: no second [vocab × hidden] buffer
        ctx.save_for_backward(grad_hidden, grad_weight)  # None where no gradient is wanted
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_hidden, grad_weight = ctx.saved_tensors
        # in place: the gradients were made for this one backward (a second one is not supported)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_out)
        if grad_weight is not None:
            grad_weight = grad_weight.mul_(grad_out).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None


def chunk_tokens_for(n_tokens: int, hidden_size: int, vocab_size: int) -> int:
    """Tokens per chunk such that a chunk's logits are about as large as all the hidden states (the
    rule Liger uses): the loss then never needs much more than the activations it starts from."""
    ratio = math.ceil(vocab_size / hidden_size)
    return max(1, 1 << max(0, math.ceil(n_tokens / ratio) - 1).bit_length())


def fused_linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and the count of labelled positions, like
    :func:`tunelab.objectives.losses.causal_lm_loss_sum` but from hidden states ``[B, T, H]`` and the
    output projection ``weight [V, H]``; ``labels [B, T]`` are aligned with the input (shifted here)."""
    # shift the labels, not the hidden states: hidden[:, :-1] would be a copy of every activation
    shifted_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1).reshape(
        -1
    )
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    chunk = chunk_tokens or chunk_tokens_for(flat_hidden.size(0), weight.size(1), weight.size(0))
    loss = _ChunkedLinearCrossEntropy.apply(flat_hidden, weight, shifted_labels, chunk)
    return loss, (shifted_labels != IGNORE_INDEX).sum()


def liger_linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fused_linear_cross_entropy_sum` computed by Liger's Triton kernel (CUDA only), taken when
    ``training.kernels`` resolves to liger: the same sum, in one fused GPU kernel instead of chunks."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss  # optional: tunelab[kernels]

    shifted_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1).reshape(
        -1
    )
    flat_hidden = hidden.reshape(-1, hidden.size(-1))
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_fn(weight, flat_hidden, shifted_labels), (shifted_labels != IGNORE_INDEX).sum()


def fused_ce_problem(model: nn.Module) -> str | None:
    """Why the fused loss cannot run on ``model`` (None when it can)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return "DDP must see the whole forward to synchronise gradients; use strategy fsdp or drop the option"
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return "prompt-learning methods change the model's inputs inside PEFT's own forward"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(getattr(base, "model", None), nn.Module):
        return f"{type(base).__name__} has no separate decoder (`.model`) to take hidden states from"
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        return "the output layer is not a plain bias-free nn.Linear (e.g. trained via modules_to_save)"
    transforms = [k for k in _LOGIT_TRANSFORMS if getattr(base.config, k, None) not in (None, 1, 1.0)]
    if transforms:
        return f"the model transforms its logits ({', '.join(transforms)})"
    return None


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.get_output_embeddings()
