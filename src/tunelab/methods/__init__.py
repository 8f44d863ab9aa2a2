"""Methods: which parameters learn. Importing this package registers every built-in method."""

from tunelab.methods import adalora, adapter, freeze, full, ia3, lora, prompt, qlora  # noqa: F401  (registration side effect)
from tunelab.methods.base import (
    METHODS,
    Hook,
    MethodConfig,
    MethodSpec,
    Prepared,
    count_parameters,
    register_method,
)

__all__ = ["METHODS", "Hook", "MethodConfig", "MethodSpec", "Prepared", "count_parameters", "register_method"]
