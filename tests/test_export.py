"""`tunelab export`: merged HF directories, PEFT adapters and GGUF files that load without tunelab and
compute what the run computes; refusals, atomicity and provenance."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from rich.console import Console
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from typer.testing import CliRunner

from llamacpp_gate import usable_llama_cpp
from tunelab.evaluate.run import load_for_eval
from tunelab.export import EXPORT_META, export_run
from tunelab.runs.manifest import file_sha256, recipe_sha256

REPO = Path(__file__).resolve().parents[1]
QA = [
    ("Say hi", "hi there"),
    ("Count to three", "one two three"),
    ("Name a colour", "blue"),
    ("Name an animal", "a cat"),
    ("What is two plus two", "four"),
    ("Say bye", "goodbye"),
]
# GGUF bounds, from the error measured on the tiny LoRA run over five 16x32 random batches (logit std
# 0.16): f16 keeps 11 significant bits per weight, max abs logit error 4e-4..1e-3, mean 5e-5; q8_0
# keeps 8 bits per weight with one f16 scale per 32 weights (~16x f16's rounding), max abs
# 1.1e-2..1.5e-2, mean 1.2e-3..1.4e-3, greedy agreement 97.1%..98.8%. f16 uses the ~1e-2 target;
# q8_0's bounds sit ~2.5x above its worst measured batch. The test prints what it measured.
GGUF_MAX_ABS = {"f16": 1e-2, "q8_0": 4e-2}
GGUF_MEAN_ABS = {"f16": 2e-4, "q8_0": 3e-3}
MIN_GREEDY_AGREEMENT = 0.95


def _train(root: Path, method: str, objective: str = "sft", **method_fields: object) -> Path:
    from tunelab.recipe import parse_recipe
    from tunelab.train.run import train

    if objective == "classify":
        data = {"train": str(REPO / "recipes/data/tiny_cls_train.jsonl"), "max_length": 32}
    else:
        train_file = root / "train.jsonl"
        train_file.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA))
        data = {"train": str(train_file), "max_length": 64}
    recipe = parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": data,
            "method": {"name": method, **method_fields},
            "objective": {"name": objective},
            "training": {"max_steps": 2, "batch_size": 3, "learning_rate": 1e-2, "warmup_steps": 0},
            "output": {"dir": str(root / "runs"), "name": f"{method}-{objective}"},
        }
    )
    return train(recipe, console=Console(quiet=True)).run_dir


@pytest.fixture(scope="module")
def run_of(tmp_path_factory: pytest.TempPathFactory):
    """Train each (method, objective) tiny run once per module, on first use."""
    cache: dict[tuple[str, str], Path] = {}

    def get(method: str, objective: str = "sft") -> Path:
        if (method, objective) not in cache:
            cache[method, objective] = _train(tmp_path_factory.mktemp(method), method, objective)
        return cache[method, objective]

    return get


def _batch(vocab_size: int, rows: int = 8, length: int = 24) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab_size, (rows, length), generator=generator)


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def _run_logits(run: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = load_for_eval(str(run), device="cpu", dtype="float32")
    return _logits(model, ids)


@pytest.mark.parametrize("method", ["lora", "full", "dora", "ia3"])
def test_merged_model_loads_in_plain_transformers_with_the_runs_logits(run_of, tmp_path, method):
    run = run_of(method)
    out = export_run(run, tmp_path / "merged", kind="merged")

    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors", EXPORT_META} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "llama"
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(merged).__module__.startswith("transformers.")
    ids = _batch(merged.config.vocab_size)
    expected = _run_logits(run, ids)
    base, _ = load_for_eval("tiny:llama", device="cpu", dtype="float32")
    assert (expected - _logits(base, ids)).abs().max() > 1e-3, (
        "training changed nothing; the test would be vacuous"
    )
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=0)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and merged.generation_config.eos_token_id == tokenizer.eos_token_id


def test_merged_classifier_loads_as_sequence_classification(run_of, tmp_path):
    run = run_of("lora", "classify")
    out = export_run(run, tmp_path / "merged", kind="merged")

    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    assert set(merged.config.id2label.values()) == {"negative", "positive"}
    assert not (out / "generation_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(["The film was excellent.", "The book was poor."], return_tensors="pt", padding=True)
    model, _ = load_for_eval(str(run), device="cpu", dtype="float32")
    with torch.no_grad():
        expected = model(**ids).logits
        got = merged.eval()(**ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_merged_weights_shard_at_max_shard_size_and_are_hashed(run_of, tmp_path):
    out = export_run(run_of("full"), tmp_path / "sharded", kind="merged", max_shard_size="200KB")

    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3 and (out / "model.safetensors.index.json").is_file()
    assert all((out / s).stat().st_size <= 200_000 + 70_000 for s in shards)  # one tensor may overflow
    recorded = json.loads((out / EXPORT_META).read_text())["weights"]
    assert [w["file"] for w in recorded] == shards
    assert all(w["sha256"] == file_sha256(out / w["file"]) for w in recorded)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = _batch(merged.config.vocab_size, rows=2)
    torch.testing.assert_close(_logits(merged, ids), _run_logits(run_of("full"), ids), atol=1e-5, rtol=0)


def test_merged_dtype_option_sets_the_stored_dtype(run_of, tmp_path):
    out = export_run(run_of("lora"), tmp_path / "bf16", kind="merged", dtype="bfloat16")

    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / EXPORT_META).read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_adapter_export_loads_with_peft_and_gives_the_runs_logits(run_of, tmp_path):
    from peft import PeftModel

    from tunelab.models.load import load_model

    run = run_of("lora")
    out = export_run(run, tmp_path / "adapter", kind="adapter")

    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", EXPORT_META} <= {
        p.name for p in out.iterdir()
    }
    assert not list(out.glob("model*.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny:llama"  # tunelab specs are kept (see base_for_adapter)
    base, _ = load_model("tiny:llama", device="cpu", dtype="float32")
    model = PeftModel.from_pretrained(base, str(out))
    ids = _batch(base.config.vocab_size)
    torch.testing.assert_close(_logits(model, ids), _run_logits(run, ids), atol=0, rtol=0)


def test_adapter_export_of_a_local_base_points_at_its_absolute_path(tmp_path):
    from tunelab.export.run import base_for_adapter

    base = tmp_path / "base-model"
    base.mkdir()
    assert base_for_adapter(str(base)) == str(base.resolve())
    assert base_for_adapter("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_for_adapter("asset:smollm2-135m-instruct") == "asset:smollm2-135m-instruct"


@pytest.fixture(scope="module")
def merged_lora(run_of, tmp_path_factory) -> Path:
    return export_run(run_of("lora"), tmp_path_factory.mktemp("m") / "merged", kind="merged")


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_export_reads_back_close_to_the_merged_model(run_of, merged_lora, tmp_path, gguf_type):
    usable_llama_cpp()  # the GGUF is made by llama.cpp; read back here by transformers
    out = export_run(run_of("lora"), tmp_path / "gguf", kind="gguf", gguf_type=gguf_type)

    files = [p.name for p in out.iterdir()]
    assert sorted(files) == sorted([f"lora-sft-{gguf_type}.gguf", EXPORT_META])
    from_gguf = AutoModelForCausalLM.from_pretrained(
        out, gguf_file=f"lora-sft-{gguf_type}.gguf", dtype=torch.float32
    )
    merged = AutoModelForCausalLM.from_pretrained(merged_lora, dtype=torch.float32)
    ids = _batch(merged.config.vocab_size, rows=16, length=32)
    got, expected = _logits(from_gguf, ids), _logits(merged, ids)
    error, mean_error = (got - expected).abs().max().item(), (got - expected).abs().mean().item()
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    measured = f"{gguf_type}: max abs logit error {error:.2e}, mean {mean_error:.2e}, greedy agreement {agreement:.1%}"
    print(measured)
    assert error > 0, measured  # the weights really were rounded to the GGUF type
    assert error <= GGUF_MAX_ABS[gguf_type] and mean_error <= GGUF_MEAN_ABS[gguf_type], measured
    assert agreement >= MIN_GREEDY_AGREEMENT, measured
    provenance = json.loads((out / EXPORT_META).read_text())
    assert provenance["kind"] == "gguf" and provenance["gguf_type"] == gguf_type
    reader = gguf.GGUFReader(out / f"lora-sft-{gguf_type}.gguf")
    assert bytes(reader.fields["general.name"].parts[-1]).decode() == "lora-sft"


def test_provenance_names_run_recipe_base_method_and_weights(run_of, merged_lora):
    import yaml

    from tunelab import __version__

    run = run_of("lora")
    provenance = json.loads((merged_lora / EXPORT_META).read_text())
    manifest = json.loads((run / "manifest.json").read_text())

    assert provenance["source_run"] == str(run.resolve())
    assert provenance["run_name"] == "lora-sft"
    assert provenance["recipe_sha256"] == manifest["recipe_sha256"]
    assert provenance["recipe_sha256"] == recipe_sha256(yaml.safe_load((run / "recipe.yaml").read_text()))
    assert provenance["base_model"] == "tiny:llama" and provenance["base_model_seed"] == 0
    assert (provenance["method"], provenance["kind"], provenance["dtype"]) == ("lora", "merged", "float32")
    assert provenance["tunelab_version"] == __version__
    assert provenance["created_at"].endswith("+00:00")
    assert provenance["weights"] == [
        {
            "file": "model.safetensors",
            "bytes": (merged_lora / "model.safetensors").stat().st_size,
            "sha256": file_sha256(merged_lora / "model.safetensors"),
        }
    ]


def test_existing_output_is_refused_unless_overwrite(run_of, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    with pytest.raises(FileExistsError, match="already exists and is not empty.*--overwrite"):
        export_run(run_of("full"), out, kind="merged")
    assert (out / "keep.txt").read_text() == "mine"

    # --overwrite replaces only an earlier export: a folder of the user's is never deleted (issue 26)
    with pytest.raises(FileExistsError, match="is not a tunelab export"):
        export_run(run_of("full"), out, kind="merged", overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"

    earlier = export_run(run_of("full"), tmp_path / "earlier", kind="merged")
    (earlier / "stale.txt").write_text("from the earlier export")
    export_run(run_of("full"), earlier, kind="merged", overwrite=True)
    assert not (earlier / "stale.txt").exists() and (earlier / "model.safetensors").is_file()


def test_output_inside_the_run_is_refused_even_with_overwrite(run_of):
    run = run_of("full")
    for out in (run, run / "final" / "export", run.parent):
        with pytest.raises(ValueError, match="is the run itself, inside it, or contains it"):
            export_run(run, out, kind="merged", overwrite=True)
    assert (run / "final" / "tunelab.json").is_file()


def _break_the_converter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Break the GGUF export after the merged model is saved: llama.cpp's converter fails."""
    usable_llama_cpp()
    from tunelab.export import gguf as gguf_export

    def broken(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(gguf_export, "convert_to_gguf", broken)


def test_a_writer_failure_midway_leaves_no_partial_export(run_of, tmp_path, monkeypatch):
    _break_the_converter(monkeypatch)
    out = tmp_path / "exports" / "gguf"

    with pytest.raises(OSError, match="injected"):
        export_run(run_of("lora"), out, kind="gguf", gguf_type="q8_0")
    assert not out.exists()
    assert list((tmp_path / "exports").iterdir()) == []  # no hidden temporary directory either


def test_a_failed_overwrite_keeps_the_previous_export(run_of, merged_lora, tmp_path, monkeypatch):
    import shutil

    out = shutil.copytree(merged_lora, tmp_path / "exports" / "model")
    before = file_sha256(out / "model.safetensors")
    _break_the_converter(monkeypatch)

    with pytest.raises(OSError, match="injected"):
        export_run(run_of("lora"), out, kind="gguf", gguf_type="f16", overwrite=True)
    assert file_sha256(out / "model.safetensors") == before
    assert [p.name for p in (tmp_path / "exports").iterdir()] == ["model"]


def test_prompt_tuning_cannot_be_merged_and_says_use_adapter(run_of, tmp_path):
    run = run_of("prompt_tuning")
    for kind, gguf_type in (("merged", None), ("gguf", "f16")):
        with pytest.raises(ValueError, match="virtual tokens.*cannot be merged.*--adapter"):
            export_run(run, tmp_path / kind, kind=kind, gguf_type=gguf_type)
        assert not (tmp_path / kind).exists()

    out = export_run(run, tmp_path / "adapter", kind="adapter")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "PROMPT_TUNING"


def test_bottleneck_adapters_are_refused_with_the_reason(run_of, tmp_path):
    run = run_of("adapter")
    with pytest.raises(ValueError, match=r"method 'adapter' adds modules.*WithAdapter.*cannot be folded"):
        export_run(run, tmp_path / "merged", kind="merged")
    with pytest.raises(ValueError, match="not a PEFT adapter.*--merge"):
        export_run(run, tmp_path / "adapter", kind="adapter")
    assert not any(tmp_path.iterdir())


def test_freeze_runs_merge_into_a_plain_model(run_of, tmp_path):
    run = run_of("freeze")
    out = export_run(run, tmp_path / "merged", kind="merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = _batch(merged.config.vocab_size, rows=2)
    torch.testing.assert_close(_logits(merged, ids), _run_logits(run, ids), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        export_run(run, tmp_path / "adapter", kind="adapter")


def test_gguf_refuses_classifier_heads(run_of, tmp_path):
    with pytest.raises(ValueError, match="sequence_classification head; GGUF holds causal language models"):
        export_run(run_of("lora", "classify"), tmp_path / "g", kind="gguf", gguf_type="q8_0")


def test_bad_options_and_missing_runs_fail_with_the_fix(run_of, tmp_path):
    with pytest.raises(FileNotFoundError, match="no final/tunelab.json"):
        export_run(tmp_path, tmp_path / "x", kind="merged")
    run = run_of("full")
    with pytest.raises(ValueError, match="choose one of f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m"):
        export_run(run, tmp_path / "x", kind="gguf", gguf_type="q4_k")
    with pytest.raises(ValueError, match="dtype float16 does not apply to GGUF"):
        export_run(run, tmp_path / "x", kind="gguf", gguf_type="f16", dtype="float16")
    with pytest.raises(ValueError, match="choose one of auto, float32, bfloat16, float16"):
        export_run(run, tmp_path / "x", kind="merged", dtype="fp8")


def test_cli_prints_the_written_files_and_demands_one_kind(run_of, tmp_path):
    from tunelab.cli import app

    runner = CliRunner()
    run = str(run_of("lora"))
    done = runner.invoke(  # the parity gate has its own tests (test_export_gate.py)
        app, ["export", run, "--out", str(tmp_path / "a"), "--adapter", "--no-verify"], terminal_width=200
    )
    assert done.exit_code == 0, done.output
    assert "adapter_model.safetensors" in done.output and "total" in done.output
    assert EXPORT_META in done.output

    both = runner.invoke(app, ["export", run, "--out", str(tmp_path / "b"), "--merge", "--adapter"])
    assert both.exit_code == 2 and "choose exactly one of --merge, --adapter" in " ".join(both.output.split())
    again = runner.invoke(app, ["export", run, "--out", str(tmp_path / "a"), "--adapter"])
    assert again.exit_code == 2 and "already exists and is not empty" in " ".join(again.output.split())


def test_qlora_merges_into_the_dequantised_base_it_trained_against(run_of, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import PeftModel

    from tunelab.export.merge import qlora_merge_mode
    from tunelab.models.load import load_model

    run = run_of("qlora")
    with qlora_merge_mode("dequantized"):  # the default merges into the 16-bit base (test_export_gate.py)
        out = export_run(run, tmp_path / "merged", kind="merged")

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert all(type(m).__module__.startswith(("torch.", "transformers.")) for m in merged.modules())
    ids = _batch(merged.config.vocab_size, rows=4)
    expected = _run_logits(run, ids)  # the 4-bit base with the adapter, as trained
    torch.testing.assert_close(_logits(merged, ids), expected, atol=1e-5, rtol=0)
    # merging into the original dense base instead misses the NF4 rounding the adapter trained against
    dense_base, _ = load_model("tiny:llama", device="cpu", dtype="float32")
    naive = PeftModel.from_pretrained(dense_base, str(run / "final")).merge_and_unload()
    assert (_logits(naive, ids) - expected).abs().max() > 1e-2
    # so an adapter-only export says how to load its base; a merged one needs no such note
    adapter = export_run(run, tmp_path / "adapter", kind="adapter")
    (note,) = json.loads((adapter / "tunelab_export.json").read_text())["notes"]
    assert "4-bit NF4" in note and "--merge" in note
    assert json.loads((out / "tunelab_export.json").read_text())["notes"] == []


def _cached_smollm2() -> str | None:
    from tunelab.assets import AssetMissingError, asset_path

    try:
        asset_path("smollm2-135m-instruct")
    except AssetMissingError:
        return None
    return "asset:smollm2-135m-instruct"


@pytest.mark.slow
def test_smollm2_lora_exports_to_q8_0_gguf_that_agrees_greedily(tmp_path):
    """The demo's model and adapter shape (LoRA r16 on all linear layers), a few steps, then q8_0."""
    usable_llama_cpp()
    from tunelab.recipe import parse_recipe
    from tunelab.train.run import train

    spec = _cached_smollm2()
    if spec is None:
        pytest.skip("SmolLM2 asset not cached; run `tunelab assets fetch smollm2-135m-instruct`")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA))
    recipe = parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": spec},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "training": {"max_steps": 3, "batch_size": 3, "learning_rate": 3e-3, "warmup_steps": 0},
            "output": {"dir": str(tmp_path / "runs"), "name": "demo-like"},
        }
    )
    run = train(recipe, console=Console(quiet=True)).run_dir
    out = export_run(run, tmp_path / "gguf", kind="gguf", gguf_type="q8_0")

    from_gguf = AutoModelForCausalLM.from_pretrained(
        out, gguf_file="demo-like-q8_0.gguf", dtype=torch.float32
    )
    model, tokenizer = load_for_eval(str(run), device="cpu", dtype="float32")
    from tunelab.models.tiny import _CORPUS

    # ~500 positions: at q8_0 SmolLM2 agrees on ~97.7% of them (measured), so a short batch's
    # handful of near-tied positions cannot swing the fraction below the bar by chance
    texts = [line for line in _CORPUS.splitlines() if len(line) > 40][:24]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**batch).logits
        got = from_gguf(**batch).logits
    real = batch["attention_mask"].bool()
    agreement = (got.argmax(-1) == expected.argmax(-1))[real].float().mean().item()
    error = (got - expected)[real].abs().max().item()
    measured = f"SmolLM2 q8_0: greedy agreement {agreement:.1%} over {int(real.sum())} positions, max abs {error:.3f}"
    print(measured)
    assert agreement >= MIN_GREEDY_AGREEMENT, measured
    assert json.loads((out / EXPORT_META).read_text())["base_model"] == spec
