"""KTO (Ethayarajh et al., 2024): learn from answers labelled only desirable or undesirable.

Data: preference rows give two examples each, chosen = desirable and rejected = undesirable (as
TRL's ``unpair_preference_dataset`` does); unpaired rows ``{"prompt": [...], "completion": [...],
"label": bool}`` give one.

The KL reference point ``z`` is estimated, as in the paper and TRL, from *mismatched* pairs: each
example's prompt with another example's completion. The pairing is fixed before training in
``prepare`` (example of feature ``i`` gets the completion of feature ``i-1``, so prompts never
match their partner's), which also lets the reference log-probs of those pairs be precomputed.
Features that never went through ``prepare`` are paired the same way within their batch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tunelab.data.templates import IGNORE_INDEX, TemplateError
from tunelab.objectives.base import OBJECTIVES, Dropped, LossOutput, ObjectiveConfig
from tunelab.objectives.dpo import (
    ResponseObjective,
    model_device,
    precompute,
    reference_by_disabling,
    reference_mode,
    response_logps,
)
from tunelab.objectives.sft import pad_causal_batch

if TYPE_CHECKING:  # the config class is part of the recipe schema, which loads without the ML stack
    import torch
    from torch import nn


class KtoConfig(ObjectiveConfig):
    name: Literal["kto"] = "kto"
    beta: float = Field(0.1, gt=0, description="strength of the KL leash to the reference")
    desirable_weight: float = Field(1.0, gt=0, description="raise when desirable examples are the minority")
    undesirable_weight: float = Field(1.0, gt=0)
    precompute_reference: bool = False


def _split(example: dict[str, Any]) -> int:
    """Index of the first response token (everything before it is the prompt)."""
    return next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)


def kl_pairs(features: list[dict[str, Any]]) -> list[list[tuple[list[int], list[int]]]]:
    """For each feature's examples, the mismatched (ids, labels): own prompt + a completion of the
    previous feature (cycling through that feature's completions)."""
    out = []
    for i, feature in enumerate(features):
        partner = features[i - 1]["examples"]
        pairs = []
        for k, example in enumerate(feature["examples"]):
            other = partner[k % len(partner)]
            a, b = _split(example), _split(other)
            pairs.append(
                (example["input_ids"][:a] + other["input_ids"][b:], [IGNORE_INDEX] * a + other["labels"][b:])
            )
        out.append(pairs)
    return out


@OBJECTIVES.register("kto", KtoConfig)
class KtoObjective(ResponseObjective):
    """Kahneman–Tversky optimisation against the starting model as reference."""

    data_kinds = ("preference", "unpaired")

    def encode(self, row: int, example: dict[str, Any]) -> dict[str, Any] | Dropped:
        if "chosen" in example:
            answers = [(example["chosen"], True), (example["rejected"], False)]
        elif "completion" in example and "label" in example:
            answers = [(example["completion"], bool(example["label"]))]
        else:
            return Dropped(
                row, f"kto needs preference rows or prompt/completion/label rows; got {sorted(example)}"
            )
        examples, truncated = [], False
        for answer, desirable in answers:
            try:
                enc = self.encode_answer(example, answer)
            except TemplateError as err:
                return Dropped(row, str(err))
            if enc.n_loss_tokens == 0:
                return Dropped(
                    row, f"no response tokens left after truncation to max_length={self.max_length}"
                )
            truncated |= enc.truncated
            examples.append({"input_ids": enc.input_ids, "labels": enc.labels, "desirable": desirable})
        return {"examples": examples, "truncated": truncated}

    def prepare(
        self, model: nn.Module, train: list[dict[str, Any]], evaluation: list[dict[str, Any]]
    ) -> None:
        for split in (train, evaluation):
            for feature, pairs in zip(split, kl_pairs(split) if split else []):
                for example, (ids, labels) in zip(feature["examples"], pairs):
                    example["kl_ids"], example["kl_labels"] = ids, labels
        if not self.config.precompute_reference and reference_by_disabling(model):
            return
        device = model_device(model)

        def compute(m: nn.Module, chunk: list[dict[str, Any]]) -> None:
            batch = {k: v.to(device) for k, v in self.collate(chunk).items()}
            logps = response_logps(m, batch)[0].tolist()
            kl_logps = response_logps(m, kl_batch(batch))[0].tolist()
            examples = [e for f in chunk for e in f["examples"]]
            for example, ref, ref_kl in zip(examples, logps, kl_logps):
                example["ref_logps"], example["ref_kl_logps"] = ref, ref_kl

        precompute(model, [*train, *evaluation], compute)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        examples = [e for f in features for e in f["examples"]]
        if "kl_ids" in examples[0]:
            kl = [(e["kl_ids"], e["kl_labels"]) for e in examples]
        else:
            kl = [pair for pairs in kl_pairs(features) for pair in pairs]
        pad = self.tokenizer.pad_token_id
        batch = pad_causal_batch(examples, pad, side=self.padding_side)
        kl_rows = pad_causal_batch(
            [{"input_ids": i, "labels": lab} for i, lab in kl], pad, side=self.padding_side
        )
        batch |= {f"kl_{k}": v for k, v in kl_rows.items()}
        batch["desirable"] = torch.tensor([e["desirable"] for e in examples], dtype=torch.bool)
        for key in ("ref_logps", "ref_kl_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].size(0)

    def reference(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if "ref_logps" in batch:
            return batch["ref_logps"], batch["ref_kl_logps"]
        if not reference_by_disabling(model):
            raise RuntimeError(
                "kto: no reference log-probs for this batch and the model has no adapter to switch off; "
                "the objective's prepare() must run on these features before training"
            )
        with reference_mode(model):
            return response_logps(model, batch)[0], response_logps(model, kl_batch(batch))[0]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        import torch

        from tunelab.objectives.preference_losses import kto_kl_estimate, kto_loss

        cfg = self.config
        logps = response_logps(model, batch)[0]
        with torch.no_grad():  # the KL point is a detached estimate (as in TRL)
            kl_logps = response_logps(model, kl_batch(batch))[0]
        ref, ref_kl = self.reference(model, batch)
        kl = kto_kl_estimate(kl_logps, ref_kl)
        desirable = batch["desirable"]
        losses = kto_loss(logps, ref, desirable, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        rewards = cfg.beta * (logps - ref).detach()
        metrics = {"kl": float(kl)}
        if bool(desirable.any()):
            metrics["rewards/chosen"] = float(rewards[desirable].mean())
        if bool((~desirable).any()):
            metrics["rewards/rejected"] = float(rewards[~desirable].mean())
        if len(metrics) == 3:
            metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return LossOutput(losses.sum(), torch.tensor(losses.numel()), metrics)


def kl_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[f"kl_{k}"] for k in ("input_ids", "labels", "attention_mask")}
