"""training.kernels: auto takes Liger's kernels only where they run and says why not otherwise;
liger where they cannot run is refused with the reason; applied, they patch the model through Liger's
own public API; and on a GPU they give the plain path's loss and gradients (gpu test)."""

from __future__ import annotations

import json
from io import StringIO

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tunelab.console import make_console
from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer
from tunelab.train import speed
from tunelab.train.run import train
from tunelab.train.speed import FastPathUnavailable, choose_kernels


@pytest.fixture
def tiny_model():
    return build_tiny_llama(build_tiny_tokenizer(), seed=0)


@pytest.fixture
def liger_present(monkeypatch):
    """Liger counted as installed whether or not it is (the checks after that one are what is tested)."""
    monkeypatch.setattr(speed, "liger_installed", lambda: True)


@pytest.fixture
def restore_llama_module(monkeypatch):
    """Liger's API patches transformers' Llama module for the whole process: put it back afterwards."""
    from transformers.models.llama import modeling_llama

    for name in ("apply_rotary_pos_emb", "LlamaRMSNorm", "LlamaMLP"):
        monkeypatch.setattr(modeling_llama, name, getattr(modeling_llama, name))
    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "forward", modeling_llama.LlamaForCausalLM.forward)
    return modeling_llama


def test_none_is_none(tiny_model):
    choice = choose_kernels("none", tiny_model, "cuda")
    assert (choice.name, choice.reason) == ("none", "training.kernels: none")


def test_auto_without_liger_installed_is_none_with_the_reason(tiny_model, monkeypatch):
    monkeypatch.setattr(speed, "liger_installed", lambda: False)
    choice = choose_kernels("auto", tiny_model, "cuda")
    assert choice.name == "none"
    assert choice.reason == "auto: liger-kernel is not installed (pip install 'tunelab[kernels]')"


def test_auto_on_cpu_is_none_with_the_reason(tiny_model, liger_present):
    choice = choose_kernels("auto", tiny_model, "cpu")
    assert choice.name == "none"
    assert (
        choice.reason == "auto: no CUDA device (Liger's kernels are Triton GPU kernels; this run is on cpu)"
    )


def test_liger_where_it_cannot_run_is_refused_with_the_reason(tiny_model, liger_present, monkeypatch):
    with pytest.raises(FastPathUnavailable) as err:
        choose_kernels("liger", tiny_model, "cpu")
    assert str(err.value) == (
        "training.kernels: liger cannot be used here: no CUDA device (Liger's kernels are Triton GPU kernels; "
        "this run is on cpu); set training.kernels: auto or none"
    )
    monkeypatch.setattr(speed, "liger_installed", lambda: False)
    with pytest.raises(FastPathUnavailable, match="liger-kernel is not installed"):
        choose_kernels("liger", tiny_model, "cuda")


def test_unsupported_model_type_is_named(tiny_model):
    pytest.importorskip("liger_kernel.transformers")
    tiny_model.config.model_type = "no_such_type"
    with pytest.raises(FastPathUnavailable, match="Liger has no kernels for model type 'no_such_type'"):
        choose_kernels("liger", tiny_model, "cuda")
    assert choose_kernels("auto", tiny_model, "cuda").reason.endswith("model type 'no_such_type'")


def test_supported_type_on_cuda_resolves_to_liger(tiny_model):
    pytest.importorskip("liger_kernel.transformers")
    # the choice needs no GPU to be made: only the device name is read
    assert choose_kernels("auto", tiny_model, "cuda").name == "liger"
    assert choose_kernels("liger", tiny_model, "cuda:0").name == "liger"


def test_applying_liger_patches_the_llama_instance(tiny_model, restore_llama_module):
    pytest.importorskip("liger_kernel.transformers")
    from liger_kernel.transformers import LigerRMSNorm, liger_rotary_pos_emb

    forward_before = tiny_model.forward
    applied = speed.apply_liger(tiny_model)
    assert applied == ["RMSNorm", "SwiGLU", "RoPE"]
    for layer in tiny_model.model.layers:
        assert layer.mlp._get_name() == "LigerSwiGLUMLP"
        assert layer.input_layernorm.forward.__func__ is LigerRMSNorm.forward
        assert layer.post_attention_layernorm.forward.__func__ is LigerRMSNorm.forward
    assert tiny_model.model.norm.forward.__func__ is LigerRMSNorm.forward
    assert restore_llama_module.apply_rotary_pos_emb is liger_rotary_pos_emb
    # the model's own forward (and so its logits path) stays: tunelab computes its losses itself
    assert tiny_model.forward == forward_before


def test_sft_takes_liger_cross_entropy_only_where_a_fused_loss_can_run(tiny_model):
    from peft import LoraConfig, get_peft_model

    from tunelab.objectives.fused_ce import fused_linear_cross_entropy_sum, liger_linear_cross_entropy_sum
    from tunelab.objectives.sft import SftConfig, SftObjective

    objective = SftObjective(SftConfig(), build_tiny_tokenizer(), None)
    assert objective._fused_loss(tiny_model) is None  # today's default: logits
    assert objective.use_liger_cross_entropy(tiny_model) == "loss by Liger's fused linear cross-entropy"
    assert objective._fused_loss(tiny_model) is liger_linear_cross_entropy_sum
    # Liger's kernel wins over objective.fused_cross_entropy: one fused loss runs
    both = SftObjective(SftConfig(fused_cross_entropy=True), build_tiny_tokenizer(), None)
    assert both._fused_loss(tiny_model) is fused_linear_cross_entropy_sum
    both.use_liger_cross_entropy(tiny_model)
    assert both._fused_loss(tiny_model) is liger_linear_cross_entropy_sum

    head_trained = get_peft_model(
        build_tiny_llama(build_tiny_tokenizer(), seed=0),
        LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    )
    other = SftObjective(SftConfig(), build_tiny_tokenizer(), None)
    note = other.use_liger_cross_entropy(head_trained)
    assert note.startswith("loss from full logits (Liger's fused linear cross-entropy cannot apply: ")
    assert other._fused_loss(head_trained) is None


def test_cpu_run_says_kernels_are_off_and_why(tiny_recipe):
    log = StringIO()
    result = train(
        tiny_recipe("lora", training__max_steps=1, data__eval="null"), console=make_console(file=log)
    )
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["kernels"]["in_effect"] == "none"
    assert manifest["kernels"]["reason"].startswith("auto: ")
    assert f"note: kernels: none ({manifest['kernels']['reason']})" in log.getvalue()


def test_cli_refuses_liger_on_cpu_in_one_line(tmp_path, qa_rows, liger_present):
    from tunelab.cli import app

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    recipe = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data), "max_length": 64},
        "method": {"name": "lora"},
        "training": {"max_steps": 1, "kernels": "liger"},
        "output": {"dir": str(tmp_path / "runs"), "name": "refused"},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: training.kernels: liger cannot be used here: no CUDA device (Liger's kernels are Triton GPU "
        "kernels; this run is on cpu); set training.kernels: auto or none"
    ]
    assert "Traceback" not in result.output


def test_online_objectives_refuse_liger_in_the_recipe(tiny_recipe):
    from tunelab.recipe import RecipeError

    with pytest.raises(RecipeError, match="training.kernels: liger: objective grpo generates rollouts"):
        tiny_recipe("lora", objective__name="grpo", objective__reward="length", training__kernels="liger")


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["full", "lora"])
def test_liger_gives_the_plain_loss_and_gradients_on_cuda(method, restore_llama_module):
    """bf16 on the GPU: Liger's RMSNorm/SwiGLU/RoPE and fused linear CE against the plain path, same
    weights, same batch. Tolerances are bf16's (8 bits of mantissa; sums over 64-wide rows)."""
    pytest.importorskip("liger_kernel.transformers")
    from peft import LoraConfig, get_peft_model

    from tunelab.objectives.sft import SftConfig, SftObjective

    tokenizer = build_tiny_tokenizer()

    def model():
        built = build_tiny_llama(tokenizer, seed=0).to("cuda", torch.bfloat16)
        if method == "lora":
            torch.manual_seed(0)  # the same (non-zero) LoRA weights in both models
            built = get_peft_model(
                built, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
            )
        return built

    def loss_and_grads(net, objective, batch):
        out = objective.loss(net, batch)
        (out.loss_sum / out.n_units).backward()
        grads = {n: p.grad.float() for n, p in net.named_parameters() if p.grad is not None}
        return out, grads

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 900, (4, 48), generator=generator)
    labels = ids.clone()
    labels[:, :10] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    batch = {k: v.cuda() for k, v in batch.items()}
    # the plain path first: Liger's RoPE replaces transformers' module-level function for every model
    plain_out, plain_grads = loss_and_grads(model(), SftObjective(SftConfig(), tokenizer, None), batch)
    fast = model()
    speed.apply_liger(fast)
    fast_objective = SftObjective(SftConfig(), tokenizer, None)
    assert fast_objective.use_liger_cross_entropy(fast) == "loss by Liger's fused linear cross-entropy"
    fast_out, fast_grads = loss_and_grads(fast, fast_objective, batch)
    assert int(plain_out.n_units) == int(fast_out.n_units)
    torch.testing.assert_close(fast_out.loss_sum.float(), plain_out.loss_sum.float(), rtol=2e-2, atol=0)
    assert fast_grads.keys() == plain_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        # whole-tensor relative error: elementwise bf16 comparisons fail on near-zero entries by chance
        error = float((fast_grads[name] - grad).norm() / grad.norm().clamp(min=1e-12))
        assert error < 3e-2, f"{name}: gradient differs by {error:.2%}"
