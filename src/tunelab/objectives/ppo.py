"""PPO for RLHF: rollouts from the policy, a reward per completion, a per-token KL penalty to the
reference, a value head, GAE, and several clipped epochs per rollout batch (Ziegler et al. 2019,
the recipe of InstructGPT). The loop is :func:`tunelab.train.rl.run_online`; formulas are in
:mod:`tunelab.objectives.rl_losses`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tunelab.objectives.base import OBJECTIVES
from tunelab.objectives.online import OnlineObjective, RolloutConfig

if TYPE_CHECKING:
    import torch


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

    value_head = True
    adapts_kl = True
    config: PpoConfig

    @property
    def passes(self) -> int:
        return self.config.ppo_epochs

    @property
    def kl_weight(self) -> float:
        return self.config.kl_coef

    def advantages(self, batch: Any, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
        """KL-shaped per-token rewards (the score on the last token) → GAE, whitened."""
        import torch  # noqa: PLC0415  (the schema imports this module without torch)

        from tunelab.objectives.rl_losses import gae, kl_estimate, whiten  # noqa: PLC0415

        cfg = self.config
        if batch.ref_logp is None:
            kl = torch.zeros_like(batch.old_logp)
        else:
            kl = kl_estimate(batch.old_logp, batch.ref_logp, cfg.kl_estimator) * batch.mask
        rewards = -kl_coef * kl
        last = (batch.mask.sum(dim=1).long() - 1).clamp(min=0)
        rewards[torch.arange(rewards.size(0)), last] += batch.scores
        if cfg.whiten_rewards:
            rewards = whiten(rewards, batch.mask, shift_mean=False)
        advantages, returns = gae(rewards, batch.values, batch.mask, cfg.gamma, cfg.lam)
        advantages = whiten(advantages, batch.mask)
        return advantages, returns, {"non_score_reward": float((-kl_coef * kl).sum(1).mean())}

    def minibatch_loss(
        self, logp: Any, values: Any, batch: Any, advantages: Any, returns: Any, num_items: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from tunelab.objectives.rl_losses import ppo_policy_loss, ppo_value_loss  # noqa: PLC0415

        cfg = self.config
        policy_loss, stats = ppo_policy_loss(logp, batch.old_logp, advantages, batch.mask, cfg.clip_range)
        value_loss, value_clip = ppo_value_loss(
            values, batch.values, returns, batch.mask, cfg.clip_range_value
        )
        loss = policy_loss + cfg.vf_coef * value_loss
        return loss, {
            **stats,
            "value_loss": value_loss,
            "value_clip_frac": value_clip,
            "policy_loss": policy_loss,
        }

    def next_kl_coef(self, kl_coef: float, kl: float, n: int) -> float:
        if self.config.target_kl is None:
            return kl_coef
        from tunelab.objectives.rl_losses import adaptive_kl  # noqa: PLC0415

        return adaptive_kl(kl_coef, kl, self.config.target_kl, n, self.config.kl_horizon)
