"""The objective contract: what the loss is.

An objective turns canonical examples into features, features into batches, and a batch into
``(loss_sum, n_units, metrics)``. Returning a *sum* and a count (tokens, pairs, examples) lets the
engine normalise over the whole accumulated batch, so gradient accumulation gives the same update
as one big batch (the per-micro-batch mean does not when micro-batches hold different numbers of
loss tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunelab.registry import Registry


class ObjectiveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


@dataclass
class LossOutput:
    loss_sum: torch.Tensor
    n_units: torch.Tensor
    metrics: dict[str, float]


@dataclass
class Dropped:
    """An example that could not be used, with the reason (written to the run's dropped.jsonl)."""

    row: int
    reason: str


class Objective(Protocol):
    """What the engine needs from an objective."""

    config: ObjectiveConfig
    model_kind: str  # "causal_lm" today; "sequence_classification" etc. in later objectives

    def encode(self, row: int, example: dict[str, Any]) -> dict[str, Any] | Dropped: ...

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def adapt_to(self, model: nn.Module) -> None:
        """Adjust batching to the prepared model (e.g. padding side for virtual-token methods)."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput: ...


class ObjectiveFactory(Protocol):
    def __call__(self, cfg: Any, tokenizer: PreTrainedTokenizerBase, data_cfg: Any) -> Objective: ...


OBJECTIVES: Registry[ObjectiveFactory] = Registry("objective")
