"""The objective contract: what the loss is.

An objective turns canonical examples into features, features into batches, and a batch into
``(loss_sum, n_units, metrics)``. Returning a *sum* and a count (tokens, pairs, examples) lets the
engine normalise over the whole accumulated batch, so gradient accumulation gives the same update
as one big batch (the per-micro-batch mean does not when micro-batches hold different numbers of
loss tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import BaseModel, ConfigDict

from tunelab.registry import Registry

if TYPE_CHECKING:  # the recipe schema reads this registry; `recipe check` must not import torch
    import torch
    from torch import nn


class ObjectiveConfig(BaseModel):
    # NaN and infinity are no setting (a learning rate of 1e999 is inf): refused at the door
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
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


class BaseObjective:
    """Defaults every objective shares; subclasses override what they need.

    ``model_kind`` picks the head the engine loads (before the model exists, so it is a class
    attribute); ``model_kwargs`` adds constructor arguments such as ``num_labels`` once the data is
    read; ``prepare`` runs once on the prepared model before training (e.g. reference log-probs).
    """

    model_kind = "causal_lm"
    uses_chat_template = True
    units_are_tokens = True
    """Loss is per token (so perplexity means something); pair/example objectives set False."""
    online = False
    """Online RL (ppo, grpo): trained by :func:`tunelab.train.rl.run_online` instead of the engine loop."""
    data_kinds: tuple[str, ...] = ()
    """The kinds of canonical rows ``encode`` uses (``tunelab.data.formats.KIND`` values: text, chat,
    preference, unpaired, prompt, classification); ``recipe check`` refuses a data file of another kind
    before a run starts, instead of the run dropping every row. Empty: not checked."""
    packs = False
    """Examples may share one packed sequence (``data.packing``): only a per-token loss can; objectives
    over whole examples, pairs or prompts cannot (the recipe refuses the combination)."""

    def adapt_to(self, model: nn.Module) -> None:
        return None

    def model_kwargs(self) -> dict[str, Any]:
        return {}

    def prepare(
        self, model: nn.Module, train: list[dict[str, Any]], evaluation: list[dict[str, Any]]
    ) -> None:
        return None


class Objective(Protocol):
    """What the engine needs from an objective."""

    config: ObjectiveConfig
    model_kind: str  # "causal_lm" today; "sequence_classification" etc. in later objectives

    def encode(self, row: int, example: dict[str, Any]) -> dict[str, Any] | Dropped: ...

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def adapt_to(self, model: nn.Module) -> None:
        """Adjust batching to the prepared model (e.g. padding side for virtual-token methods)."""

    def model_kwargs(self) -> dict[str, Any]: ...

    def prepare(
        self, model: nn.Module, train: list[dict[str, Any]], evaluation: list[dict[str, Any]]
    ) -> None: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput: ...


OBJECTIVES: Registry[type[BaseObjective]] = Registry("objective")
"""Name → objective class; the class is constructed as ``cls(config, tokenizer, data_config)``."""
