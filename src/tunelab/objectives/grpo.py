"""GRPO (Shao et al. 2024): several completions per prompt, advantages relative to the group, a
clipped surrogate and a k3 KL penalty to the reference; no value model. The loop is
:func:`tunelab.train.rl.run_online`; the loss family (grpo, bnpo, dr_grpo, dapo, gspo, cispo) is
:func:`tunelab.objectives.rl_losses.grpo_loss`; DAPO's clip-higher, dynamic sampling and overlong
handling are settings here (docs/objectives.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tunelab.objectives.base import OBJECTIVES
from tunelab.objectives.online import OnlineObjective, RolloutConfig
from tunelab.objectives.rl_types import GrpoLossType

if TYPE_CHECKING:
    import torch


class GrpoConfig(RolloutConfig):
    name: Literal["grpo"] = "grpo"
    num_generations: int = Field(4, ge=2, description="completions per prompt (the group)")
    num_iterations: int = Field(1, ge=1, description="passes over each rollout batch (μ)")
    beta: float = Field(0.04, ge=0, description="weight of the KL penalty to the reference")
    clip_range: float = Field(0.2, gt=0, description="ratio clip ε_low (TRL's epsilon)")
    clip_range_high: float | None = Field(
        None,
        gt=0,
        description="ratio clip ε_high (TRL's epsilon_high); above clip_range = DAPO's clip-higher; "
        "for cispo the importance weight is capped at 1 + ε_high. Default: clip_range",
    )
    scale_rewards: bool = Field(True, description="divide by the group's reward std (off = Dr. GRPO)")
    loss_type: GrpoLossType = Field(
        "grpo", description="grpo, bnpo, dr_grpo, dapo, gspo or cispo (docs/objectives.md)"
    )
    missing_eos_penalty: float | None = Field(
        None, description="subtract this from the score of completions that never end (ran out of tokens)"
    )
    mask_truncated_completions: bool = Field(
        False, description="leave completions that never end (ran out of tokens) out of the loss"
    )
    overlong_buffer: int | None = Field(
        None,
        ge=1,
        description="DAPO's soft overlong penalty: the score falls linearly over the last this many "
        "tokens before max_new_tokens, to -overlong_penalty",
    )
    overlong_penalty: float = Field(
        1.0, ge=0, description="size of the soft overlong penalty at max_new_tokens"
    )
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling: drop groups whose rewards are all equal and refill the "
        "batch from the next prompts (at most max_refills extra rollouts per step)",
    )
    max_refills: int = Field(4, ge=1, description="dynamic sampling: extra rollout batches per step at most")

    @model_validator(mode="after")
    def _overlong_fits(self) -> GrpoConfig:
        if self.overlong_buffer is not None and self.overlong_buffer > self.max_new_tokens:
            raise ValueError(
                f"overlong_buffer={self.overlong_buffer} is longer than max_new_tokens={self.max_new_tokens}; "
                "make it at most max_new_tokens"
            )
        return self


@OBJECTIVES.register("grpo", GrpoConfig)
class GrpoObjective(OnlineObjective):
    """Group-relative policy optimisation."""

    config: GrpoConfig

    @property
    def group(self) -> int:
        return self.config.num_generations

    @property
    def passes(self) -> int:
        return self.config.num_iterations

    @property
    def kl_weight(self) -> float:
        return self.config.beta

    def advantages(self, batch: Any, kl_coef: float) -> tuple[torch.Tensor, None, dict[str, float]]:
        """One group-relative advantage per completion."""
        from tunelab.objectives.rl_losses import group_advantages  # noqa: PLC0415  (torch, at run time)

        return group_advantages(batch.scores, self.group, scale=self.config.scale_rewards), None, {}

    def minibatch_loss(
        self, logp: Any, values: Any, batch: Any, advantages: Any, returns: Any, num_items: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        from tunelab.objectives.rl_losses import grpo_loss  # noqa: PLC0415

        loss, stats = grpo_loss(
            logp,
            batch.old_logp,
            batch.ref_logp,
            advantages,
            batch.mask,
            clip_low=cfg.clip_range,
            clip_high=cfg.clip_range_high or cfg.clip_range,
            beta=cfg.beta,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_new_tokens,
            num_items=num_items,
        )
        stats.pop("kl", None)  # the step's KL is measured on the rollout, the same way for both
        return loss, stats
