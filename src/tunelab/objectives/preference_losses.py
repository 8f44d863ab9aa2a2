"""Preference losses as pure functions of per-example tensors (one value per pair or example).

Every function returns *per-example* losses; the objective sums them and reports the count, so the
engine's normalisation over an accumulated step stays exact. Inputs are summed (or, where a loss is
length-normalised, averaged) log-probabilities of responses; the formulas follow the papers and are
checked against TRL on identical tensors in the test suite.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DpoLossType = Literal["sigmoid", "ipo", "hinge", "robust"]


def bradley_terry(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, margin: torch.Tensor | None = None
) -> torch.Tensor:
    """Reward-model loss ``-log σ(r_c - r_r - m)``: the chosen answer should score higher by ``margin``."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: DpoLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair DPO-family loss from summed log-probs of policy and reference.

    ``sigmoid``: DPO, with conservative label smoothing (cDPO) when ``label_smoothing`` > 0.
    ``ipo``: squared distance of the per-token log-ratio margin from ``1/(2β)``; needs the response
    lengths (TRL normalises by them too, as the IPO authors did). ``hinge``: SLiC's ``relu(1 - β·Δ)``.
    ``robust``: rDPO, unbiased under a label-flip rate ``label_smoothing`` < 0.5.
    """
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        return (
            -F.logsigmoid(beta * delta) * (1 - label_smoothing)
            - F.logsigmoid(-beta * delta) * label_smoothing
        )
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                "loss_type='ipo' needs chosen_lengths and rejected_lengths (response token counts)"
            )
        per_token = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(
            min=1
        )
        return (per_token - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "robust":
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss_type {loss_type!r}; use sigmoid, ipo, hinge or robust")


def simpo_loss(
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """SimPO: reference-free, on *length-averaged* log-probs, with target reward margin ``gamma``:
    ``-log σ(β·(avg_c - avg_r) - γ)`` (label smoothing as in cDPO)."""
    logits = policy_chosen_avg_logps - policy_rejected_avg_logps - gamma / beta
    return (
        -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing
    )


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near both ends (Mächler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds_ratio(
    policy_chosen_avg_logps: torch.Tensor, policy_rejected_avg_logps: torch.Tensor
) -> torch.Tensor:
    """ORPO's ``log σ(log odds(y_c) - log odds(y_r))`` with ``odds(y) = p / (1 - p)`` on the
    per-token average log-prob; the objective *subtracts* ``λ ×`` this from the SFT loss."""
    chosen = policy_chosen_avg_logps.float()
    rejected = policy_rejected_avg_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return F.logsigmoid(log_odds)


def orpo_loss(
    chosen_nll: torch.Tensor,
    policy_chosen_avg_logps: torch.Tensor,
    policy_rejected_avg_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Per-pair ORPO: mean-token NLL of the chosen answer minus ``β`` (the paper's λ) × the log odds ratio."""
    return chosen_nll - beta * orpo_log_odds_ratio(policy_chosen_avg_logps, policy_rejected_avg_logps)


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point: the batch mean log-ratio on mismatched (prompt, completion) pairs,
    clamped at zero and detached (it sets the level, it is not trained through)."""
    if policy_kl_logps.numel() == 0:
        return torch.zeros((), device=policy_kl_logps.device)
    return (policy_kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """Per-example KTO (Eq. 7): desirable ``w_d·(1 - σ(β(r - z)))``, undesirable ``w_u·(1 - σ(β(z - r)))``
    with ``r`` the policy/reference log-ratio and ``z`` the KL reference point."""
    ratio = policy_logps - ref_logps
    good = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(desirable.bool(), good, bad)
