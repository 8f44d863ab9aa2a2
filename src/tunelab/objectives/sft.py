"""Supervised fine-tuning: causal language modelling, loss on completions only by default."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Literal

from tunelab.data.templates import IGNORE_INDEX, TemplateError, encode_conversation, encode_text
from tunelab.objectives.base import OBJECTIVES, BaseObjective, Dropped, LossOutput, ObjectiveConfig

if TYPE_CHECKING:  # the config class is part of the recipe schema, which loads without the ML stack
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase


class SftConfig(ObjectiveConfig):
    name: Literal["sft"] = "sft"
    completion_only: bool = True
    """Loss only on assistant tokens (prompt tokens masked). Off = loss on the whole rendered text."""
    train_on: Literal["all_assistant", "last_assistant"] = "all_assistant"
    """For multi-turn chats: learn every assistant turn, or only the last one."""
    fused_cross_entropy: bool = False
    """Loss computed in chunks from the last hidden states, so the [tokens × vocab] logits never exist
    whole (objectives/fused_ce.py): a memory lever for large vocabularies; same loss and gradients."""


@OBJECTIVES.register("sft", SftConfig)
class SftObjective(BaseObjective):
    """Next-token loss on the rendered chat (assistant tokens only by default) or on plain text."""

    data_kinds = ("text", "chat")

    packs = True
    flat_packs = False
    """Set by the trainer when packing for a varlen attention: a micro-batch's packs go in one row."""

    def __init__(self, cfg: SftConfig, tokenizer: PreTrainedTokenizerBase, data_cfg: Any) -> None:
        self.config = cfg
        self.tokenizer = tokenizer
        self.max_length = getattr(data_cfg, "max_length", None)
        self.train_on_reasoning = getattr(data_cfg, "train_on_reasoning", True)
        self.padding_side = "left"
        self.liger_cross_entropy = False  # set by use_liger_cross_entropy when training.kernels is liger

    def use_liger_cross_entropy(self, model: nn.Module) -> str:
        """``training.kernels`` resolved to liger: the loss goes through Liger's fused linear
        cross-entropy kernel where the model allows a fused loss. It wins over
        ``objective.fused_cross_entropy`` (the same sum in chunked PyTorch): one fused loss runs, and on
        a GPU with Liger installed the Triton kernel is the faster one. Returns the loss in effect."""
        from tunelab.objectives.fused_ce import fused_ce_problem

        problem = fused_ce_problem(model)
        if problem is not None:
            return f"loss from full logits (Liger's fused linear cross-entropy cannot apply: {problem})"
        self.liger_cross_entropy = True
        return "loss by Liger's fused linear cross-entropy"

    def adapt_to(self, model: nn.Module) -> None:
        """Virtual-token methods get right padding (called once the method has shaped the model)."""
        self.padding_side = "right" if prepends_virtual_tokens(model) else "left"
        if self.config.fused_cross_entropy:
            self._refuse_fused_ce_on(model)

    @staticmethod
    def _refuse_fused_ce_on(model: nn.Module) -> None:
        from tunelab.objectives.fused_ce import fused_ce_problem

        problem = fused_ce_problem(model)
        if problem is not None:
            raise ValueError(f"objective.fused_cross_entropy: cannot be used here: {problem}")

    def encode(self, row: int, example: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]] | Dropped:
        """One feature per sequence: a conversation gives several when its template rewrites earlier
        turns (each assistant turn is then trained as the template renders it in its position)."""
        if "messages" in example:
            try:
                seqs = encode_conversation(
                    self.tokenizer,
                    example["messages"],
                    tools=example.get("tools"),
                    max_length=self.max_length,
                    train_on=self.config.train_on,
                    completion_only=self.config.completion_only,
                    train_on_reasoning=self.train_on_reasoning,
                )
            except TemplateError as err:
                return Dropped(row, str(err))
        elif "text" in example and "label" not in example:
            seqs = [encode_text(self.tokenizer, example["text"], max_length=self.max_length)]
        else:
            return Dropped(row, f"sft needs text, instruction or chat data; got fields {sorted(example)}")
        if sum(enc.n_loss_tokens for enc in seqs) == 0:
            full = max(enc.full_length for enc in seqs)
            return Dropped(
                row, f"no loss tokens left after truncation to max_length={self.max_length} (had {full})"
            )
        features = [
            {"input_ids": enc.input_ids, "labels": enc.labels, "truncated": enc.truncated}
            for enc in seqs
            if enc.n_loss_tokens
        ]
        return features[0] if len(features) == 1 else features

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if "position_ids" in features[0]:
            from tunelab.data.packing import collate_packed

            return collate_packed(features, self.tokenizer.pad_token_id, flat=self.flat_packs)
        # Left padding lines every answer up against the right edge, so the logits the loss needs
        # are the last few positions of the batch (see `causal_lm_forward`). Models with virtual
        # tokens in front number positions themselves, so they get right padding: pads then never
        # sit between the virtual tokens and the text.
        return pad_causal_batch(features, self.tokenizer.pad_token_id, side=self.padding_side)

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        from tunelab.objectives.fused_ce import decoder_and_head
        from tunelab.objectives.losses import causal_lm_loss_sum

        fused = self._fused_loss(model)
        if fused is not None:
            hidden, labels = causal_lm_hidden(model, batch)
            _, head = decoder_and_head(model)
            loss_sum, count = fused(hidden, head.weight, labels)
            return LossOutput(loss_sum, count, {})
        logits, labels = causal_lm_forward(model, batch)
        loss_sum, count = causal_lm_loss_sum(logits, labels)
        return LossOutput(loss_sum, count, {})

    def _fused_loss(self, model: nn.Module) -> Any:
        """Liger's kernel, tunelab's chunked loss, or None (logits); the engine may have wrapped the
        model since adapt_to (DDP), so whether a fused loss can run is checked again here."""
        from tunelab.objectives import fused_ce

        if self.liger_cross_entropy and fused_ce.fused_ce_problem(model) is None:
            return fused_ce.liger_linear_cross_entropy_sum
        if self.config.fused_cross_entropy:
            self._refuse_fused_ce_on(model)
            return fused_ce.fused_linear_cross_entropy_sum
        return None


def loss_window(labels: torch.Tensor) -> int:
    """How many trailing positions hold every label, plus the one position that predicts the first."""
    has_label = (labels != IGNORE_INDEX).any(dim=0)
    if not bool(has_label.any()):
        return labels.size(1)
    first = int(has_label.float().argmax())
    return labels.size(1) - max(first - 1, 0)


def accepts_logits_to_keep(model: nn.Module) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def causal_lm_forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and aligned labels for the positions the loss needs, and no others.

    The output projection over the vocabulary is a large share of a small model's compute (a fifth
    of SmolLM2-135M's forward pass) and its logits tensor dominates activation memory. With answers
    right-aligned by left padding, ``logits_to_keep`` computes it only for the trailing window that
    holds the labels. Position ids are passed explicitly so left padding does not shift positions.
    """
    mask, kwargs = _mask_and_positions(batch)
    if prepends_virtual_tokens(model):
        kwargs.pop("position_ids")  # PEFT places its virtual tokens first and numbers positions itself
    labels = batch["labels"]
    if accepts_logits_to_keep(model):
        keep = loss_window(labels)
        kwargs["logits_to_keep"] = keep
        labels = labels[:, -keep:]
    out = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, **kwargs)
    # prompt tuning / p-tuning return logits for their virtual tokens too; those come first
    return out.logits[:, -labels.size(1) :], labels


def _mask_and_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, dict[str, Any]]:
    if "position_ids" in batch:  # packed: no 2-D mask, so transformers isolates examples by position restarts
        return None, {"position_ids": batch["position_ids"]}
    mask = batch["attention_mask"]
    return mask, {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def causal_lm_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states and aligned labels for the loss window: :func:`causal_lm_forward` without
    the output projection (the fused loss applies it chunk by chunk)."""
    from tunelab.objectives.fused_ce import decoder_and_head

    mask, kwargs = _mask_and_positions(batch)
    keep = loss_window(batch["labels"])
    decoder, _ = decoder_and_head(model)
    out = decoder(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False, **kwargs)
    return out.last_hidden_state[:, -keep:], batch["labels"][:, -keep:]


def prepends_virtual_tokens(model: nn.Module) -> bool:
    """PEFT prompt tuning and p-tuning put learned embeddings before the input (prefix tuning uses
    the KV cache instead and keeps positions)."""
    config = getattr(model, "active_peft_config", None)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return False
    return str(getattr(config.peft_type, "value", config.peft_type)) not in ("PREFIX_TUNING", "CARTRIDGE")


def pad_causal_batch(
    features: list[dict[str, Any]], pad_id: int, side: str = "right"
) -> dict[str, torch.Tensor]:
    """Pad ids and labels to the longest example on ``side``; padding never carries loss."""
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[i, cols] = torch.tensor(f["input_ids"])
        labels[i, cols] = torch.tensor(f["labels"])
        mask[i, cols] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
