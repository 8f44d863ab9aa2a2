"""Learning-rate structure that applies to any method: layer-wise decay, per-group multipliers,
gradual unfreezing. (Filled in by the methods work; this pass-through keeps the engine's contract.)"""

from __future__ import annotations

from typing import Any

from tunelab.methods.base import Prepared


def structure_learning_rates(prepared: Prepared, training: Any) -> Prepared:
    """Return ``prepared`` with param groups / hooks reshaped by the recipe's ``training`` section."""
    return prepared
