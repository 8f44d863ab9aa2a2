"""Model loading, tiny test models and GGUF export: the one way tunelab gets a model and tokenizer."""

from tunelab.models.gguf_write import write_llama_gguf
from tunelab.models.load import (
    ModelNotFoundError,
    classify_source,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    tunelab_home,
)
from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny_model

__all__ = [
    "ModelNotFoundError",
    "build_tiny_llama",
    "build_tiny_tokenizer",
    "classify_source",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
    "save_tiny_model",
    "tunelab_home",
    "write_llama_gguf",
]
