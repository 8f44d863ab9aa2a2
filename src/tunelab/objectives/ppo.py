"""PPO for RLHF: rollouts from the policy, a reward per completion, a per-token KL penalty to the
reference, a value head, GAE, and several clipped epochs per rollout batch (Ziegler et al. 2019,
the recipe of InstructGPT). The loop is :func:`tunelab.train.rl.run_online`; formulas are in
:mod:`tunelab.objectives.rl_losses`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunelab.objectives.base import OBJECTIVES
from tunelab.objectives.online import OnlineObjective, RolloutConfig


class PpoConfig(RolloutConfig):
    name: Literal["ppo"] = "ppo"
    ppo_epochs: int = Field(4, ge=1, description="passes over each rollout batch")
    clip_range: float = Field(0.2, gt=0, description="policy ratio clip ε")
    clip_range_value: float = Field(0.2, gt=0, description="value clip around the rollout's values")
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss")
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty β (initial value when adaptive)")
    target_kl: float | None = Field(
        None, gt=0, description="adapt β towards this KL per completion (Ziegler et al.); None = fixed β"
    )
    kl_horizon: int = Field(10_000, ge=1, description="adaptive β: horizon of the proportional controller")
    kl_estimator: Literal["k1", "k3"] = "k1"
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = Field(
        None, description="subtract this from the score of completions that never end (ran out of tokens)"
    )


@OBJECTIVES.register("ppo", PpoConfig)
class PpoObjective(OnlineObjective):
    """PPO with a value head on the policy's last hidden state (saved as ``value_head.safetensors``)."""
