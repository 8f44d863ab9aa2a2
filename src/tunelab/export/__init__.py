"""`tunelab export`: a run's model as a merged Hugging Face directory, a PEFT adapter or a GGUF file.

Light to import (the CLI imports it for ``--help``); torch, transformers and PEFT load on first use.
"""

from tunelab.export.cli import export_cmd
from tunelab.export.run import EXPORT_META, GGUF_TYPES, KINDS, ExportKind, export_run

__all__ = ["EXPORT_META", "GGUF_TYPES", "KINDS", "ExportKind", "export_cmd", "export_run"]
