"""Packing: several short examples in one sequence, without letting them attend to each other.

Each example keeps its own position ids (restarting at 0), and the batch carries no 2-D padding
mask: ``transformers`` then detects the restarts and isolates the examples. How depends on the
attention in effect (``tunelab.models.attention``): SDPA and eager get a dense block-diagonal mask;
FlexAttention gets a block-sparse document mask; FlashAttention-2 runs its variable-length kernel
on cumulative sequence lengths, which transformers derives only from a batch of *one* row. So on
the varlen paths a micro-batch's packs are concatenated into one row with no padding at all
(:func:`collate_packed` with ``flat=True``). Models whose attention does not honour position
restarts are detected by :func:`packing_isolates` and packing is refused rather than silently
letting examples see each other.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data.templates import IGNORE_INDEX
from tunelab.models.attention import VARLEN_ATTENTION


class PackingUnsupported(ValueError):
    """The model's attention would mix packed examples."""


def packing_in_effect(setting: bool | str, objective_packs: bool, attention: str | None) -> bool:
    """``data.packing`` resolved: ``auto`` packs when the objective trains per token and the
    attention in effect isolates examples without a dense mask (flash/flex), so a run on sdpa (every
    CPU run by default) stays unpacked; true and false mean what they say (the recipe already
    refused true for objectives that cannot pack)."""
    if setting == "auto":
        return objective_packs and attention in VARLEN_ATTENTION
    return bool(setting) and objective_packs


def pack_features(features: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Greedy packing in order: append examples to the current pack while they fit in ``max_length``.

    The first label of every example is masked: in a packed row that position is predicted from
    the *previous* example's last token, which the unpacked loss never does.
    """
    packs: list[dict[str, Any]] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for feature in features:
        n = len(feature["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + n > max_length:
            packs.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += feature["input_ids"]
        current["labels"] += [IGNORE_INDEX, *feature["labels"][1:]]
        current["position_ids"] += list(range(n))
    if current["input_ids"]:
        packs.append(current)
    return packs


def collate_packed(
    packs: list[dict[str, Any]], pad_id: int, *, flat: bool = False
) -> dict[str, torch.Tensor]:
    """Right-pad packs; padding is its own 'example' (positions restart) and carries no loss.

    ``flat``: one row holding every pack back to back, no padding (the varlen attention paths).
    """
    if flat:
        packs = [
            {key: [v for pack in packs for v in pack[key]] for key in ("input_ids", "labels", "position_ids")}
        ]
    width = max(len(p["input_ids"]) for p in packs)
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.arange(width).repeat(len(packs), 1)
    real = torch.zeros((len(packs), width), dtype=torch.long)
    for i, pack in enumerate(packs):
        n = len(pack["input_ids"])
        ids[i, :n] = torch.tensor(pack["input_ids"])
        labels[i, :n] = torch.tensor(pack["labels"])
        positions[i, :n] = torch.tensor(pack["position_ids"])
        positions[i, n:] = torch.arange(width - n)
        real[i, :n] = 1
    # "attention_mask" marks real tokens for counting; the model is called without it (see sft).
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "attention_mask": real}


@torch.no_grad()
def packing_isolates(model: Any, vocab_size: int, *, atol: float = 1e-4) -> bool:
    """Does this model keep packed examples apart? Pack the same second example behind two different
    first ones: any leak through attention moves the second example's logits.

    Both rows have the same shape and positions, so the kernels do the same arithmetic on the second
    example and an isolating model gives the same logits up to ``atol`` (float32) or, in half
    precision and quantised models, a hundredth of how far the first example's own logits moved;
    comparing with the example run alone instead would also measure half precision's
    shape-dependent rounding (seen on an H200: a 4-bit QLoRA model failed that comparison)."""
    generator = torch.Generator().manual_seed(0)
    first = torch.randint(4, vocab_size, (2, 5), generator=generator)
    second = torch.randint(4, vocab_size, (1, 6), generator=generator).expand(2, -1)
    device = next(model.parameters()).device
    packed = torch.cat([first, second], dim=1).to(device)
    positions = torch.cat([torch.arange(5), torch.arange(6)]).repeat(2, 1).to(device)
    was_training = model.training
    model.eval()
    logits = torch.stack(
        [
            model(input_ids=row[None], position_ids=pos[None], use_cache=False).logits[0].float()
            for row, pos in zip(packed, positions)
        ]
    )
    model.train(was_training)
    own = float((logits[0, :5] - logits[1, :5]).abs().max())
    leak = float((logits[0, 5:] - logits[1, 5:]).abs().max())
    half = next(model.parameters()).dtype != torch.float32 or getattr(model, "is_loaded_in_4bit", False)
    return leak <= (max(atol, own / 100) if half else atol)
