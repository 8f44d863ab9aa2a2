"""training.compile: regional compilation of the decoder layers gives the eager loss curve, reports
what it compiled and what it cost, and is refused with a reason where it cannot apply."""

from __future__ import annotations

import json
from io import StringIO

import pytest
import torch
from typer.testing import CliRunner

from tunelab.console import make_console
from tunelab.recipe import RecipeError
from tunelab.runs.rundir import RunDir
from tunelab.train import speed
from tunelab.train.loop import Trainer
from tunelab.train.run import train
from tunelab.train.speed import CompiledLayers, FastPathUnavailable, compile_decoder_layers

# inductor on CPU reorders float32 reductions (fused kernels), so compiled and eager runs differ in the
# last bits of each step; over 3 steps at lr 1e-2 that stays far below this.
LOSS_RTOL = 1e-4
PARAM_ATOL = 1e-4


def _fit(recipe, console=None):
    """Train without an eval set (evaluation under no_grad would be a second graph to compile) and
    with the whole data set in each micro-batch: one batch shape, so one compile."""
    run = RunDir.create(recipe.output.dir, recipe.output.name)
    trainer = Trainer(recipe, run, console or make_console(file=StringIO()))
    losses = trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return trainer, losses, trained


@pytest.fixture
def recipe_for(tiny_recipe):
    def make(method, checkpointing, compiled):
        overrides = {
            "data__eval": "null",
            "training__batch_size": 6,
            "training__max_steps": 3,
            "training__gradient_checkpointing": str(checkpointing).lower(),
            "training__compile": str(compiled).lower(),
            "output__name": f"{method}-{checkpointing}-{compiled}",
        }
        if method == "lora":
            overrides["method__dropout"] = 0.0  # compiled dropout draws other random masks than eager
        return tiny_recipe(method, **overrides)

    return make


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_follow_the_eager_loss_curve(recipe_for, method, checkpointing):
    _, eager_losses, eager_params = _fit(recipe_for(method, checkpointing, False))
    trainer, compiled_losses, compiled_params = _fit(recipe_for(method, checkpointing, True))
    assert trainer.compiled is not None and trainer.compiled.count == 2
    assert compiled_losses == pytest.approx(eager_losses, rel=LOSS_RTOL)
    assert eager_losses[-1] < eager_losses[0]  # the curve compared is a learning one
    assert eager_params.keys() == compiled_params.keys()
    for name, value in eager_params.items():
        torch.testing.assert_close(compiled_params[name], value, atol=PARAM_ATOL, rtol=0, msg=name)


@pytest.mark.slow
def test_compiled_run_reports_what_it_compiled_and_what_it_cost(recipe_for, monkeypatch):
    """The wiring through `train`: dynamo traces the layers in place (backend eager: no kernel
    generation, so the numbers are eager's exactly); console and manifest say what was compiled and
    how long the first step took."""
    real = speed.compile_decoder_layers
    compiled_models = []

    def compile_with_eager_backend(model, device):
        compiled_models.append(model)
        return real(model, device, backend="eager")

    monkeypatch.setattr("tunelab.train.loop.compile_decoder_layers", compile_with_eager_backend)
    eager = train(recipe_for("lora", True, False))
    log = StringIO()
    result = train(recipe_for("lora", True, True), console=make_console(file=log))
    _, layers = speed.find_blocks(compiled_models[0])
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert result.losses == pytest.approx(eager.losses, rel=1e-6)
    text = log.getvalue()
    assert "compile: 2 decoder layers (LlamaDecoderLayer) compiled in place" in text
    assert "compile: first step took" in text
    assert "s of the run went to compiling (first step" in text
    entry = json.loads((result.run_dir / "manifest.json").read_text())["compile"]
    assert entry["layers"] == 2 and entry["layer_types"] == ["LlamaDecoderLayer"]
    assert entry["first_step_s"] > 0 and entry["median_step_s"] > 0 and "compile_overhead_s" in entry


def test_compile_cost_is_the_time_beyond_the_median_step():
    compiled = CompiledLayers(2, ["LlamaDecoderLayer"])
    assert compiled.record_step(30.0) == "compile: first step took 30.0 s (compiling included)"
    for seconds in (1.0, 1.2, 0.8):
        assert compiled.record_step(seconds) is None
    summary = compiled.summary()
    assert summary["first_step_s"] == 30.0 and summary["median_step_s"] == 1.0
    assert summary["compile_overhead_s"] == pytest.approx(29.2)  # 29 + 0.2 beyond the median step
    assert compiled.final_line() == (
        "compile: about 29.2 s of the run went to compiling (first step 30.0 s, median step 1.00 s)"
    )
    assert CompiledLayers(2, ["LlamaDecoderLayer"]).final_line() is None  # no step yet: nothing to say


def test_model_without_a_layer_list_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    with pytest.raises(FastPathUnavailable, match=r"training.compile: cannot be used here: .*no stack of"):
        compile_decoder_layers(model, "cpu")


def test_missing_c_compiler_is_refused_on_cpu(monkeypatch):
    from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    model = build_tiny_llama(build_tiny_tokenizer(), seed=0)
    with pytest.raises(FastPathUnavailable, match="C\\+\\+ compiler"):
        compile_decoder_layers(model, "cpu")
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)  # nothing half-done


def test_torch_without_module_compile_is_refused(monkeypatch):
    monkeypatch.delattr(torch.nn.Module, "compile")
    assert "has no nn.Module.compile" in speed.compile_problem(torch.nn.Linear(2, 2), "cpu")


def test_compile_refused_where_it_cannot_apply_in_the_recipe(tiny_recipe):
    with pytest.raises(RecipeError, match="training.compile: true: objective grpo"):
        tiny_recipe("lora", objective__name="grpo", objective__reward="length", training__compile="true")
    with pytest.raises(RecipeError, match="training.compile: not supported with distributed strategy fsdp"):
        tiny_recipe("lora", training__compile="true", training__distributed__strategy="fsdp")


def test_cli_refusal_is_one_line_and_exit_2(tmp_path, monkeypatch, qa_rows):
    import yaml

    from tunelab.cli import app

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    recipe = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data), "max_length": 64},
        "method": {"name": "lora"},
        "training": {"max_steps": 1, "compile": True},
        "output": {"dir": str(tmp_path / "runs"), "name": "refused"},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: training.compile: cannot be used here: torch.compile builds CPU kernels with a C++ compiler "
        "and none was found (install g++ or set CXX); set training.compile: false"
    ]
    assert "Traceback" not in result.output
    assert not (tmp_path / "runs" / "refused").exists()  # refused before training: no run left behind
