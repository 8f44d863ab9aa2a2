"""Preference evaluation on held-out pairs: reward-model ranking accuracy and DPO implicit rewards.

Pairs are encoded, batched and scored by the training objectives' own code
(:class:`~tunelab.objectives.reward.RewardObjective` for reward models,
:class:`~tunelab.objectives.dpo.DpoObjective` and :func:`~tunelab.objectives.dpo.response_logps`
for policies), so a pair is judged on exactly the tokens the loss saw. A tie (margin exactly 0) is
not a correct ranking, as in the objectives' training metrics.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunelab.data.formats import FormatError, to_canonical
from tunelab.evaluate.classify import inference
from tunelab.objectives.base import Dropped
from tunelab.objectives.classify import sequence_scores
from tunelab.objectives.dpo import (
    DpoConfig,
    DpoObjective,
    model_device,
    reference_by_disabling,
    reference_mode,
    response_logps,
)
from tunelab.objectives.reward import RewardConfig, RewardObjective


def canonical_pairs(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs in the canonical preference shape; plain-string prompt/chosen/rejected are accepted too."""
    out = []
    for i, pair in enumerate(pairs):
        try:
            out.append(to_canonical(pair, "preference"))
        except FormatError as err:
            raise ValueError(f"pair {i}: {err}") from err
    return out


def encode_pairs(objective: Any, pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Features for every pair; a pair the objective cannot encode is an error, never skipped silently."""
    if not pairs:
        raise ValueError("no preference pairs to evaluate; pass at least one {prompt, chosen, rejected}")
    features = [objective.encode(i, pair) for i, pair in enumerate(canonical_pairs(pairs))]
    dropped = [f for f in features if isinstance(f, Dropped)]
    if dropped:
        first = dropped[0]
        raise ValueError(f"{len(dropped)} pair(s) cannot be scored; pair {first.row}: {first.reason}")
    return features


def ranking_summary(
    chosen: list[float], rejected: list[float], accuracy_key: str, margin_key: str
) -> dict[str, Any]:
    """Accuracy (chosen strictly above rejected), mean margin and per-example results."""
    margins = [c - r for c, r in zip(chosen, rejected)]
    correct = [m > 0 for m in margins]
    n = len(margins)
    return {
        accuracy_key: sum(correct) / n,
        margin_key: sum(margins) / n,
        "chosen_mean": sum(chosen) / n,
        "rejected_mean": sum(rejected) / n,
        "n": n,
        "per_example": correct,
        "margins": margins,
    }


def _batches(objective: Any, features: list[dict[str, Any]], batch_size: int, device: torch.device):
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for start in range(0, len(features), batch_size):
        yield {k: v.to(device) for k, v in objective.collate(features[start : start + batch_size]).items()}


def evaluate_reward_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[dict[str, Any]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, Any]:
    """How often a reward model scores the chosen answer above the rejected one, and by how much.

    Keys: ``reward_accuracy``, ``reward_margin_mean``, ``chosen_mean``, ``rejected_mean`` (mean
    scores), ``n``, ``per_example`` (correct or not) and ``margins`` (chosen − rejected score).
    """
    objective = RewardObjective(
        RewardConfig(), tokenizer, SimpleNamespace(max_length=max_length, packing=False)
    )
    features = encode_pairs(objective, pairs)
    chosen: list[float] = []
    rejected: list[float] = []
    with inference(model):
        for batch in _batches(objective, features, batch_size, model_device(model)):
            c, r = sequence_scores(model, batch)[:, 0].chunk(2)
            chosen += c.tolist()
            rejected += r.tolist()
    return ranking_summary(chosen, rejected, "reward_accuracy", "reward_margin_mean")


def _reference_logps(
    policy: nn.Module, reference: nn.Module | None, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    if reference is None:
        with reference_mode(policy):
            return response_logps(policy, batch)[0].chunk(2)
    device = model_device(reference)
    with inference(reference):
        logps = response_logps(reference, {k: v.to(device) for k, v in batch.items()})[0]
    return logps.to(batch["input_ids"].device).chunk(2)


def evaluate_dpo_implicit_reward(
    policy: nn.Module,
    reference: nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    pairs: list[dict[str, Any]],
    *,
    beta: float,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, Any]:
    """DPO's implicit reward r = β (log π(y|x) − log π_ref(y|x)) on chosen vs rejected answers.

    ``reference=None`` means the policy is a PEFT adapter whose reference is the same model with
    the adapter switched off (as in training). Keys: ``implicit_reward_accuracy``,
    ``implicit_margin_mean``, ``chosen_mean``, ``rejected_mean`` (mean implicit rewards), ``n``,
    ``per_example`` and ``margins``.
    """
    if reference is None and not reference_by_disabling(policy):
        raise ValueError(
            "reference=None needs a PEFT policy whose reference is the base with the adapter off "
            "(a LoRA init such as pissa/olora/loftq rewrites the base); pass the reference model explicitly"
        )
    objective = DpoObjective(
        DpoConfig(beta=beta), tokenizer, SimpleNamespace(max_length=max_length, packing=False)
    )
    objective.adapt_to(policy)
    features = encode_pairs(objective, pairs)
    chosen: list[float] = []
    rejected: list[float] = []
    with inference(policy):
        for batch in _batches(objective, features, batch_size, model_device(policy)):
            policy_chosen, policy_rejected = response_logps(policy, batch)[0].chunk(2)
            ref_chosen, ref_rejected = _reference_logps(policy, reference, batch)
            chosen += (beta * (policy_chosen - ref_chosen)).tolist()
            rejected += (beta * (policy_rejected - ref_rejected)).tolist()
    return ranking_summary(chosen, rejected, "implicit_reward_accuracy", "implicit_margin_mean")
