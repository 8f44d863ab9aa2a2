"""Objectives: what the loss is. Importing this package registers every built-in objective."""

from tunelab.objectives import classify, dpo, grpo, kto, ppo, reward, sft  # noqa: F401  (registration side effect)
from tunelab.objectives.base import OBJECTIVES, BaseObjective, Dropped, LossOutput, ObjectiveConfig

__all__ = ["OBJECTIVES", "BaseObjective", "Dropped", "LossOutput", "ObjectiveConfig"]
