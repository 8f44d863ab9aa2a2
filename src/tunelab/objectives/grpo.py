"""GRPO (Shao et al. 2024): several completions per prompt, advantages relative to the group, a
clipped surrogate and a k3 KL penalty to the reference; no value model. The loop is
:func:`tunelab.train.rl.run_online`; the loss is :func:`tunelab.objectives.rl_losses.grpo_loss`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.objectives.base import OBJECTIVES
from tunelab.objectives.online import OnlineObjective, RolloutConfig


class GrpoConfig(RolloutConfig):
    name: Literal["grpo"] = "grpo"
    num_generations: int = Field(4, ge=2, description="completions per prompt (the group)")
    num_iterations: int = Field(1, ge=1, description="passes over each rollout batch (μ)")
    beta: float = Field(0.04, ge=0, description="weight of the KL penalty to the reference")
    clip_range: float = Field(0.2, gt=0, description="ratio clip ε (lower side)")
    clip_range_high: float | None = Field(None, gt=0, description="upper clip; default = clip_range")
    scale_rewards: bool = Field(True, description="divide by the group's reward std (off = Dr. GRPO)")
    loss_type: Literal["grpo", "bnpo", "dr_grpo"] = "grpo"
    missing_eos_penalty: float | None = Field(
        None, description="subtract this from the score of completions that never end (ran out of tokens)"
    )


@OBJECTIVES.register("grpo", GrpoConfig)
class GrpoObjective(OnlineObjective):
    """Group-relative policy optimisation."""
