"""Tiny models, the loader and the GGUF writer: round trips must give identical logits and tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.models import load
from tunelab.models.gguf_write import write_llama_gguf
from tunelab.models.load import (
    ModelNotFoundError,
    classify_source,
    load_causal_lm,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    tunelab_home,
)
from tunelab.models.tiny import CHATML_TEMPLATE, build_tiny_llama, build_tiny_tokenizer, save_tiny_model

TEXT = "Hello world! The capital of France is Paris.  Ünïcödé 東京 🙂 123456\n\tdef f(x): return x<|im_end|>"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4."},
]


def _logits(model: torch.nn.Module, tokenizer, text: str = TEXT) -> torch.Tensor:
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer, seed=1)
    path = write_llama_gguf(model, tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return path, model


def test_tiny_tokenizer_round_trips_any_text() -> None:
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    assert 900 <= len(tokenizer) <= 1100
    assert tokenizer.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|pad|>")
    assert tokenizer.padding_side == "right"


def test_tiny_tokenizer_is_deterministic_and_a_fresh_copy() -> None:
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    first.padding_side = "left"
    assert second.padding_side == "right"
    assert first.get_vocab() == second.get_vocab()


def test_tiny_chat_template_is_chatml_with_assistant_mask() -> None:
    tokenizer = build_tiny_tokenizer()
    assert tokenizer.chat_template == CHATML_TEMPLATE
    rendered = tokenizer.apply_chat_template(CHAT[:2], tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n"
    assert rendered == expected + "<|im_start|>assistant\n"
    out = tokenizer.apply_chat_template(CHAT, return_dict=True, return_assistant_tokens_mask=True)
    kept = [i for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(kept) == "4.<|im_end|>"


def test_tiny_llama_shapes_seed_and_global_rng() -> None:
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    model = build_tiny_llama(tokenizer, num_kv_heads=2, tie_word_embeddings=True)
    assert torch.equal(torch.get_rng_state(), before)
    logits = _logits(model, tokenizer)
    assert logits.shape == (1, len(tokenizer(TEXT)["input_ids"]), len(tokenizer))
    assert logits.dtype == torch.float32
    assert model.config.pad_token_id == tokenizer.pad_token_id
    torch.testing.assert_close(
        _logits(build_tiny_llama(tokenizer, tie_word_embeddings=True), tokenizer), logits
    )
    assert not torch.equal(_logits(build_tiny_llama(tokenizer, seed=1), tokenizer), logits)


def test_save_tiny_model_reloads_with_identical_logits(tiny_dir: Path) -> None:
    assert (tiny_dir / "model.safetensors").is_file()
    model, tokenizer = load_causal_lm(tiny_dir, dtype="float32", device="cpu")
    reference_tok = build_tiny_tokenizer()
    torch.testing.assert_close(
        _logits(model, tokenizer), _logits(build_tiny_llama(reference_tok), reference_tok)
    )
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert tokenizer(TEXT)["input_ids"] == reference_tok(TEXT)["input_ids"]
    assert AutoTokenizer.from_pretrained(tiny_dir).chat_template == CHATML_TEMPLATE
    assert AutoModelForCausalLM.from_pretrained(tiny_dir).config.num_hidden_layers == 2


def test_load_causal_lm_honours_dtype(tiny_dir: Path) -> None:
    model, _ = load_causal_lm(tiny_dir, dtype="bf16", device="cpu")
    assert model.dtype == torch.bfloat16
    assert model.device.type == "cpu"


def test_resolve_device_and_dtype_on_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") in (torch.device("cpu"), torch.device("mps"))
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", "mps") == torch.float32
    assert resolve_dtype("bf16", "cpu") == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == resolve_dtype("torch.float16", "cpu") == torch.float16
    assert resolve_dtype(torch.float32, "cpu") == torch.float32
    with pytest.raises(ValueError, match="Did you mean 'bf16'"):
        resolve_dtype("bf61", "cpu")


@pytest.mark.parametrize(
    ("spec", "kind"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "hub"),
        ("gpt2", "hub"),
        ("model.Q4_K_M.gguf", "gguf"),
        ("./runs/model", "local"),
        ("/abs/path", "local"),
        ("~/models/x", "local"),
        ("a/b/c", "local"),
    ],
)
def test_classify_source(spec: str, kind: str) -> None:
    assert classify_source(spec) == kind


def test_classify_source_existing_relative_dir(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tiny_dir.parent)
    assert classify_source("model") == "local"
    assert classify_source("model/missing") == "local"


@pytest.mark.parametrize("name", ["missing-model", "missing.gguf"])
def test_missing_local_path_names_it(tmp_path: Path, name: str) -> None:
    spec = str(tmp_path / name)
    with pytest.raises(ModelNotFoundError, match=name) as info:
        load_causal_lm(spec, device="cpu")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match=name):
        load_tokenizer(spec)


def test_offline_hub_id_says_go_online(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ModelNotFoundError, match="HF_HUB_OFFLINE is set.*Go online.*local model directory or a .gguf file"
    ):
        load_causal_lm("tunelab-tests/definitely-not-cached", device="cpu")


def test_pickle_only_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelNotFoundError, match="safetensors only"):
        load_causal_lm(tmp_path, device="cpu")


def test_gguf_export_loads_with_identical_logits_and_tokens(tiny_gguf: tuple[Path, torch.nn.Module]) -> None:
    path, source = tiny_gguf
    reference = build_tiny_tokenizer()
    model, tokenizer = load_causal_lm(path, dtype="float32", device="cpu", cache=False)
    torch.testing.assert_close(_logits(model, tokenizer), _logits(source, reference), atol=1e-5, rtol=0)
    assert tokenizer(TEXT)["input_ids"] == reference(TEXT)["input_ids"]
    assert tokenizer.apply_chat_template(CHAT) == reference.apply_chat_template(CHAT)
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == (
        "<|im_end|>",
        "<|pad|>",
        "<|endoftext|>",
    )
    assert getattr(model, "hf_quantizer", None) is None, "a GGUF-loaded model must be trainable and saveable"


def test_gguf_export_f16_is_close(tmp_path: Path) -> None:
    tokenizer = build_tiny_tokenizer()
    source = build_tiny_llama(tokenizer, tie_word_embeddings=True)
    path = write_llama_gguf(source, tokenizer, tmp_path / "tiny-f16.gguf", dtype="f16")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    torch.testing.assert_close(_logits(model, tokenizer), _logits(source, tokenizer), atol=1e-2, rtol=0)
    with pytest.raises(ValueError, match="Unsupported GGUF dtype"):
        write_llama_gguf(source, tokenizer, tmp_path / "x.gguf", dtype="q4_k")


def test_gguf_conversion_cache_is_reused(
    tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, source = tiny_gguf
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    first, tokenizer = load_causal_lm(path, dtype="float32", device="cpu")
    (entry,) = (tmp_path / "converted").iterdir()
    assert len(entry.name) == 16
    assert {"model.safetensors", "tokenizer.json", "config.json", "tunelab_conversion.json"} <= {
        p.name for p in entry.iterdir()
    }

    def no_conversion(*args: object, **kwargs: object) -> bool:
        raise AssertionError("the cached conversion should have been used")

    monkeypatch.setattr(load, "_convert_gguf", no_conversion)
    second, cached_tok = load_causal_lm(path, dtype="float32", device="cpu")
    assert Path(second.name_or_path) == entry
    torch.testing.assert_close(
        _logits(second, cached_tok), _logits(source, build_tiny_tokenizer()), atol=1e-5, rtol=0
    )
    assert cached_tok(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert cached_tok.chat_template == tokenizer.chat_template
    assert load_tokenizer(path).chat_template == CHATML_TEMPLATE


def _real_smollm2_gguf() -> Path | None:
    home = tunelab_home()
    found = sorted(home.glob("**/SmolLM2-135M-Instruct*.gguf")) if home.is_dir() else []
    return found[0] if found else None


@pytest.mark.slow
def test_real_smollm2_gguf_answers_sensibly() -> None:
    path = _real_smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2-135M-Instruct GGUF not found under $TUNELAB_HOME")
    model, tokenizer = load_causal_lm(path, dtype="float32", device="cpu", cache=False)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
