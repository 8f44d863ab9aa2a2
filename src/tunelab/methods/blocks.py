"""Find the parts of a causal LM generically: its stack of blocks, embeddings, head and norms.

Methods and the learning-rate structure ask "which block is this parameter in?" without knowing
the architecture. Everything is found by module identity on the underlying transformers model
(a PEFT wrapper is looked through), so parameter names may be whatever a wrapper makes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported by method modules, whose config classes load without torch
    from torch import nn

_HEAD_ATTRS = ("lm_head", "score", "classifier", "embed_out")
ATTENTION_ATTRS = ("self_attn", "attn", "attention", "self_attention")
MLP_ATTRS = ("mlp", "feed_forward", "ffn")


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks, bottom to top: the longest ``ModuleList`` of same-type modules.

    Llama's ``model.layers``, GPT-2's ``transformer.h`` and Falcon's ``transformer.h`` are all that
    list; ties go to the list with more parameters (a block stack outweighs any other list).
    """
    from torch import nn

    best: tuple[int, int, str, nn.ModuleList] | None = None
    for name, module in unwrap(model).named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size and (best is None or (len(module), size) > best[:2]):
            best = (len(module), size, name, module)
    if best is None:
        raise ValueError(
            f"{type(unwrap(model)).__name__}: found no stack of transformer blocks (nn.ModuleList)"
        )
    return best[2], best[3]


def input_embeddings(model: nn.Module) -> list[nn.Module]:
    """Token embeddings plus any other embedding table outside the blocks (GPT-2's positions)."""
    from torch import nn

    base = unwrap(model)
    found = [base.get_input_embeddings()]
    _, blocks = find_blocks(base)
    inside = {id(m) for m in blocks.modules()}
    head = output_head(base)
    head_ids = {id(m) for m in head.modules()} if head is not None else set()
    for module in base.modules():
        outside = id(module) not in inside | head_ids
        if isinstance(module, nn.Embedding) and outside and all(module is not f for f in found):
            found.append(module)
    return found


def output_head(model: nn.Module) -> nn.Module | None:
    """The task head: the LM output projection, or a classifier head (``score`` / ``classifier``)."""
    from torch import nn

    base = unwrap(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if head is not None:
        return head
    for attr in _HEAD_ATTRS:
        module = getattr(base, attr, None)
        if isinstance(module, nn.Module):
            return module
    return None


def head_is_tied(model: nn.Module) -> bool:
    """True when the head's weight *is* the input embedding matrix (SmolLM2, GPT-2)."""
    head = output_head(model)
    weight = getattr(head, "weight", None)
    return weight is not None and weight is unwrap(model).get_input_embeddings().weight


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and friends, recognised by type or by class name (each model defines its own)."""
    from torch import nn

    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower():
        return not any(True for _ in module.children())
    return False


def block_sublayer(block: nn.Module, attrs: tuple[str, ...]) -> str:
    """The attribute name of a block's attention (``ATTENTION_ATTRS``) or MLP (``MLP_ATTRS``) submodule."""
    from torch import nn

    for attr in attrs:
        if isinstance(getattr(block, attr, None), nn.Module):
            return attr
    children = [name for name, _ in block.named_children()]
    raise ValueError(f"{type(block).__name__}: none of {list(attrs)} among its submodules {children}")


@dataclass
class Layout:
    """Where each parameter sits: ``part[id(param)]`` is ``("block", i)``, ``("embeddings", -1)``,
    ``("head", -1)`` or ``("other", -1)``; ``norm`` holds the ids of normalisation parameters."""

    n_blocks: int
    part: dict[int, tuple[str, int]]
    norm: set[int]
    tied: bool

    def of(self, param: nn.Parameter) -> tuple[str, int]:
        return self.part.get(id(param), ("other", -1))


def layout(model: nn.Module) -> Layout:
    """Map every parameter of ``model`` to its place. A tied head *is* the embedding matrix, so it is
    classed as embeddings (the one tensor cannot be in two places)."""
    base = unwrap(model)
    _, blocks = find_blocks(base)
    part: dict[int, tuple[str, int]] = {}
    head = output_head(base)
    if head is not None:
        part.update({id(p): ("head", -1) for p in head.parameters()})
    for module in input_embeddings(base):
        part.update({id(p): ("embeddings", -1) for p in module.parameters()})
    for i, block in enumerate(blocks):
        part.update({id(p): ("block", i) for p in block.parameters()})
    norm = {id(p) for m in base.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    return Layout(len(blocks), part, norm, head_is_tied(base))
