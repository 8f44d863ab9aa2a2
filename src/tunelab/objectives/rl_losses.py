"""Online RL losses as pure functions on tensors: KL estimators, GAE, whitening, PPO and GRPO.

Shapes: per-token tensors are ``(B, T)`` over the *completion* tokens only, with ``mask`` 1 on real
completion tokens and 0 on padding after the end of a completion. Every reduction is masked, so
padding never moves a loss or a statistic.
"""

from __future__ import annotations

from typing import Literal

import torch

from tunelab.objectives.rl_types import GRPO_LOSS_TYPES, GrpoLossType

KlEstimator = Literal["k1", "k3"]


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1 (over all elements, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1.0)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked elements, with Bessel's correction by default."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise to unit variance over the masked elements (zero mean too, unless ``shift_mean`` is off).

    PPO whitens advantages so one learning rate suits rewards of any scale; rewards themselves are
    whitened without the shift, which would otherwise turn "all good" into "half bad".
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: KlEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy ‖ reference) from samples of the policy (Schulman's k1/k3).

    ``k1 = log p − log q`` is unbiased but can be negative per token; ``k3 = q/p − log(q/p) − 1`` is
    unbiased and never negative (GRPO's choice).
    """
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_ratio = ref_logp - logp
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"unknown KL estimator {kind!r}; use 'k1' or 'k3'")


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; returns ``(advantages, returns)``, both zero on padding.

    ``δ_t = r_t + γ V_{t+1} − V_t`` and ``A_t = δ_t + γλ A_{t+1}``, with ``V`` after the last real
    token taken as 0 (the episode ends with the completion). ``returns = A + V`` is the value target.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        next_value = values[:, t + 1] if t + 1 < values.size(1) else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate ``mean(max(−A·r, −A·clip(r, 1−ε, 1+ε)))`` with ``r = π/π_old`` per token.

    Also returns ``clip_frac`` (share of tokens where the clipped term was the active one) and
    ``approx_kl`` (k3 estimate of KL(π_old ‖ π), the usual early-warning for too-large updates).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {
        "clip_frac": masked_mean((clipped > unclipped).float(), mask),
        "approx_kl": masked_mean(torch.exp(-log_ratio) + log_ratio - 1.0, mask),
    }
    return loss, stats


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss ``½·mean(max((V−R)², (V_clip−R)²))``, ``V_clip`` within ``clip`` of the old
    value; returns ``(loss, clip_frac)``."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    plain = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(plain, clipped), mask)
    return loss, masked_mean((clipped > plain).float(), mask)


def adaptive_kl(coef: float, kl: float, target: float, n: int, horizon: int) -> float:
    """Ziegler et al.'s proportional controller: move β by at most ±20% × n/horizon towards ``target``."""
    error = max(-0.2, min(0.2, kl / target - 1.0))
    return coef * (1.0 + error * n / horizon)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantages: each reward minus its group's mean, divided by the group's std (unbiased) + ``eps``.

    ``rewards`` is flat, ``group_size`` consecutive completions per prompt. With ``scale`` off the
    std division is skipped (Dr. GRPO: scaling favours prompts that are too easy or too hard).
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        std = grouped.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
        advantages = advantages / (std + eps)
    return advantages.reshape(-1)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.04,
    loss_type: GrpoLossType = "grpo",
    max_completion_length: int | None = None,
    num_items: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The GRPO family: a surrogate with one advantage per sequence, plus ``beta``·k3 KL to the reference.

    The per-token term and the normalisation depend on ``loss_type`` (each matches TRL 1.16's
    ``GRPOTrainer`` with the same ``loss_type``; ``gspo`` is TRL's ``importance_sampling_level:
    sequence``):

    - ``grpo`` (Shao et al. 2024): clipped ratio ``r = π/π_old`` per token, clip
      ``[1 − clip_low, 1 + clip_high]`` (``clip_high > clip_low`` is DAPO's clip-higher); each
      sequence averaged over its tokens, then the sequences averaged (a length bias);
    - ``bnpo``: the same term averaged over all tokens of the batch;
    - ``dr_grpo`` (Liu et al. 2025): the sum divided by ``B × max_completion_length`` (no length bias);
    - ``dapo`` (Yu et al. 2025): token-level, the sum divided by ``num_items``, the number of
      completion tokens in the whole rollout batch per optimizer step (default: this batch's);
    - ``gspo`` (Zheng et al. 2025): one ratio per sequence, ``exp(mean_t log r_t)``, clipped, as the
      ``grpo`` average (use small clips, e.g. 3e-4 / 4e-4);
    - ``cispo`` (MiniMax-M1, 2025): REINFORCE on the importance weight clipped from above and
      detached, ``−sg(min(r, 1 + clip_high)) · A · log π``, normalised as ``dapo``: no token's
      gradient is dropped, only its weight bounded.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; use one of {', '.join(GRPO_LOSS_TYPES)}")
    mask = mask.to(logp.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    log_ratio = logp - old_logp
    if loss_type == "gspo":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=1.0 + clip_high).detach() * adv * logp
    else:
        clipped_ratio = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        per_token = -torch.min(ratio * adv, clipped_ratio * adv)
    stats: dict[str, torch.Tensor] = {}
    if beta != 0.0 and ref_logp is not None:
        kl = kl_estimate(logp, ref_logp, "k3")
        per_token = per_token + beta * kl
        stats["kl"] = masked_mean(kl, mask)
    per_token = per_token.expand_as(mask)
    if loss_type in ("grpo", "gspo"):
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = masked_mean(per_token, mask)
    elif loss_type == "dr_grpo":
        length = max_completion_length or mask.size(1)
        loss = (per_token * mask).sum() / (per_token.size(0) * length)
    else:  # dapo, cispo
        items = mask.sum() if num_items is None else torch.as_tensor(num_items, dtype=mask.dtype)
        loss = (per_token * mask).sum() / items.clamp(min=1.0)
    if loss_type == "cispo":
        clipped = (ratio > 1.0 + clip_high).expand_as(mask)
    else:
        clipped = (
            ((ratio < 1.0 - clip_low) & (adv < 0)) | ((ratio > 1.0 + clip_high) & (adv > 0))
        ).expand_as(mask)
    stats["clip_frac"] = masked_mean(clipped, mask)
    return loss, stats


def soft_overlong_penalty(
    lengths: torch.Tensor, max_length: int, buffer: int, factor: float = 1.0
) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to a completion's score: 0 up to
    ``max_length − buffer`` tokens, then falling linearly to ``−factor`` at ``max_length``."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in 1..{max_length} (max_new_tokens), got {buffer}")
    start = max_length - buffer
    return -factor * ((lengths.float() - start) / buffer).clamp(min=0.0, max=1.0)


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """One bool per group: True where every completion got the same reward (zero advantage, no
    learning signal; DAPO's dynamic sampling drops these groups)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(dim=1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the categorical distribution given by ``logits`` (last dim)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` per position, computed in fp32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
