"""Virtual-token methods through PEFT: prompt tuning, prefix tuning and P-tuning.

The base model is untouched; what trains is a handful of vectors put in front of every sequence:
input embeddings (prompt tuning; P-tuning produces them with a small encoder) or per-layer keys and
values (prefix tuning). The stored adapter is tiny (``num_virtual_tokens`` × hidden size per layer
at most), which is why these are the methods of choice when storage per task must be minimal.

How this meets tunelab's causal-LM objective: PEFT prepends the virtual tokens at the *front*, and the
objective keeps only the trailing ``logits_to_keep`` positions of a left-padded batch, so logits and
labels stay aligned. PEFT ignores ``position_ids`` for prompt/P-tuning (with a warning), and offsets
them by ``num_virtual_tokens`` for prefix tuning. ``Prepared.notes["virtual_tokens"]`` says how many
positions a method adds, for an objective that needs to know.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from tunelab.methods.base import MethodConfig, Prepared, decay_groups, register_method

if TYPE_CHECKING:  # the config classes are part of the recipe schema, which loads without the ML stack
    from torch import nn


class PromptTuningMethodConfig(MethodConfig):
    name: Literal["prompt_tuning"] = "prompt_tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="length of the learned soft prompt")
    init: Literal["vocab", "text", "random"] = Field(
        "vocab",
        description="vocab: embeddings of random vocabulary tokens (in-distribution scale); text: embeddings "
        "of init_text's tokens, repeated or cut to num_virtual_tokens; random: PEFT's normal init",
    )
    init_text: str | None = Field(
        None, description="with init: text, e.g. 'Classify the sentiment of this review:'"
    )

    @model_validator(mode="after")
    def _text_for_text_init(self) -> PromptTuningMethodConfig:
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("method.init: text and method.init_text go together; give both or neither")
        return self


class PrefixTuningMethodConfig(MethodConfig):
    name: Literal["prefix_tuning"] = "prefix_tuning"
    num_virtual_tokens: int = Field(20, ge=1, description="prefix length (keys and values per layer)")
    prefix_projection: bool = Field(
        False, description="produce the prefix with a 2-layer MLP (more stable, larger while training)"
    )
    encoder_hidden_size: int | None = Field(None, ge=1, description="MLP width with prefix_projection")


class PTuningMethodConfig(MethodConfig):
    name: Literal["p_tuning"] = "p_tuning"
    num_virtual_tokens: int = Field(20, ge=1)
    encoder: Literal["mlp", "lstm"] = Field(
        "mlp", description="prompt encoder that produces the virtual tokens"
    )
    encoder_hidden_size: int | None = Field(
        None, ge=1, description="encoder width; default: the model's hidden size"
    )
    encoder_num_layers: int = Field(2, ge=1)
    encoder_dropout: float = Field(0.0, ge=0.0, lt=1.0)


def _hidden_size(model: nn.Module) -> int:
    return model.get_input_embeddings().embedding_dim


def init_from_text(peft_model: nn.Module, text: str, tokenizer: Any) -> None:
    """Start the soft prompt at the embeddings of ``text``'s tokens (Lester et al., 2021), as PEFT's
    TEXT init does, but with tunelab's tokenizer for the model instead of a second ``AutoTokenizer``."""
    import torch

    embedding = peft_model.prompt_encoder[peft_model.active_adapter].embedding
    n = embedding.num_embeddings
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("method.init_text encodes to no tokens; give some text")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    words = peft_model.get_input_embeddings()
    with torch.no_grad():
        embedding.weight.copy_(
            words(torch.tensor(ids, device=words.weight.device)).to(embedding.weight.dtype)
        )


def _tokenizer_of(model: nn.Module) -> Any:
    from tunelab.models.load import tokenizer_for  # noqa: PLC0415  (only for text init)

    source = getattr(model, "name_or_path", "") or ""
    if not source:
        raise ValueError(
            "method.init: text needs the model's tokenizer, but this model was built in memory and has no "
            "name_or_path; use init: vocab, or a model loaded from a directory or hub id"
        )
    return tokenizer_for(source)


# PEFT builds these for causal LMs (its virtual-token models call prepare_inputs_for_generation,
# which a sequence-classification model lacks), so objectives with a classification head are refused.
_CAUSAL_ONLY = {
    "model_kinds": ("causal_lm",),
    "limitation": "PEFT's virtual-token methods wrap causal language models only, not the "
    "sequence-classification model this objective trains",
}


def _prepared(peft_model: nn.Module, n_virtual: int, weight_decay: float) -> Prepared:
    return Prepared(
        model=peft_model,
        param_groups=decay_groups(peft_model, weight_decay),
        is_adapter=True,
        notes={"virtual_tokens": n_virtual},
    )


@register_method("prompt_tuning", PromptTuningMethodConfig, artifact="peft", **_CAUSAL_ONLY)
def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningMethodConfig, *, weight_decay: float) -> Prepared:
    from peft import PromptTuningConfig, get_peft_model

    tokenizer = _tokenizer_of(model) if cfg.init == "text" else None
    init = {"vocab": "SAMPLE_VOCAB", "text": "RANDOM", "random": "RANDOM"}[cfg.init]
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens, prompt_tuning_init=init
    )
    peft_model = get_peft_model(model, config)
    if cfg.init_text is not None:
        init_from_text(peft_model, cfg.init_text, tokenizer)
    return _prepared(peft_model, cfg.num_virtual_tokens, weight_decay)


@register_method("prefix_tuning", PrefixTuningMethodConfig, artifact="peft", **_CAUSAL_ONLY)
def apply_prefix_tuning(model: nn.Module, cfg: PrefixTuningMethodConfig, *, weight_decay: float) -> Prepared:
    from peft import PrefixTuningConfig, get_peft_model

    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.num_virtual_tokens,
        prefix_projection=cfg.prefix_projection,
        encoder_hidden_size=cfg.encoder_hidden_size or _hidden_size(model),
    )
    return _prepared(get_peft_model(model, config), cfg.num_virtual_tokens, weight_decay)


@register_method("p_tuning", PTuningMethodConfig, artifact="peft", **_CAUSAL_ONLY)
def apply_p_tuning(model: nn.Module, cfg: PTuningMethodConfig, *, weight_decay: float) -> Prepared:
    from peft import PromptEncoderConfig, get_peft_model

    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=cfg.num_virtual_tokens,
        encoder_reparameterization_type=cfg.encoder.upper(),
        encoder_hidden_size=cfg.encoder_hidden_size or _hidden_size(model),
        encoder_num_layers=cfg.encoder_num_layers,
        encoder_dropout=cfg.encoder_dropout,
    )
    return _prepared(get_peft_model(model, config), cfg.num_virtual_tokens, weight_decay)
