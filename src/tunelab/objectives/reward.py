"""Reward model: a one-output sequence-classification head trained with the Bradley–Terry pairwise loss.

The prompt and each answer are rendered with the chat template: the policy that this reward model
will score (PPO, GRPO, best-of-n) writes in that format, so scoring the same text it produces avoids
a train/serve mismatch, and every scored sequence ends on the template's end-of-turn token, which
is where a decoder's head reads its score.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tunelab.data.templates import TemplateError, render
from tunelab.objectives.base import OBJECTIVES, BaseObjective, Dropped, LossOutput, ObjectiveConfig
from tunelab.objectives.classify import pad_right, require_trainable_head, sequence_scores

if TYPE_CHECKING:  # the config class is part of the recipe schema, which loads without the ML stack
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase


class RewardConfig(ObjectiveConfig):
    name: Literal["reward"] = "reward"
    center_rewards_coefficient: float | None = Field(
        None,
        ge=0,
        description="penalise (r_c + r_r)^2 to keep rewards centred at 0 (TRL's option; 0.01 is usual)",
    )


@OBJECTIVES.register("reward", RewardConfig)
class RewardObjective(BaseObjective):
    """``-log σ(r(x, y_c) - r(x, y_r) - margin)``; metrics pairwise accuracy and mean margin."""

    data_kinds = ("preference",)

    units_are_tokens = False

    model_kind = "sequence_classification"
    uses_chat_template = True

    def __init__(self, cfg: RewardConfig, tokenizer: PreTrainedTokenizerBase, data_cfg: Any) -> None:
        self.config = cfg
        self.tokenizer = tokenizer
        self.max_length = getattr(data_cfg, "max_length", None)

    def model_kwargs(self) -> dict[str, Any]:
        return {"num_labels": 1}

    def adapt_to(self, model: nn.Module) -> None:
        require_trainable_head(model, "reward")

    def _ids(self, example: dict[str, Any], answer: list[dict[str, Any]]) -> list[int]:
        text = render(
            self.tokenizer, [*example["prompt"], *answer], generation_prompt=False, tools=example.get("tools")
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(self, row: int, example: dict[str, Any]) -> dict[str, Any] | Dropped:
        if "chosen" not in example:
            return Dropped(
                row, f"reward needs preference data (prompt/chosen/rejected); got {sorted(example)}"
            )
        try:
            chosen, rejected = (self._ids(example, example[k]) for k in ("chosen", "rejected"))
        except TemplateError as err:
            return Dropped(row, str(err))
        # The score is read at the end of the sequence, so a pair cut to identical prefixes says nothing.
        if self.max_length is not None and max(len(chosen), len(rejected)) > self.max_length:
            chosen, rejected = chosen[: self.max_length], rejected[: self.max_length]
            if chosen == rejected:
                return Dropped(
                    row, f"chosen and rejected are identical after truncation to {self.max_length}"
                )
            truncated = True
        else:
            truncated = False
        feature = {"chosen_ids": chosen, "rejected_ids": rejected, "truncated": truncated}
        if example.get("margin") is not None:
            feature["margin"] = float(example["margin"])
        return feature

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        rows = [{"input_ids": f[f"{side}_ids"]} for side in ("chosen", "rejected") for f in features]
        batch = pad_right(rows, self.tokenizer.pad_token_id)
        if any("margin" in f for f in features):
            batch["margin"] = torch.tensor([f.get("margin", 0.0) for f in features], dtype=torch.float32)
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].size(0) // 2

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        import torch

        from tunelab.objectives.preference_losses import bradley_terry

        chosen, rejected = sequence_scores(model, batch)[:, 0].chunk(2)
        losses = bradley_terry(chosen, rejected, batch.get("margin"))
        if self.config.center_rewards_coefficient:
            losses = losses + self.config.center_rewards_coefficient * (chosen + rejected) ** 2
        margins = (chosen - rejected).detach()
        metrics = {"accuracy": float((margins > 0).float().mean()), "margin": float(margins.mean())}
        return LossOutput(losses.sum(), torch.tensor(losses.numel()), metrics)
