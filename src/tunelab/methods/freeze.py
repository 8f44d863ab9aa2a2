"""Freeze: feature extraction and partial training. Only the head, the top blocks, or modules matching
a regex learn; every other weight stays as pretrained.

Selection: ``head`` and ``last_n_blocks`` combine (the top N blocks and the head, the usual "train
the top of the network"); ``pattern`` stands alone. With nothing selected the head trains (linear
probing, the classic feature-extraction baseline). ``last_n_blocks`` also trains the final norm,
which sits on top of the last block and rescales everything it emits.

Tied embeddings: when the head's weight is the input embedding matrix (SmolLM2, GPT-2), training
the head trains that one shared tensor, so the input embeddings change too. It is trained as the
model defines it (untying would add vocab × hidden parameters and change the architecture); the
run's notes say so and a warning is printed.

Artifact: ``custom``. ``final/`` holds only the trained tensors (``trained.safetensors``) and
loading applies them to the base model: for SmolLM2-135M with one block that is ~14 MB instead of
~540 MB, and the loaded result is a plain transformers model like any other.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from tunelab.methods.base import MethodConfig, Prepared, decay_groups, register_method
from tunelab.methods.blocks import find_blocks, head_is_tied, is_norm, output_head, unwrap

if TYPE_CHECKING:  # the config class is part of the recipe schema, which loads without the ML stack
    from torch import nn

WEIGHTS = "trained.safetensors"
INFO = "freeze_config.json"


class FreezeConfig(MethodConfig):
    name: Literal["freeze"] = "freeze"
    head: bool | None = Field(
        None, description="train the task head (the LM output layer); the default when nothing else is chosen"
    )
    last_n_blocks: int | None = Field(
        None, ge=1, description="train the top N transformer blocks and the final norm"
    )
    pattern: str | None = Field(
        None, description="train every parameter whose name matches this regex (re.search); alone"
    )

    @model_validator(mode="after")
    def _one_selection(self) -> FreezeConfig:
        if self.pattern is not None:
            if self.head or self.last_n_blocks is not None:
                raise ValueError(
                    "give method.pattern alone, or method.head and/or method.last_n_blocks. Choose one."
                )
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"method.pattern {self.pattern!r} is not a valid regex: {err}") from None
        elif self.last_n_blocks is None and self.head is False:
            raise ValueError("method.head is false and nothing else is chosen: set last_n_blocks or pattern")
        self.head = bool(self.head) or (self.pattern is None and self.last_n_blocks is None)
        return self


def selected_parameters(model: nn.Module, cfg: FreezeConfig) -> list[nn.Parameter]:
    """The parameters ``cfg`` says should learn; errors name the setting that selects nothing."""
    base = unwrap(model)
    chosen: dict[int, nn.Parameter] = {}
    if cfg.pattern is not None:
        regex = re.compile(cfg.pattern)
        chosen = {id(p): p for n, p in base.named_parameters() if regex.search(n)}
        if not chosen:
            names = [n for n, _ in base.named_parameters()][:4]
            raise ValueError(
                f"method.pattern {cfg.pattern!r} matches no parameter of {type(base).__name__} "
                f"(names look like {names})"
            )
    if cfg.last_n_blocks is not None:
        _, blocks = find_blocks(base)
        if cfg.last_n_blocks > len(blocks):
            raise ValueError(
                f"method.last_n_blocks={cfg.last_n_blocks}, but the model has {len(blocks)} blocks"
            )
        top = list(blocks)[-cfg.last_n_blocks :] + _final_norms(base, blocks)
        chosen.update({id(p): p for module in top for p in module.parameters()})
    if cfg.head:
        head = output_head(base)
        if head is None:
            raise ValueError(f"method.head: {type(base).__name__} has no output head to train")
        chosen.update({id(p): p for p in head.parameters()})
    return list(chosen.values())


def _final_norms(base: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The norm after the blocks (``model.norm``, ``transformer.ln_f``), found by module order so a
    norm right after the embeddings (BLOOM's ``word_embeddings_layernorm``) is not taken for it."""
    inside = {id(m) for m in blocks.modules()}
    modules = list(base.modules())
    start = next(i for i, m in enumerate(modules) if m is blocks)
    return [m for m in modules[start:] if is_norm(m) and id(m) not in inside][-1:]


def save_freeze(model: nn.Module, directory: Path) -> None:
    """Write only the trained tensors; everything else is the base model's."""
    from safetensors.torch import save_file

    base = unwrap(model)
    tensors = {n: p.detach().contiguous().cpu() for n, p in base.named_parameters() if p.requires_grad}
    save_file(tensors, str(Path(directory) / WEIGHTS))
    info = {"tensors": sorted(tensors), "tied_head": head_is_tied(base)}
    (Path(directory) / INFO).write_text(json.dumps(info, indent=2), encoding="utf-8")


def load_freeze(base_model: nn.Module, directory: Path, cfg: FreezeConfig) -> nn.Module:
    """Apply the saved tensors to a freshly loaded base model."""
    from safetensors.torch import load_file

    from tunelab.train.checkpoint import copy_into_parameters

    copy_into_parameters(
        base_model, load_file(str(Path(directory) / WEIGHTS)), f"trained tensors in {directory}"
    )
    return base_model


@register_method("freeze", FreezeConfig, artifact="custom", save=save_freeze, load=load_freeze)
def apply_freeze(model: nn.Module, cfg: FreezeConfig, *, weight_decay: float) -> Prepared:
    selected = {id(p) for p in selected_parameters(model, cfg)}
    for param in model.parameters():
        param.requires_grad_(id(param) in selected)
    notes = {}
    if cfg.head and head_is_tied(model):
        notes["tied_head"] = "the head shares its weight with the input embeddings; both change"
        warnings.warn(
            f"method.head: {type(unwrap(model)).__name__} ties its head to the input embeddings, so "
            "training the head also changes the input embeddings",
            stacklevel=2,
        )
    return Prepared(model=model, param_groups=decay_groups(model, weight_decay), notes=notes)
