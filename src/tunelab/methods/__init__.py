"""Methods: which parameters learn. Importing this package registers every built-in method."""

from tunelab.methods import full, lora  # noqa: F401  (registration side effect)
from tunelab.methods.base import METHODS, MethodConfig, Prepared, count_parameters

__all__ = ["METHODS", "MethodConfig", "Prepared", "count_parameters"]
