"""Sequence classification: a new head on a decoder or encoder model, labels taken from the data."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from tunelab.objectives.base import OBJECTIVES, BaseObjective, Dropped, LossOutput, ObjectiveConfig

if TYPE_CHECKING:  # the config class is part of the recipe schema, which loads without the ML stack
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

HEAD_NAMES = ("score", "classifier")


class ClassifyConfig(ObjectiveConfig):
    name: Literal["classify"] = "classify"
    labels: list[str] | None = Field(
        None, description="label names in id order; default: the sorted distinct labels of the data"
    )
    class_weights: Literal["balanced", "none"] | dict[str, float] = "none"
    """``balanced`` weighs each class by n / (n_classes × count), from the training split."""


def sort_labels(labels: set[str]) -> list[str]:
    """Sorted distinct labels; numerically when all are integers (so 2 comes before 10)."""
    if all(label.lstrip("-").isdigit() for label in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def pad_right(features: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    import torch

    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask}


def require_trainable_head(model: nn.Module, objective: str) -> None:
    """A freshly initialised head that does not learn makes every prediction random: refuse early."""
    heads = [p for n, p in model.named_parameters() if any(h in n.split(".") for h in HEAD_NAMES)]
    if heads and not any(p.requires_grad for p in heads):
        raise ValueError(
            f"objective {objective!r}: the new classification head ({'/'.join(HEAD_NAMES)}) is frozen by the "
            "method, so it would stay random; add it to method.modules_to_save (e.g. [score]) or use method: full"
        )


def sequence_scores(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Head outputs; decoder models pool the last non-pad token (the batch is right-padded)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


@OBJECTIVES.register("classify", ClassifyConfig)
class ClassifyObjective(BaseObjective):
    """Cross-entropy over labels; reports accuracy. Plain text in, no chat template."""

    data_kinds = ("classification",)

    units_are_tokens = False

    model_kind = "sequence_classification"
    uses_chat_template = False

    def __init__(self, cfg: ClassifyConfig, tokenizer: PreTrainedTokenizerBase, data_cfg: Any) -> None:
        self.config = cfg
        self.tokenizer = tokenizer
        self.max_length = getattr(data_cfg, "max_length", None)
        self.seen: set[str] = set()
        self._names: list[str] | None = list(cfg.labels) if cfg.labels else None
        self.weights: torch.Tensor | None = None

    @property
    def label_names(self) -> list[str]:
        """Fixed at first use (after the data is encoded, before the model is built)."""
        if self._names is None:
            if not self.seen:
                raise RuntimeError("classify: no labels seen; encode the data first")
            self._names = sort_labels(self.seen)
        return self._names

    def model_kwargs(self) -> dict[str, Any]:
        names = self.label_names
        return {
            "num_labels": len(names),
            "id2label": dict(enumerate(names)),
            "label2id": {n: i for i, n in enumerate(names)},
        }

    def adapt_to(self, model: nn.Module) -> None:
        require_trainable_head(model, "classify")

    def encode(self, row: int, example: dict[str, Any]) -> dict[str, Any] | Dropped:
        if "label" not in example or "text" not in example:
            return Dropped(row, f"classify needs text and label; got fields {sorted(example)}")
        label = str(example["label"])
        if self._names is not None and label not in self._names:
            return Dropped(row, f"label {label!r} is not one of {self._names}")
        self.seen.add(label)
        ids = self.tokenizer(example["text"], add_special_tokens=True)["input_ids"]
        truncated = self.max_length is not None and len(ids) > self.max_length
        return {
            "input_ids": ids[: self.max_length] if truncated else ids,
            "label": label,
            "truncated": truncated,
        }

    def prepare(
        self, model: nn.Module, train: list[dict[str, Any]], evaluation: list[dict[str, Any]]
    ) -> None:
        names, choice = self.label_names, self.config.class_weights
        if choice == "none":
            return
        if choice == "balanced":
            counts = Counter(f["label"] for f in train)
            weights = [len(train) / (len(names) * counts[n]) if counts[n] else 0.0 for n in names]
        else:
            unknown = sorted(set(choice) - set(names))
            if unknown:
                raise ValueError(f"objective.class_weights: unknown label(s) {unknown}; labels are {names}")
            weights = [float(choice.get(n, 1.0)) for n in names]
        import torch

        self.weights = torch.tensor(weights, dtype=torch.float32)

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        index = {n: i for i, n in enumerate(self.label_names)}
        batch = pad_right(features, self.tokenizer.pad_token_id)
        batch["labels"] = torch.tensor([index[f["label"]] for f in features], dtype=torch.long)
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["labels"].numel()

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
        import torch
        import torch.nn.functional as F

        logits = sequence_scores(model, batch)
        weight = self.weights.to(logits.device) if self.weights is not None else None
        loss = F.cross_entropy(logits, batch["labels"], weight=weight, reduction="sum")
        accuracy = float((logits.argmax(-1) == batch["labels"]).float().mean())
        return LossOutput(loss, torch.tensor(batch["labels"].numel()), {"accuracy": accuracy})
