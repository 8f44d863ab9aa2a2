"""The GRPO family's loss names, apart from the formulas: the recipe schema needs them without torch."""

from __future__ import annotations

from typing import Literal

GrpoLossType = Literal["grpo", "bnpo", "dr_grpo", "dapo", "gspo", "cispo"]
GRPO_LOSS_TYPES: tuple[str, ...] = GrpoLossType.__args__  # type: ignore[attr-defined]
