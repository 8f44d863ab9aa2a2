"""The gate of every test that runs llama.cpp: skip with the reason when it is not installed, or when it is
installed but its probe proved it cannot run on this CPU (the probe's one line), instead of the test
process dying of SIGILL. (tests/test_llamacpp_probe.py fails, not skips, when the probe fails.)"""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest

from tunelab.models import llamacpp


def usable_llama_cpp() -> ModuleType:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama_cpp is not installed; run `make gguf`")
    try:
        return llamacpp.require_llama_cpp()
    except llamacpp.LlamaCppUnusableError as err:
        pytest.skip(str(err))
