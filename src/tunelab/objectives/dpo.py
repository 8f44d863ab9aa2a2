"""The DPO family on preference pairs: ``dpo`` (sigmoid / ipo / hinge / robust), ``simpo`` and ``orpo``.

All three share the encoding (prompt + chosen and prompt + rejected, loss mask on the response
only), the batching (chosen and rejected rows in one forward pass) and the log-prob computation;
they differ in the formula (``preference_losses``) and in whether a reference model is needed.

The reference of ``dpo`` (and ``kto``) is the model training starts from. For a PEFT adapter it is
the same model with the adapter switched off (``disable_adapter``): no second copy in memory, one
extra forward pass without gradients per step. Otherwise (full fine-tuning, non-PEFT methods, or
``precompute_reference: true``) the reference log-probs are computed once in ``prepare`` before
the first step and stored in the features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tunelab.data.templates import IGNORE_INDEX, Encoded, TemplateError, encode_conversation
from tunelab.methods.lora import rewrites_base
from tunelab.objectives.base import OBJECTIVES, BaseObjective, Dropped, LossOutput, ObjectiveConfig
from tunelab.objectives.sft import causal_lm_forward, pad_causal_batch, prepends_virtual_tokens

if TYPE_CHECKING:  # the config classes are part of the recipe schema, which loads without the ML stack
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

REFERENCE_BATCH = 8


class DpoConfig(ObjectiveConfig):
    name: Literal["dpo"] = "dpo"
    beta: float = Field(0.1, gt=0, description="strength of the KL leash to the reference (higher = closer)")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="assumed label-flip rate (sigmoid: cDPO, robust: rDPO)"
    )
    precompute_reference: bool = False
    """Compute reference log-probs once before training even for adapters (saves a forward per step)."""

    @model_validator(mode="after")
    def _smoothing_applies(self) -> DpoConfig:
        if self.label_smoothing and self.loss_type not in ("sigmoid", "robust"):
            raise ValueError(
                f"label_smoothing applies to loss_type sigmoid or robust, not {self.loss_type!r}; remove it"
            )
        return self


class SimpoConfig(ObjectiveConfig):
    name: Literal["simpo"] = "simpo"
    beta: float = Field(2.0, gt=0, description="scale of the length-averaged log-prob reward")
    gamma: float = Field(1.0, ge=0, description="target reward margin (SimPO's γ; γ/β = 0.5 by default)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class OrpoConfig(ObjectiveConfig):
    name: Literal["orpo"] = "orpo"
    beta: float = Field(0.1, gt=0, description="weight of the odds-ratio term (the paper's λ; TRL's beta)")


def encode_response(
    tokenizer: PreTrainedTokenizerBase,
    prompt: list[dict[str, Any]],
    response: list[dict[str, Any]],
    max_length: int | None,
    *,
    tools: list[dict[str, Any]] | None = None,
    train_on_reasoning: bool = True,
) -> Encoded:
    """Tokenize prompt + response with the chat template; loss only on the response's assistant turns
    (assistant turns inside the prompt are context, not something to prefer, so they get weight 0)."""
    context = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in prompt]
    seqs = encode_conversation(
        tokenizer,
        [*context, *response],
        tools=tools,
        max_length=max_length,
        train_on_reasoning=train_on_reasoning,
    )
    if len(seqs) != 1:
        raise TemplateError(
            "the response has several assistant turns and the chat template rewrites earlier turns, so "
            "it cannot be scored as one sequence; use single-turn responses or another data.template"
        )
    return seqs[0]


def response_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of response-token log-probs (float32) and the number of response tokens."""
    import torch.nn.functional as F

    logits, labels = causal_lm_forward(model, batch)
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    token_logps = -F.cross_entropy(
        logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return token_logps.sum(-1), (labels != IGNORE_INDEX).sum(-1)


def peft_model_of(model: nn.Module) -> nn.Module | None:
    """The PEFT model inside (possibly accelerate-wrapped) ``model``, or None."""
    inner = getattr(model, "module", model)
    return inner if hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config") else None


def reference_by_disabling(model: nn.Module) -> bool:
    """True when switching the adapter off gives back the model training started from."""
    peft = peft_model_of(model)
    if peft is None:
        return False
    for config in peft.peft_config.values():
        # Such inits moved base weights into the adapter: the reference must be precomputed instead.
        if rewrites_base(getattr(config, "init_lora_weights", True)):
            return False
    return True


@contextmanager
def reference_mode(model: nn.Module) -> Iterator[None]:
    """No gradients, adapter switched off: the reference model without a copy."""
    import torch

    with torch.no_grad(), peft_model_of(model).disable_adapter():
        yield


def precompute(
    model: nn.Module,
    features: list[dict[str, Any]],
    compute: Callable[[nn.Module, list[dict[str, Any]]], None],
) -> None:
    """Run ``compute(model, features_chunk)`` in eval mode, without gradients, over ``features`` in small
    chunks."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(features), REFERENCE_BATCH):
                compute(model, features[start : start + REFERENCE_BATCH])
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class ResponseObjective(BaseObjective):
    """Objectives scored by the log-probability of whole responses (the DPO family, KTO): per-example
    units, left padding (right for virtual-token methods, as in SFT)."""

    units_are_tokens = False

    def __init__(self, cfg: Any, tokenizer: PreTrainedTokenizerBase, data_cfg: Any) -> None:
        self.config = cfg
        self.tokenizer = tokenizer
        self.max_length = getattr(data_cfg, "max_length", None)
        self.train_on_reasoning = getattr(data_cfg, "train_on_reasoning", True)
        self.padding_side = "left"

    def adapt_to(self, model: nn.Module) -> None:
        self.padding_side = "right" if prepends_virtual_tokens(model) else "left"

    def encode_answer(self, example: dict[str, Any], answer: list[dict[str, Any]]) -> Encoded:
        """``example``'s prompt (and tools) followed by ``answer``, loss on the answer only."""
        return encode_response(
            self.tokenizer,
            example["prompt"],
            answer,
            self.max_length,
            tools=example.get("tools"),
            train_on_reasoning=self.train_on_reasoning,
        )


class PairwiseObjective(ResponseObjective):
    """Shared encoding, batching and log-probs of the preference-pair objectives."""

    data_kinds = ("preference",)

    def encode(self, row: int, example: dict[str, Any]) -> dict[str, Any] | Dropped:
        if "chosen" not in example:
            return Dropped(
                row,
                f"{self.config.name} needs preference data (prompt/chosen/rejected); got {sorted(example)}",
            )
        try:
            chosen = self.encode_answer(example, example["chosen"])
            rejected = self.encode_answer(example, example["rejected"])
        except TemplateError as err:
            return Dropped(row, str(err))
        if chosen.n_loss_tokens == 0 or rejected.n_loss_tokens == 0:
            return Dropped(row, f"no response tokens left after truncation to max_length={self.max_length}")
        return {
            "chosen_ids": chosen.input_ids,
            "chosen_labels": chosen.labels,
            "rejected_ids": rejected.input_ids,
            "rejected_labels": rejected.labels,
            "truncated": chosen.truncated or rejected.truncated,
        }

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Chosen rows first, then rejected rows, in one padded batch (one forward pass for both)."""
        import torch

        rows = [
            {"input_ids": f[f"{side}_ids"], "labels": f[f"{side}_labels"]}
            for side in ("chosen", "rejected")
            for f in features
        ]
        batch = pad_causal_batch(rows, self.tokenizer.pad_token_id, side=self.padding_side)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in features[0]:
                batch[key] = torch.tensor([f[key] for f in features], dtype=torch.float32)
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].size(0) // 2

    def policy_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """(chosen, rejected) summed log-probs and (chosen, rejected) response lengths."""
        logps, lengths = response_logps(model, batch)
        return logps.chunk(2), lengths.chunk(2)


def pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    margins = (chosen_rewards - rejected_rewards).detach()
    return {
        "rewards/chosen": float(chosen_rewards.detach().mean()),
        "rewards/rejected": float(rejected_rewards.detach().mean()),
        "rewards/margins": float(margins.mean()),
        "rewards/accuracy": float((margins > 0).float().mean()),
    }


@OBJECTIVES.register("dpo", DpoConfig)
class DpoObjective(PairwiseObjective):
    """Direct preference optimisation against a frozen reference (Rafailov et al., 2023) and variants."""

    def live_reference(self, model: nn.Module) -> bool:
        return not self.config.precompute_reference and reference_by_disabling(model)

    def prepare(
        self, model: nn.Module, train: list[dict[str, Any]], evaluation: list[dict[str, Any]]
    ) -> None:
        if self.live_reference(model):
            return
        device = model_device(model)

        def compute(m: nn.Module, chunk: list[dict[str, Any]]) -> None:
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            chosen, rejected = response_logps(m, batch)[0].chunk(2)
            for feature, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                feature["ref_chosen_logps"], feature["ref_rejected_logps"] = c, r

        precompute(model, [f for f in [*train, *evaluation] if "ref_chosen_logps" not in f], compute)

    def reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        if not reference_by_disabling(model):
            raise RuntimeError(
                "dpo: no reference log-probs for this batch and the model has no adapter to switch off; "
                "the objective's prepare() must run on these features before training"
            )
        with reference_mode(model):
            return response_logps(model, batch)[0].chunk(2)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        import torch

        from tunelab.objectives.preference_losses import dpo_loss

        cfg = self.config
        (chosen, rejected), (chosen_len, rejected_len) = self.policy_logps(model, batch)
        ref_chosen, ref_rejected = self.reference_logps(model, batch)
        losses = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            cfg.beta,
            cfg.loss_type,
            cfg.label_smoothing,
            chosen_lengths=chosen_len,
            rejected_lengths=rejected_len,
        )
        metrics = pair_metrics(cfg.beta * (chosen - ref_chosen), cfg.beta * (rejected - ref_rejected))
        return LossOutput(losses.sum(), torch.tensor(losses.numel()), metrics)


@OBJECTIVES.register("simpo", SimpoConfig)
class SimpoObjective(PairwiseObjective):
    """SimPO (Meng et al., 2024): reference-free, rewards are β × length-averaged log-probs."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        import torch

        from tunelab.objectives.preference_losses import simpo_loss

        cfg = self.config
        (chosen, rejected), (chosen_len, rejected_len) = self.policy_logps(model, batch)
        chosen_avg, rejected_avg = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
        losses = simpo_loss(chosen_avg, rejected_avg, cfg.beta, cfg.gamma, cfg.label_smoothing)
        metrics = pair_metrics(cfg.beta * chosen_avg, cfg.beta * rejected_avg)
        return LossOutput(losses.sum(), torch.tensor(losses.numel()), metrics)


@OBJECTIVES.register("orpo", OrpoConfig)
class OrpoObjective(PairwiseObjective):
    """ORPO (Hong et al., 2024): SFT on the chosen answer plus an odds-ratio preference term, no reference.

    The NLL is the chosen answer's mean per-token NLL, one value per pair as in the paper (TRL
    averages tokens over the whole batch instead; identical when answers have equal length).
    """

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        import torch

        from tunelab.objectives.preference_losses import orpo_log_odds_ratio, orpo_loss

        cfg = self.config
        (chosen, rejected), (chosen_len, rejected_len) = self.policy_logps(model, batch)
        chosen_avg, rejected_avg = chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1)
        losses = orpo_loss(-chosen_avg, chosen_avg, rejected_avg, cfg.beta)
        ratio = orpo_log_odds_ratio(chosen_avg, rejected_avg)
        metrics = pair_metrics(cfg.beta * chosen_avg, cfg.beta * rejected_avg)
        metrics |= {"nll": float(-chosen_avg.detach().mean()), "log_odds_ratio": float(ratio.detach().mean())}
        return LossOutput(losses.sum(), torch.tensor(losses.numel()), metrics)
