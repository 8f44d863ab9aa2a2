"""The engine with each method: what learns, what stays, and that learning happens."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tunelab.runs.rundir import RunDir, RunExistsError
from tunelab.train.common import micro_batches_for_step, total_steps
from tunelab.train.loop import Trainer
from tunelab.train.run import train


def _fit(recipe):
    run = RunDir.create(recipe.output.dir, recipe.output.name)
    run.write_recipe(recipe.resolved())
    trainer = Trainer(recipe, run)
    base_model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in base_model.named_parameters()}
    losses = trainer.fit()
    after = dict(base_model.named_parameters())
    return trainer, before, after, losses


def test_loss_falls_when_overfitting_a_few_examples(tiny_recipe):
    result = train(tiny_recipe("full", training__max_steps=30, training__learning_rate=3e-3))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.5 * first, (first, last)


def test_lora_changes_every_lora_parameter_and_no_base_parameter(tiny_recipe):
    trainer, before, after, _ = _fit(tiny_recipe("lora"))
    lora = [n for n in after if "lora_" in n]
    assert lora and all(after[n].requires_grad for n in lora)
    # lora_B starts at zero, so after a few steps both A and B must have moved
    unchanged = [n for n in lora if torch.equal(before[n], after[n])]
    assert unchanged == []
    base = [n for n in after if "lora_" not in n]
    changed_base = [n for n in base if not torch.equal(before[n], after[n])]
    assert base and changed_base == []


def test_full_fine_tuning_changes_the_base_weights(tiny_recipe):
    _, before, after, _ = _fit(tiny_recipe("full"))
    changed = [n for n in after if not torch.equal(before[n], after[n])]
    # every weight gets a gradient from the loss; all must move
    assert len(changed) == len(after)


def test_run_directory_contents(tiny_recipe):
    recipe = tiny_recipe("lora", training__save_every=2, training__keep_checkpoints=2)
    result = train(recipe)
    run = result.run_dir
    assert {p.name for p in run.iterdir()} >= {
        "recipe.yaml",
        "manifest.json",
        "metrics.jsonl",
        "checkpoints",
        "final",
    }
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["seed"] == 0
    assert manifest["data"] and all(len(f["sha256"]) == 64 for f in manifest["data"])
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-4", "step-6"]
    ckpt = run / "checkpoints" / "step-6"
    assert {
        "trainable.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng.pt",
        "trainer_state.json",
        "checkpoint.json",
    } <= {p.name for p in ckpt.iterdir()}
    assert all("lora_" in name for name in load_file(str(ckpt / "trainable.safetensors")))
    assert (run / "final" / "adapter_model.safetensors").exists()
    steps = [
        r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]
    assert steps == list(range(1, 7))


def test_existing_run_name_needs_overwrite(tiny_recipe):
    recipe = tiny_recipe("lora", training__max_steps=1)
    train(recipe)
    with pytest.raises(RunExistsError, match="--resume"):
        train(recipe)
    assert train(recipe, overwrite=True).steps == 1


def test_gradient_accumulation_matches_one_big_batch(tiny_recipe):
    """Same examples per optimizer step → same update, whether in one micro-batch or three."""
    big = train(tiny_recipe("full", training__max_steps=2, training__batch_size=6, output__name="big"))
    accum = train(
        tiny_recipe(
            "full",
            training__max_steps=2,
            training__batch_size=2,
            training__grad_accum=3,
            output__name="accum",
        )
    )
    # different micro-batch order inside the step does not change the summed gradient
    assert big.losses[0] == pytest.approx(accum.losses[0], rel=1e-5)
    assert big.losses[1] == pytest.approx(accum.losses[1], rel=1e-4)


def test_micro_batch_stream_covers_each_epoch_once():
    class Cfg:
        batch_size, grad_accum, max_steps, epochs = 4, 2, None, 2.0

    steps = total_steps(10, Cfg.batch_size, Cfg.grad_accum, Cfg.epochs, Cfg.max_steps)
    seen = [
        i
        for s in range(steps)
        for mb in micro_batches_for_step(s, 10, Cfg.batch_size, Cfg.grad_accum, 1)
        for i in mb
    ]
    assert steps == 3 and sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))


def test_early_stopping_stops_when_eval_stops_improving(tiny_recipe):
    recipe = tiny_recipe(
        "full",
        training__max_steps=40,
        training__learning_rate=0.5,
        training__eval_every=1,
        **{"training.early_stopping": "{metric: eval_loss, patience: 2}"},
    )
    result = train(recipe)
    assert result.stopped_early and result.steps < 40
