"""tunelab: from raw data to a deployed fine-tuned language model."""

__version__ = "0.1.0"
