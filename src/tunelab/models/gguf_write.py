"""Write a Llama-architecture model and its byte-level BPE tokenizer as a GGUF file.

This follows llama.cpp's `convert_hf_to_gguf.py` for the `llama` architecture and the `gpt2`
tokenizer model, so the file loads in llama.cpp and back in transformers
(`from_pretrained(dir, gguf_file=name)`) with the same logits and the same token ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

ARCH = "llama"

# dtype name -> (ggml type for 2-D weights, llama.cpp file type). 1-D tensors (norms) stay f32,
# as llama.cpp keeps them.
_DTYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# transformers parameter suffix (inside `model.layers.N.`) -> llama.cpp tensor kind.
_BLOCK_TENSORS = {
    "self_attn.q_proj.weight": gguf.MODEL_TENSOR.ATTN_Q,
    "self_attn.k_proj.weight": gguf.MODEL_TENSOR.ATTN_K,
    "self_attn.v_proj.weight": gguf.MODEL_TENSOR.ATTN_V,
    "self_attn.o_proj.weight": gguf.MODEL_TENSOR.ATTN_OUT,
    "mlp.gate_proj.weight": gguf.MODEL_TENSOR.FFN_GATE,
    "mlp.up_proj.weight": gguf.MODEL_TENSOR.FFN_UP,
    "mlp.down_proj.weight": gguf.MODEL_TENSOR.FFN_DOWN,
    "input_layernorm.weight": gguf.MODEL_TENSOR.ATTN_NORM,
    "post_attention_layernorm.weight": gguf.MODEL_TENSOR.FFN_NORM,
}


def write_llama_gguf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike[str],
    *,
    dtype: str = "f32",
    name: str | None = None,
) -> Path:
    """Write `model` + `tokenizer` to a llama GGUF at `path`; `dtype` is "f32", "f16" or "q8_0".
    `name` is the file's `general.name` (default: the model's `name_or_path`).

    The file is written next to its destination and renamed into place, so a crash never leaves a
    truncated GGUF that a server would later try to load.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"Unsupported GGUF dtype {dtype!r}; choose one of {sorted(_DTYPES)}.")
    config = model.config
    check_supported(config)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        _add_hparams(writer, config, _DTYPES[dtype][1], name)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for tensor_name, array in _llama_tensors(model):
            _add_tensor(writer, tensor_name, array, _DTYPES[dtype][0])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def check_supported(config: Any) -> None:
    """Refuse what this writer would silently get wrong rather than export a broken file; public so
    that callers (``tunelab export``) can refuse with their own advice before writing anything."""
    if config.model_type != "llama":
        raise ValueError(f"write_llama_gguf writes llama models only, got model_type={config.model_type!r}.")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("write_llama_gguf does not support attention/MLP biases.")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"write_llama_gguf supports default RoPE only, got rope_type={rope_type!r}.")


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hparams(
    writer: gguf.GGUFWriter, config: Any, file_type: gguf.LlamaFileType, name: str | None = None
) -> None:
    writer.add_name(name or str(getattr(config, "name_or_path", "") or "tunelab-model"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)


def permute_qk(weight: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's rotary layout: HF stores each head's rotary halves as [first half | second half],
    llama.cpp interleaves them in pairs. transformers' GGUF loader applies the inverse."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weight.shape
    return weight.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _llama_tensors(model: PreTrainedModel) -> list[tuple[str, np.ndarray]]:
    """(llama.cpp name, fp32 array) for every weight, q/k permuted; no lm_head when tied."""
    config = model.config
    state = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in model.state_dict().items()}
    names = gguf.TENSOR_NAMES
    out = [(names[gguf.MODEL_TENSOR.TOKEN_EMBD], state["model.embed_tokens.weight"])]
    for block in range(config.num_hidden_layers):
        for suffix, kind in _BLOCK_TENSORS.items():
            array = state[f"model.layers.{block}.{suffix}"]
            if kind == gguf.MODEL_TENSOR.ATTN_Q:
                array = permute_qk(array, config.num_attention_heads, config.num_attention_heads)
            elif kind == gguf.MODEL_TENSOR.ATTN_K:
                array = permute_qk(array, config.num_attention_heads, config.num_key_value_heads)
            out.append((names[kind].format(bid=block), array))
    out.append((names[gguf.MODEL_TENSOR.OUTPUT_NORM], state["model.norm.weight"]))
    if not config.tie_word_embeddings:
        out.append((names[gguf.MODEL_TENSOR.OUTPUT], state["lm_head.weight"]))
    return [(f"{name}.weight", np.ascontiguousarray(array)) for name, array in out]


def _add_tensor(
    writer: gguf.GGUFWriter, name: str, array: np.ndarray, qtype: gguf.GGMLQuantizationType
) -> None:
    """Norms stay f32; a matrix whose rows do not fill whole quant blocks falls back to f16, as in llama.cpp."""
    if array.ndim == 1:
        qtype = gguf.GGMLQuantizationType.F32
    elif array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        qtype = gguf.GGMLQuantizationType.F16
    writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """The `gpt2` (byte-level BPE) vocabulary as llama.cpp writes it: tokens in their byte-level
    spelling, special added tokens as CONTROL, other added tokens as USER_DEFINED, and `[PADn]`
    fillers where the model's embedding is larger than the vocabulary."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or not _is_byte_level(backend):
        raise ValueError("write_llama_gguf exports byte-level BPE (gpt2-style) tokenizers only.")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        tokens.append(token if token is not None else f"[PAD{index}]")
        types.append(_token_type(token, added))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(backend))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]])
    _add_special_ids(writer, tokenizer)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _token_type(token: str | None, added: dict[str, bool]) -> int:
    if token is None:
        return gguf.TokenType.UNUSED
    if token in added:
        return gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED
    return gguf.TokenType.NORMAL


def _is_byte_level(backend: dict[str, Any]) -> bool:
    return "ByteLevel" in json.dumps(backend.get("pre_tokenizer")) and "ByteLevel" in json.dumps(
        backend.get("decoder")
    )


def _pre_tokenizer_name(backend: dict[str, Any]) -> str:
    """llama.cpp picks its split regex by this name. `gpt-2` is the plain ByteLevel regex; SmolLM2
    adds single-digit splitting, which llama.cpp calls `smollm`."""
    pre = backend.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise ValueError(f"No llama.cpp pre-tokenizer name known for {kinds}; write_llama_gguf cannot export it.")


def _add_special_ids(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase) -> None:
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    writer.add_add_eos_token(bool(getattr(tokenizer, "add_eos_token", False)))
