"""Out-of-memory recovery and `batch_size: auto`, on CPU with an injected out-of-memory error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunelab.runs.rundir import RunDir
from tunelab.train.loop import Trainer
from tunelab.train.oom import (
    OutOfMemoryAtOneExample,
    is_out_of_memory,
    next_split,
    probe_micro_batch,
    split_indices,
)

ROWS = [{"instruction": f"Repeat the number {n}", "output": f"{n} {n} {n}"} for n in range(12)]


@pytest.fixture
def recipe(tiny_recipe, tmp_path: Path):
    train = tmp_path / "oom_train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")

    def make(name: str, **overrides: object):
        settings = {
            "data__train": str(train),
            "data__eval": "null",
            "training__batch_size": 4,
            "training__grad_accum": 2,
            "training__max_steps": 4,
            "output__name": name,
        }
        return tiny_recipe("lora", **(settings | overrides))

    return make


def new_trainer(recipe) -> Trainer:
    run = RunDir.create(recipe.output.dir, recipe.output.name)
    run.write_manifest({"status": "running"})
    return Trainer(recipe, run)


def trainer_recording_examples(recipe) -> tuple[Trainer, list[list[int]]]:
    """A trainer whose successful optimizer steps record the example indices they consumed."""
    trainer = new_trainer(recipe)
    consumed: list[list[int]] = []
    pending: list[int] = []
    make_batch, attempt = trainer._batch, trainer._attempt_step

    def batch(indices: list[int]) -> dict[str, torch.Tensor]:
        pending.extend(indices)
        return make_batch(indices)

    def step() -> dict[str, float]:
        pending.clear()
        row = attempt()
        consumed.append(list(pending))
        return row

    trainer._batch, trainer._attempt_step = batch, step
    return trainer, consumed


def inject_oom(trainer: Trainer, *, from_step: int, above: int) -> list[int]:
    """Make the objective raise CUDA's out-of-memory error for micro-batches larger than ``above``
    from optimizer step ``from_step`` on, as a device with that much memory would."""
    loss, sizes = trainer.objective.loss, []

    def limited(model, batch):
        rows = batch["input_ids"].shape[0]
        if trainer.state.step >= from_step and rows > above:
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {rows} rows > {above})")
        sizes.append(rows)
        return loss(model, batch)

    trainer.objective.loss = limited
    return sizes


def trainable(trainer: Trainer) -> dict[str, torch.Tensor]:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_oom_recovery_keeps_losses_weights_and_data_of_the_uninterrupted_run(recipe) -> None:
    plain, plain_seen = trainer_recording_examples(recipe("plain"))
    plain_losses = plain.fit()

    hit, hit_seen = trainer_recording_examples(recipe("oom"))
    sizes = inject_oom(hit, from_step=2, above=2)
    hit_losses = hit.fit()

    assert hit_losses == pytest.approx(plain_losses, rel=1e-6, abs=1e-7)
    for name, weight in trainable(plain).items():
        torch.testing.assert_close(trainable(hit)[name], weight, rtol=1e-6, atol=1e-6)
    # the same examples in the same order, step by step: nothing skipped, nothing repeated
    assert hit_seen == plain_seen
    assert sizes[:4] == [4, 4, 4, 4] and set(sizes[4:]) == {2}
    recovery = hit.run.read_manifest()["oom_recoveries"]
    assert [(r["step"], r["micro_batch_before"], r["micro_batch_after"]) for r in recovery] == [(2, 4, 2)]
    assert recovery[0]["grad_accum_equivalent"] == 4
    rows = [r for r in hit.run.read_metrics() if "loss" in r]
    assert [r.get("micro_batch_split", 1) for r in rows] == [1, 1, 2, 2]


def test_oom_with_one_example_per_micro_batch_stops_with_advice(recipe) -> None:
    trainer = new_trainer(recipe("one"))
    inject_oom(trainer, from_step=0, above=0)
    with pytest.raises(OutOfMemoryAtOneExample, match="one example per micro-batch.*gradient_checkpointing"):
        trainer.fit()
    assert [r["micro_batch_after"] for r in trainer.oom_recoveries] == [2, 1]


def test_other_errors_are_not_mistaken_for_oom(recipe) -> None:
    trainer = new_trainer(recipe("other"))

    def broken(model, batch):
        raise RuntimeError("shape mismatch")

    trainer.objective.loss = broken
    with pytest.raises(RuntimeError, match="shape mismatch"):
        trainer.fit()
    assert trainer.oom_recoveries == []


def test_split_indices_keeps_order_and_every_index() -> None:
    assert split_indices([5, 1, 4, 2, 3], 2) == [[5, 1, 4], [2, 3]]
    assert split_indices([7, 8], 4) == [[7], [8]]
    assert split_indices([1, 2, 3, 4], 1) == [[1, 2, 3, 4]]


def test_next_split_halves_until_one_example() -> None:
    err = torch.OutOfMemoryError("CUDA out of memory")
    first = next_split(1, 5, 2, step=3, err=err)
    assert (first.split, first.before, first.after, first.grad_accum) == (2, 5, 3, 4)
    assert next_split(first.split, 5, 2, step=3, err=err).after == 2
    with pytest.raises(OutOfMemoryAtOneExample):
        next_split(8, 5, 2, step=3, err=err)


def test_is_out_of_memory() -> None:
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"))
    assert not is_out_of_memory(RuntimeError("expected scalar type Float"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_probe_halves_until_the_step_fits() -> None:
    tried: list[int] = []

    def step(size: int) -> None:
        tried.append(size)
        if size > 5:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert probe_micro_batch(24, step, on_oom=lambda n: None) == 3
    assert tried == [24, 12, 6, 3]
    assert (
        probe_micro_batch(4, lambda n: (_ for _ in ()).throw(torch.OutOfMemoryError("x")), on_oom=print) == 0
    )


def test_auto_batch_size_on_cpu_uses_the_plan_default_and_is_recorded(recipe) -> None:
    auto = recipe("auto", training__batch_size="auto")
    trainer = new_trainer(auto)
    assert trainer.recipe.training.batch_size == 8
    assert trainer.run.read_manifest()["auto_batch_size"] == 8
    assert auto.training.batch_size == "auto"  # the caller's recipe is not mutated


def test_auto_batch_size_on_resume_reuses_the_recorded_choice(recipe) -> None:
    auto = recipe("again", training__batch_size="auto")
    run = RunDir.create(auto.output.dir, "again")
    run.write_manifest({"status": "running", "auto_batch_size": 3})
    assert Trainer(auto, run).recipe.training.batch_size == 3
