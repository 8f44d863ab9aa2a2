"""Model loading, tiny test models and GGUF export: the one way tunelab gets a model and tokenizer."""

from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny_model

__all__ = ["build_tiny_llama", "build_tiny_tokenizer", "save_tiny_model"]
