"""A run as a GGUF file made, checked and loaded by llama.cpp, carrying the template the run trained with.

Steps: merge the run (``merged_model``), save it as a Hugging Face directory with the run's own
tokenizer (so its chat template is the training one), convert with llama.cpp's converter, quantise
with llama.cpp's quantiser for the k-quants, make sure the file's chat template is the run's and that
its end-of-turn token is an end-of-generation id (eos or eot), then load it in llama.cpp and generate a
few greedy tokens. The deep check (the run's eval on the GGUF) is the export gate's.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from tunelab.models.llamacpp import (
    LLAMA_CPP_VERSION,
    SDIST_SHA256,
    GGUFConversionError,
    convert_to_gguf,
    gguf_metadata,
    native_output_captured,
    open_llama,
    quantize_gguf,
    require_llama_cpp,
    set_gguf_token_id,
)

# the converter's own output types; the k-quants go through an unquantised GGUF in the stored dtype
_DIRECT = ("f16", "bf16", "q8_0")
_INTERMEDIATE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
_PROBE_ANSWER = "tunelab-probe-answer"
CHECK_PROMPT = "Hello! What is the capital of France?"


def write_gguf(
    model: Any, tokenizer: Any, out: Path, gguf_type: str, name: str, stored: str
) -> dict[str, Any]:
    """Write ``out/<name>-<type>.gguf`` from a merged model; returns what the export records about it."""
    require_llama_cpp()  # fail before the slow save and conversion, not after
    work = out / ".gguf-work"
    try:
        hf_dir = work / "hf"
        model.to(_torch_dtype(stored)).save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        target = out / f"{name}-{gguf_type}.gguf"
        intermediate = None
        if gguf_type in _DIRECT:
            convert_to_gguf(hf_dir, target, gguf_type, model_name=name)
        else:
            intermediate = _INTERMEDIATE.get(stored, "f32")
            source = convert_to_gguf(
                hf_dir, work / f"{name}-{intermediate}.gguf", intermediate, model_name=name
            )
            quantize_gguf(source, target, gguf_type)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ends = end_of_turn_tokens(tokenizer)
    fixes = make_template_stop(target, tokenizer, ends)
    meta = gguf_metadata(target)
    return {
        "file": target.name,
        "engine": f"llama.cpp (llama-cpp-python {LLAMA_CPP_VERSION}): convert_hf_to_gguf.py"
        + (f" to {intermediate}, then llama_model_quantize" if intermediate else ""),
        "llama_cpp_sdist_sha256": SDIST_SHA256,
        "architecture": meta["architecture"],
        "chat_template_sha256": hashlib.sha256((meta["chat_template"] or "").encode()).hexdigest(),
        "end_of_turn_tokens": ends,
        "eos_token": meta["eos_token"],
        "eot_token": meta["eot_token"],
        "tokenizer_pre": meta["tokenizer_pre"],
        "fixes": fixes,
        "llama_cpp_check": load_check(target, tokenizer),
    }


def _torch_dtype(stored: str) -> Any:
    import torch  # noqa: PLC0415

    return getattr(torch, stored)


def end_of_turn_tokens(tokenizer: Any) -> list[str]:
    """The special token the chat template puts right after an assistant's answer (``<|im_end|>`` for
    ChatML, ``<|eot_id|>`` for Llama 3, EOS for Alpaca or plain); empty when that is plain text."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # a template that refuses this probe (e.g. needs a system turn) names no end token
        return []
    after = text[text.rindex(_PROBE_ANSWER) + len(_PROBE_ANSWER) :] if _PROBE_ANSWER in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    special |= set(tokenizer.all_special_ids)
    return [tokenizer.convert_ids_to_tokens(ids[0])] if ids and ids[0] in special else []


def make_template_stop(path: Path, tokenizer: Any, ends: list[str]) -> list[str]:
    """The GGUF must render the run's template and stop at its end-of-turn token; fix the stop id in
    place when the converter picked another one, and say what was fixed."""
    meta = gguf_metadata(path)
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates: the GGUF's tokenizer.chat_template is the default one
        template = template.get("default")
    if meta["chat_template"] != template:
        raise GGUFConversionError(
            f"{path.name}: llama.cpp's converter wrote a chat template other than the one the run trained "
            "with (tokenizer.chat_template in final/); the GGUF would not chat like the run"
        )
    if not ends or ends[0] in (meta["eos_token"], meta["eot_token"]):
        return []
    end_id = tokenizer.convert_tokens_to_ids(ends[0])
    # eot when the file has one (llama.cpp stops at eos and eot alike); else eos, which every reader knows
    key = "tokenizer.ggml.eot_token_id" if meta["eot_token_id"] is not None else "tokenizer.ggml.eos_token_id"
    set_gguf_token_id(path, key, end_id)
    fixed = gguf_metadata(path)
    if ends[0] not in (fixed["eos_token"], fixed["eot_token"]):
        raise GGUFConversionError(f"{path.name}: could not set {key} to the end-of-turn token {ends[0]}")
    was = meta["eot_token"] if key.endswith("eot_token_id") else meta["eos_token"]
    return [f"{key.split('.')[-1]}: {was} -> {ends[0]} (the end-of-turn token of the run's chat template)"]


def load_check(path: Path, tokenizer: Any, max_tokens: int = 8) -> dict[str, Any]:
    """Load the file in llama.cpp and generate a few greedy tokens from a chat prompt rendered with the
    run's template; also record whether llama.cpp tokenizes that prompt as the run's tokenizer does."""
    require_llama_cpp()  # a missing or unusable llama.cpp is its own one-line error, not a load failure
    messages = [{"role": "user", "content": CHECK_PROMPT}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with native_output_captured() as log:  # llama.cpp prints notes even with verbose=False
        try:
            llama = open_llama(path, n_ctx=256, seed=0, verbose=False)
        except (ValueError, RuntimeError) as err:
            raise GGUFConversionError(f"llama.cpp could not load {path.name}: {err} (log: {log})") from err
    log.unlink(missing_ok=True)
    try:
        ids = llama.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        result = llama.create_completion(ids, max_tokens=max_tokens, temperature=0.0, top_k=1)
    finally:
        llama.close()
    choice = result["choices"][0]
    if not result["usage"]["completion_tokens"] and choice["finish_reason"] != "stop":
        raise GGUFConversionError(f"llama.cpp loaded {path.name} but generated nothing")
    return {
        "prompt": CHECK_PROMPT,
        "generated": choice["text"],
        "finish_reason": choice["finish_reason"],
        "tokenizer_agrees": list(ids) == list(expected),
    }
