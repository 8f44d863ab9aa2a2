"""Loss formulas as pure functions of tensors, testable without a model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.data.templates import IGNORE_INDEX


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over positions whose label is not ignored, and their count.

    ``labels`` are aligned with ``logits`` positions of the *input*; the shift by one happens here.
    Computed in float32 whatever the logits' dtype: bf16 log-softmax over a large vocabulary loses
    the precision the loss needs.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, (shift_labels != IGNORE_INDEX).sum()
