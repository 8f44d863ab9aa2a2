"""GGUF made, quantised and loaded by llama.cpp itself: parity with transformers, any architecture the
converter knows, the run's chat template and its end-of-turn stop, the Ollama Modelfile, and the clear
line when llama.cpp is missing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from llamacpp_gate import usable_llama_cpp
from tunelab.data.templates import BUILTIN_TEMPLATES
from tunelab.export import EXPORT_META, export_run
from tunelab.export.modelfile import NoFaithfulTemplate, ollama_template
from tunelab.models import llamacpp
from tunelab.models.tiny import BOS_TOKEN, CHATML_TEMPLATE, IM_END, build_tiny_tokenizer

QA = [
    ("Say hi", "hi there"),
    ("Count to three", "one two three"),
    ("Name a colour", "blue"),
    ("What is two plus two", "four"),
    ("Say bye", "goodbye"),
    ("Name an animal", "a cat"),
]
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llama_cpp():
    module = usable_llama_cpp()
    if not llamacpp.sdist_path().is_file():
        pytest.skip(f"{llamacpp.sdist_path()} missing; run `make gguf`")
    return module


def _train(root: Path, template: str | None = None) -> Path:
    from tunelab.recipe import parse_recipe
    from tunelab.train.run import train

    data_file = root / "train.jsonl"
    data_file.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA))
    data = {"train": str(data_file), "max_length": 64, **({"template": template} if template else {})}
    recipe = parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": data,
            "method": {"name": "lora"},
            "training": {"max_steps": 2, "batch_size": 3, "learning_rate": 1e-2, "warmup_steps": 0},
            "output": {"dir": str(root / "runs"), "name": f"run-{template or 'own'}"},
        }
    )
    return train(recipe, console=Console(quiet=True)).run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("lora"))


def _full_run(root: Path, model, tokenizer) -> Path:
    """A finished full-fine-tune run directory holding ``model`` as is (architectures tunelab's tiny
    model does not cover)."""
    final = root / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    meta = {"base_model": "from-config", "artifact": "full", "method": "full", "model_kind": "causal_lm"}
    (final / "tunelab.json").write_text(json.dumps(meta))
    return root


def _llama(llama_cpp, path: Path, **kw):
    return llamacpp.open_llama(path, n_ctx=256, seed=0, verbose=False, **kw)


def _prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """n argmax steps, end-of-turn tokens included (llama.cpp's raw generate does not stop either)."""
    sequence = list(ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
        for _ in range(n):
            sequence.append(int(model(torch.tensor([sequence])).logits[0, -1].argmax()))
    return sequence[len(ids) :], logits


def _llama_greedy(llama, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    llama.reset()
    llama.eval(ids)
    logits = torch.tensor(llama.scores[: len(ids)], dtype=torch.float32)
    generated = []
    for token in llama.generate(ids, temp=0.0, top_k=1, reset=True):
        generated.append(token)
        if len(generated) == n:
            break
    return generated, logits


# --- no llama.cpp needed -------------------------------------------------------------------------


def test_missing_llama_cpp_is_one_line_naming_make_gguf(monkeypatch, tmp_path):
    from tunelab.cli import app

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` now raises ImportError
    with pytest.raises(llamacpp.LlamaCppMissingError, match=r"run `make gguf`.*tunelab\[gguf\]"):
        llamacpp.require_llama_cpp()
    run = _full_run(tmp_path / "run", *_tiny_model_and_tokenizer())
    result = CliRunner().invoke(
        app, ["export", str(run), "--out", str(tmp_path / "g"), "--gguf", "q4_k_m", "--no-verify"]
    )
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: GGUF export/eval needs llama.cpp: run `make gguf`")
    assert "Traceback" not in result.output and not (tmp_path / "g").exists()


def test_missing_or_foreign_sdist_names_make_gguf(monkeypatch, tmp_path):
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path))
    with pytest.raises(
        llamacpp.LlamaCppMissingError, match=r"llama_cpp_python-0.3.36.tar.gz is missing.*make gguf"
    ):
        llamacpp.converter_dir()
    llamacpp.sdist_path().parent.mkdir(parents=True)
    llamacpp.sdist_path().write_bytes(b"not the release")
    with pytest.raises(llamacpp.LlamaCppMissingError, match="is not the pinned .* run `make gguf`"):
        llamacpp.converter_dir()
    assert not (tmp_path / "llama.cpp").exists()


def test_export_offers_what_llama_cpp_makes_without_importing_torch_for_help():
    import subprocess

    from tunelab.export import GGUF_TYPES

    assert GGUF_TYPES == llamacpp.GGUF_TYPES
    code = "import sys, tunelab.cli; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


def test_bad_gguf_type_and_ollama_without_gguf_are_refused(tmp_path):
    run = _full_run(tmp_path / "run", *_tiny_model_and_tokenizer())
    with pytest.raises(ValueError, match="choose one of f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m"):
        export_run(run, tmp_path / "x", kind="gguf", gguf_type="q4_k")
    with pytest.raises(ValueError, match="--ollama .* use it with --gguf"):
        export_run(run, tmp_path / "x", kind="merged", ollama=True)


def test_go_templates_are_used_only_where_they_render_like_the_run():
    tokenizer = build_tiny_tokenizer()
    assert ollama_template(tokenizer, add_bos=False).family == "chatml"
    tokenizer.chat_template = BUILTIN_TEMPLATES["alpaca"]
    found = ollama_template(tokenizer, add_bos=False)
    assert found.family == "alpaca" and f"{{{{ .Content }}}}{IM_END}\n\n" in found.go  # EOS after answers
    tokenizer.chat_template = BUILTIN_TEMPLATES["llama-3"]  # opens with bos_token
    assert ollama_template(tokenizer, add_bos=True).family == "llama-3"  # llama.cpp adds BOS itself
    with pytest.raises(NoFaithfulTemplate):  # would lose the BOS
        ollama_template(tokenizer, add_bos=False)
    tokenizer.chat_template = BUILTIN_TEMPLATES["gemma"]
    with pytest.raises(NoFaithfulTemplate):
        ollama_template(tokenizer, add_bos=True)


def _tiny_model_and_tokenizer(**kw):
    from tunelab.models.tiny import build_tiny_llama

    tokenizer = build_tiny_tokenizer()
    return build_tiny_llama(tokenizer, **kw), tokenizer


# --- llama.cpp ----------------------------------------------------------------------------------


def test_converter_comes_from_the_pinned_sdist(llama_cpp):
    stamp = json.loads((llamacpp.converter_dir() / "tunelab_extract.json").read_text())
    assert stamp == {"sdist": llamacpp.SDIST_NAME, "sha256": llamacpp.SDIST_SHA256, "version": "0.3.36"}
    assert (llamacpp.converter_dir() / "gguf-py" / "gguf" / "gguf_reader.py").is_file()


@pytest.fixture(scope="module")
def config_run(tmp_path_factory) -> Path:
    """tiny:llama as a finished full run, no training: the fast path through the whole export."""
    model, tokenizer = _tiny_model_and_tokenizer()
    return _full_run(tmp_path_factory.mktemp("config") / "run-own", model, tokenizer)


@pytest.mark.parametrize("source", ["config_run", pytest.param("lora_run", marks=pytest.mark.slow)])
def test_f16_export_matches_transformers_in_llama_cpp_and_keeps_the_chatml_stop(
    llama_cpp, request, tmp_path, source
):
    """llama.cpp's greedy tokens equal transformers' and its logits are close (for the LoRA run: after
    the merge)."""
    from tunelab.export.merge import merged_model

    run = request.getfixturevalue(source)
    out = export_run(run, tmp_path / "gguf", kind="gguf", gguf_type="f16", ollama=True)
    gguf_file = out / "run-own-f16.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted([gguf_file.name, EXPORT_META, "Modelfile"])
    model, tokenizer = merged_model(run / "final")
    ids = _prompt_ids(tokenizer)
    expected_tokens, expected_logits = _hf_greedy(model, ids, 12)
    llama = _llama(llama_cpp, gguf_file, logits_all=True)
    try:
        assert llama.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
        got_tokens, got_logits = _llama_greedy(llama, ids, 12)
    finally:
        llama.close()
    error = (got_logits - expected_logits).abs().max().item()
    print(f"f16 in llama.cpp vs transformers: max abs logit error {error:.2e}")
    assert got_tokens == expected_tokens
    assert error < 1e-2  # f16 weights, f32 activations (measured 4.0e-4 from config, 2.4e-4 LoRA)

    meta = llamacpp.gguf_metadata(gguf_file)
    assert meta["architecture"] == "llama" and meta["chat_template"] == CHATML_TEMPLATE
    assert meta["eos_token"] == IM_END
    provenance = json.loads((out / EXPORT_META).read_text())["gguf"]
    assert provenance["end_of_turn_tokens"] == [IM_END] and provenance["fixes"] == []
    assert provenance["llama_cpp_check"]["tokenizer_agrees"] is True
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{gguf_file.name}\n" in modelfile
    assert (
        'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in modelfile
    )
    assert f'PARAMETER stop "{IM_END}"' in modelfile and "PARAMETER temperature 0" in modelfile


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_quantised_exports_load_and_mostly_agree(llama_cpp, lora_run, tmp_path, gguf_type):
    from tunelab.export.merge import merged_model

    out = export_run(lora_run, tmp_path / gguf_type, kind="gguf", gguf_type=gguf_type)
    gguf_file = out / f"run-own-{gguf_type}.gguf"
    model, tokenizer = merged_model(lora_run / "final")
    ids = _prompt_ids(tokenizer)
    _, expected = _hf_greedy(model, ids, 1)
    llama = _llama(llama_cpp, gguf_file, logits_all=True)
    try:
        _, got = _llama_greedy(llama, ids, 1)
    finally:
        llama.close()
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    error = (got - expected).abs().max().item()
    print(f"{gguf_type}: max abs logit error {error:.2e}, next-token agreement {agreement:.0%}")
    assert error > 1e-4  # really quantised
    assert agreement >= 0.8
    meta = llamacpp.gguf_metadata(gguf_file)
    assert meta["chat_template"] == CHATML_TEMPLATE and meta["eos_token"] == IM_END
    provenance = json.loads((out / EXPORT_META).read_text())
    assert provenance["gguf_type"] == gguf_type and provenance["weights"][0]["file"] == gguf_file.name
    assert ("llama_model_quantize" in provenance["gguf"]["engine"]) == (gguf_type == "q4_k_m")


def _qwen2(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).eval()


def _gemma3(tokenizer):
    """query_pre_attn_scalar = head_dim as in Gemma 3 1B/4B/12B: llama.cpp does not read the field (it
    scales by head_dim, 27B excepted), so transformers' default of 256 with head_dim 16 would differ."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        sliding_window=16, query_pre_attn_scalar=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize(
    "build, architecture", [(_qwen2, "qwen2"), (_gemma3, "gemma3")], ids=["qwen2", "gemma3"]
)
def test_non_llama_architectures_convert_quantise_and_agree(llama_cpp, tmp_path, build, architecture):
    """Built from config with tunelab's tiny BPE tokenizer, whose pre-tokenizer hash llama.cpp does not
    know: the converter gets the llama.cpp pre-tokenizer with the same split (transformers gives a
    tokenizer loaded with a Qwen2 config Qwen2's split) and llama.cpp then tokenizes exactly like
    transformers."""
    tokenizer = build_tiny_tokenizer()
    model = build(tokenizer)
    run = _full_run(tmp_path / "run", model, tokenizer)
    ids = _prompt_ids(tokenizer)
    expected_tokens, _ = _hf_greedy(model, ids, 8)
    for gguf_type in ("f16", "q4_k_m"):
        out = export_run(run, tmp_path / gguf_type, kind="gguf", gguf_type=gguf_type)
        details = json.loads((out / EXPORT_META).read_text())["gguf"]
        print(f"{architecture} {gguf_type}: tokenizer_pre {details['tokenizer_pre']}")
        assert details["architecture"] == architecture
        assert details["llama_cpp_check"]["tokenizer_agrees"] is True
        llama = _llama(llama_cpp, out / details["file"])
        try:
            got_tokens, _ = _llama_greedy(llama, ids, 8)
        finally:
            llama.close()
        if gguf_type == "f16":
            assert got_tokens == expected_tokens


@pytest.mark.slow
def test_the_run_template_not_the_base_one_is_in_the_gguf_and_llama_cpp_stops_at_its_end(llama_cpp, tmp_path):
    """tiny:llama's own template is ChatML; the run trains with Alpaca, which ends an answer with EOS."""
    run = _train(tmp_path, template="alpaca")
    out = export_run(run, tmp_path / "gguf", kind="gguf", gguf_type="q8_0", ollama=True)
    gguf_file = out / "run-alpaca-q8_0.gguf"
    meta = llamacpp.gguf_metadata(gguf_file)
    assert meta["chat_template"] == BUILTIN_TEMPLATES["alpaca"] != CHATML_TEMPLATE
    assert meta["eos_token"] == IM_END
    assert json.loads((out / EXPORT_META).read_text())["gguf"]["end_of_turn_tokens"] == [IM_END]
    _assert_llama_cpp_stops_at(
        llama_cpp, gguf_file, IM_END, prompt="### Instruction:\nSay hi\n\n### Response:\n"
    )
    assert "### Response:\n{{ .Content }}<|im_end|>" in (out / "Modelfile").read_text()


def _assert_llama_cpp_stops_at(llama_cpp, gguf_file: Path, end: str, prompt: str) -> None:
    """Force the first generated token with a logit bias: the end-of-turn token must end generation
    (finish_reason stop, nothing emitted); any other token must not."""
    llama = _llama(llama_cpp, gguf_file)
    try:
        end_id = llama.tokenize(end.encode(), add_bos=False, special=True)
        other_id = llama.tokenize(b" blue", add_bos=False, special=True)[-1]
        assert len(end_id) == 1
        forced = llama.create_completion(prompt, max_tokens=4, temperature=0.0, logit_bias={end_id[0]: 100.0})
        control = llama.create_completion(prompt, max_tokens=4, temperature=0.0, logit_bias={other_id: 100.0})
    finally:
        llama.close()
    assert forced["choices"][0]["finish_reason"] == "stop" and forced["choices"][0]["text"] == ""
    assert control["choices"][0]["finish_reason"] == "length"


@pytest.mark.slow
def test_a_wrong_stop_id_from_the_tokenizer_is_fixed_to_the_template_end(llama_cpp, tmp_path):
    """A tokenizer whose EOS is <|endoftext|> while its ChatML template ends turns with <|im_end|>: the
    converter writes eos=<|endoftext|>; the export rewrites it so llama.cpp stops where training did."""
    model, tokenizer = _tiny_model_and_tokenizer()
    tokenizer.eos_token = BOS_TOKEN
    model.generation_config.eos_token_id = tokenizer.bos_token_id
    run = _full_run(tmp_path / "run", model, tokenizer)
    out = export_run(run, tmp_path / "gguf", kind="gguf", gguf_type="f16")
    details = json.loads((out / EXPORT_META).read_text())["gguf"]
    assert details["fixes"] == [
        f"eos_token_id: {BOS_TOKEN} -> {IM_END} (the end-of-turn token of the run's chat template)"
    ]
    assert llamacpp.gguf_metadata(out / details["file"])["eos_token"] == IM_END
    _assert_llama_cpp_stops_at(
        llama_cpp, out / details["file"], IM_END, prompt="<|im_start|>user\nhi<|im_end|>\n"
    )


@pytest.mark.slow
def test_an_architecture_the_converter_does_not_know_is_one_line(llama_cpp, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                       num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32)  # fmt: skip
    run = _full_run(tmp_path / "run", OPTForCausalLM(config), tokenizer)
    with pytest.raises(
        llamacpp.GGUFConversionError, match="does not support the architecture OPTForCausalLM"
    ):
        export_run(run, tmp_path / "g", kind="gguf", gguf_type="f16")
    assert not (tmp_path / "g").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("build", "gguf_type"), [(_qwen2, "q8_0"), (_gemma3, "f16")], ids=["qwen2", "gemma3"]
)
def test_non_llama_exports_pass_the_parity_gate(llama_cpp, tmp_path, build, gguf_type):
    """The parity gate, not just a load check, on architectures other than Llama: the GGUF answers the
    held-out prompts in llama.cpp as the run does in transformers. (Gemma 3 at f16: this random
    64-wide model's top logits are near-ties, so q8_0 rounding already flips a greedy token in about
    half the answers, which the gate rightly reports; its quantised files are checked above.)"""
    from tunelab.export.gate import export_and_verify

    tokenizer = build_tiny_tokenizer()
    run = _full_run(tmp_path / "run", build(tokenizer), tokenizer)
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA))
    out, verification = export_and_verify(
        run, tmp_path / "gguf", kind="gguf", gguf_type=gguf_type, verify_data=held_out, verify_n=len(QA),
        console=Console(quiet=True),
    )  # fmt: skip
    assert verification["passed"], verification["failures"]
    assert verification["engine"] == "llama.cpp"
    assert json.loads((out / EXPORT_META).read_text())["verification"]["passed"] is True
