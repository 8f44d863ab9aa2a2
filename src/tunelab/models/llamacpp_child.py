"""What runs inside llama.cpp's probe child, and how tunelab opens a model with or without extra buffer types.

The probe (:mod:`tunelab.models.llamacpp_probe`) runs this file as a separate Python process, so a CPU trap
(SIGILL) kills the child, not the caller. The child writes a tiny Llama GGUF whose weights are Q4_0 and
Q8_0 with row counts that are multiples of 32 (the types and shapes llama.cpp's CPU repack and AMX
"extra buffer types" take over), loads it and decodes a 40-token prompt (matrix-matrix kernels) and a
few single tokens (matrix-vector kernels), then prints one JSON line.

Importable without loading llama.cpp: the module imports only the standard library at the top, and
``llama_cpp``, ``gguf`` and ``numpy`` inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# dims of the probe model: rows multiples of 32 (AMX tiles), columns multiples of 256 (k-quant blocks)
N_EMBD, N_FF, N_HEAD, N_VOCAB = 256, 512, 4, 288
PROMPT_TOKENS, GENERATED_TOKENS = 40, 4
_DEFAULT_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def model_params_without_extra_bufts(llama_cpp: Any) -> Iterator[None]:
    """While inside, ``llama_model_default_params()`` returns params with ``use_extra_bufts`` off.

    ``llama_cpp.Llama`` has no argument for llama_model_params.use_extra_bufts: its ``__init__`` takes the
    params from ``llama_cpp.llama_cpp.llama_model_default_params()`` and loads the model in the same call.
    So the function is wrapped for the length of one construction (under a lock, and always restored).
    """
    low = llama_cpp.llama_cpp
    with _DEFAULT_PARAMS_LOCK:
        default = low.llama_model_default_params

        def without_extra_bufts() -> Any:
            params = default()
            params.use_extra_bufts = False
            return params

        low.llama_model_default_params = without_extra_bufts
        try:
            yield
        finally:
            low.llama_model_default_params = default


def open_llama(path: str | Path, *, extra_bufts: bool, **kwargs: Any) -> Any:
    """``llama_cpp.Llama(model_path=path, **kwargs)``, with llama.cpp's extra buffer types (weight repacking,
    AMX) only when ``extra_bufts``."""
    import llama_cpp  # noqa: PLC0415  (loading the library is what the probe guards)

    if extra_bufts:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    with model_params_without_extra_bufts(llama_cpp):
        return llama_cpp.Llama(model_path=str(path), **kwargs)


def write_probe_gguf(path: Path, seed: int = 0) -> Path:
    """A one-block Llama with a byte-fallback SentencePiece vocabulary; random Q4_0/Q8_0 weights."""
    import gguf  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tunelab-llamacpp-probe")
    for add, value in (
        (writer.add_context_length, 128),
        (writer.add_embedding_length, N_EMBD),
        (writer.add_block_count, 1),
        (writer.add_feed_forward_length, N_FF),
        (writer.add_head_count, N_HEAD),
        (writer.add_head_count_kv, N_HEAD),
        (writer.add_rope_dimension_count, N_EMBD // N_HEAD),
        (writer.add_vocab_size, N_VOCAB),
    ):
        add(value)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    _add_vocab(writer, gguf)
    q4, q8, f32 = (
        gguf.GGMLQuantizationType.Q4_0,
        gguf.GGMLQuantizationType.Q8_0,
        gguf.GGMLQuantizationType.F32,
    )
    tensors = [
        ("token_embd.weight", (N_VOCAB, N_EMBD), q8),
        ("output_norm.weight", (N_EMBD,), f32),
        ("output.weight", (N_VOCAB, N_EMBD), q8),
        ("blk.0.attn_norm.weight", (N_EMBD,), f32),
        ("blk.0.ffn_norm.weight", (N_EMBD,), f32),
        *((f"blk.0.attn_{n}.weight", (N_EMBD, N_EMBD), q4) for n in ("q", "k", "v", "output")),
        ("blk.0.ffn_gate.weight", (N_FF, N_EMBD), q4),
        ("blk.0.ffn_up.weight", (N_FF, N_EMBD), q4),
        ("blk.0.ffn_down.weight", (N_EMBD, N_FF), q8),
    ]
    for name, shape, qtype in tensors:
        array = np.ones(shape, np.float32) if qtype == f32 else rng.normal(0, 0.05, shape).astype(np.float32)
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_vocab(writer: Any, gguf: Any) -> None:
    token_type = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [token_type.UNKNOWN, token_type.CONTROL, token_type.CONTROL, *[token_type.BYTE] * 256]
    fillers = [f"\u2581t{i}" for i in range(N_VOCAB - len(tokens))]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens + fillers)
    writer.add_token_scores([0.0] * len(tokens) + [-float(i) for i in range(len(fillers))])
    writer.add_token_types(types + [token_type.NORMAL] * len(fillers))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def decode_probe(path: Path, *, extra_bufts: bool) -> dict[str, Any]:
    """Load the probe model and decode a prompt and a few tokens; what came out, and how long it took."""
    import numpy as np  # noqa: PLC0415

    start = time.perf_counter()
    llama = open_llama(path, extra_bufts=extra_bufts, n_ctx=128, n_threads=2, seed=0, verbose=False)
    try:
        prompt = [1, *(3 + (7 * i) % 256 for i in range(PROMPT_TOKENS - 1))]
        llama.eval(prompt)  # one batch: the matrix-matrix kernels
        generated, finite = [], True
        for _ in range(GENERATED_TOKENS):  # one token at a time: the matrix-vector kernels
            logits = last_logits(llama)
            finite = finite and bool(np.isfinite(logits).all())
            generated.append(int(logits.argmax()))
            llama.eval(generated[-1:])
    finally:
        llama.close()
    return {
        "extra_bufts": extra_bufts,
        "prompt_tokens": len(prompt),
        "generated_tokens": len(generated),
        "finite_logits": finite,
        "seconds": round(time.perf_counter() - start, 3),
    }


def last_logits(llama: Any) -> Any:
    """The logits of the last decoded token as a numpy view (``Llama.scores`` holds them only with
    ``logits_all``)."""
    import llama_cpp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    pointer = llama_cpp.llama_get_logits_ith(llama.ctx, -1)
    return np.ctypeslib.as_array(pointer, shape=(llama.n_vocab(),))


def main(argv: list[str]) -> int:
    """``MODE WORKDIR``: MODE is ``extra`` (default model params) or ``plain`` (no extra buffer types)."""
    mode, workdir = argv
    path = Path(workdir) / "probe.gguf"
    if not path.is_file():
        write_probe_gguf(path)
    print(json.dumps(decode_probe(path, extra_bufts=mode == "extra")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
