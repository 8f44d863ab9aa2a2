"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) for decoder models.

AdapterHub's ``adapters`` pins an older transformers, so the adapter is ours and small: down-project
→ activation → up-project, added back to its input. The up-projection starts at zero, so the model
with fresh adapters computes exactly what the base computes and training starts from it.

Placement: ``pfeiffer`` (the default) puts one adapter after each block's MLP; ``houlsby`` also puts
one after attention. Pfeiffer et al. found the MLP-only placement matches Houlsby's at half the
adapters and a faster step. Each adapter acts on the sublayer's output before the block adds its
residual, as in both papers.

Injection wraps the block's attention / MLP submodule in :class:`~tunelab.methods.bottleneck.WithAdapter` (the
original stays
inside as ``base_layer``, PEFT's convention); no library code is patched. Base weights are frozen.
The saved artifact is ``adapter_model.safetensors`` (adapter weights only, fp32) and
``adapter_config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from tunelab.methods.base import MethodConfig, Prepared, decay_groups, register_method
from tunelab.methods.blocks import ATTENTION_ATTRS, MLP_ATTRS, block_sublayer, find_blocks, unwrap

if TYPE_CHECKING:  # the config class is part of the recipe schema, which loads without the ML stack
    import torch
    from torch import nn

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


class AdapterConfig(MethodConfig):
    name: Literal["adapter"] = "adapter"
    placement: Literal["pfeiffer", "houlsby"] = Field(
        "pfeiffer", description="pfeiffer: after the MLP; houlsby: after attention and after the MLP"
    )
    reduction_factor: int | None = Field(
        None, ge=1, description="bottleneck = hidden_size / reduction_factor; 16 when neither is given"
    )
    bottleneck_size: int | None = Field(None, ge=1, description="explicit bottleneck width")
    activation: Literal["relu", "gelu", "silu", "tanh"] = "relu"

    @model_validator(mode="after")
    def _one_size(self) -> AdapterConfig:
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ValueError("give method.reduction_factor or method.bottleneck_size, not both. Choose one.")
        return self

    def bottleneck(self, hidden_size: int) -> int:
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        return max(1, hidden_size // (self.reduction_factor or 16))


def inject_adapters(model: nn.Module, placement: str, bottleneck: int, activation: str) -> list[str]:
    """Wrap each block's MLP (and attention, for houlsby) with a fresh adapter; returns the wrapped names."""
    from tunelab.methods.bottleneck import BottleneckAdapter, WithAdapter

    base = unwrap(model)
    hidden = _hidden_size(base)
    reference = next(base.parameters())
    prefix, blocks = find_blocks(base)
    attrs = (ATTENTION_ATTRS, MLP_ATTRS) if placement == "houlsby" else (MLP_ATTRS,)
    wrapped = []
    for i, block in enumerate(blocks):
        for candidates in attrs:
            attr = block_sublayer(block, candidates)
            if isinstance(getattr(block, attr), WithAdapter):
                raise ValueError(f"{prefix}.{i}.{attr} already has an adapter")
            adapter = BottleneckAdapter(hidden, bottleneck, activation).to(reference.device)
            setattr(block, attr, WithAdapter(getattr(block, attr), adapter.train(base.training)))
            wrapped.append(f"{prefix}.{i}.{attr}")
    return wrapped


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, keyed by their names in the (unwrapped) model."""
    from tunelab.methods.bottleneck import BottleneckAdapter

    state = {}
    for name, module in unwrap(model).named_modules():
        if isinstance(module, BottleneckAdapter):
            state.update({f"{name}.{n}": p.detach().contiguous().cpu() for n, p in module.named_parameters()})
    return state


def _hidden_size(base: nn.Module) -> int:
    return getattr(base.config, "hidden_size", None) or base.get_input_embeddings().embedding_dim


def save_adapter(model: nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    from tunelab.methods.bottleneck import ACTIVATIONS, BottleneckAdapter, WithAdapter

    base = unwrap(model)
    adapters = [m for m in base.modules() if isinstance(m, BottleneckAdapter)]
    if not adapters:
        raise ValueError("save_adapter: the model has no bottleneck adapters")
    wrapped = [n for n, m in base.named_modules() if isinstance(m, WithAdapter)]
    first = adapters[0]
    config = {
        "placement": "houlsby"
        if any(n.rsplit(".", 1)[-1] in ATTENTION_ATTRS for n in wrapped)
        else "pfeiffer",
        "bottleneck_size": first.down.out_features,
        "hidden_size": first.down.in_features,
        "activation": next(k for k, v in ACTIVATIONS.items() if isinstance(first.act, v)),
        "wrapped_modules": wrapped,
    }
    save_file(adapter_state(base), str(Path(directory) / WEIGHTS))
    (Path(directory) / CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


def load_adapter(base_model: nn.Module, directory: Path, cfg: AdapterConfig | None = None) -> nn.Module:
    """Inject adapters shaped as saved into ``base_model`` and load their weights (strictly)."""
    import torch
    from safetensors.torch import load_file

    saved = json.loads((Path(directory) / CONFIG).read_text(encoding="utf-8"))
    inject_adapters(base_model, saved["placement"], saved["bottleneck_size"], saved["activation"])
    tensors = load_file(str(Path(directory) / WEIGHTS))
    expected = adapter_state(base_model)
    if set(tensors) != set(expected):
        diff = sorted(set(tensors) ^ set(expected))[:3]
        raise ValueError(f"{directory}: adapter weights do not match the injected adapters (e.g. {diff})")
    params = dict(unwrap(base_model).named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
    for param in base_model.parameters():
        param.requires_grad_(False)
    return base_model


@register_method(
    "adapter",
    AdapterConfig,
    artifact="custom",
    save=save_adapter,
    load=load_adapter,
    model_kinds=("causal_lm",),
    limitation="it trains bottleneck modules inside the blocks only, so the new classification head "
    "this objective needs would stay random",
)
def apply_adapter(model: nn.Module, cfg: AdapterConfig, *, weight_decay: float) -> Prepared:
    for param in model.parameters():
        param.requires_grad_(False)
    bottleneck = cfg.bottleneck(_hidden_size(unwrap(model)))
    wrapped = inject_adapters(model, cfg.placement, bottleneck, cfg.activation)
    return Prepared(
        model=model,
        param_groups=decay_groups(model, weight_decay),
        is_adapter=True,
        notes={"adapters": len(wrapped), "bottleneck_size": bottleneck},
    )
