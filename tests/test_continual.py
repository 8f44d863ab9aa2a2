"""Continual learning on a tiny two-task setup: EWC and replay forget task A less than plain training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunelab.recipe import parse_recipe
from tunelab.runs.rundir import RunDir
from tunelab.train.continual import EwcHook, estimate_fisher, mix_replay, replay_count
from tunelab.train.data import prepare_split
from tunelab.train.loop import Trainer, evaluate_loss
from tunelab.train.run import train

QUESTIONS = ["Say hi", "Name a colour", "Name an animal", "Pick a number", "Name a fruit", "Say bye"]
ANSWERS_A = ["hello there", "blue", "a cat", "seven", "an apple", "goodbye"]
ANSWERS_B = ["go away", "red", "a dog", "three", "a pear", "see you"]  # same prompts, conflicting answers
STEPS_B = 15


def write(path: Path, answers: list[str]) -> Path:
    rows = [{"instruction": q, "output": a} for q, a in zip(QUESTIONS, answers)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(model: str, data: Path, runs: Path, name: str, steps: int):
    return parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": model},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "full"},
            "training": {
                "max_steps": steps,
                "batch_size": 6,
                "learning_rate": 3e-3,
                "warmup_steps": 0,
                "lr_scheduler": "constant",
            },
            "output": {"dir": str(runs), "name": name},
        }
    )


@pytest.fixture(scope="module")
def two_tasks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Task A learnt from tiny:llama (full fine-tuning); its final model is where task B starts."""
    root = tmp_path_factory.mktemp("continual")
    paths = {"a": write(root / "a.jsonl", ANSWERS_A), "b": write(root / "b.jsonl", ANSWERS_B), "root": root}
    paths["model_a"] = train(recipe("tiny:llama", paths["a"], root / "runs", "task-a", 40)).run_dir / "final"
    return paths


def learn_b(paths: dict[str, Path], name: str, *, ewc: float = 0.0, replay: float = 0.0) -> dict[str, float]:
    """Train task B from the task-A model; return both tasks' losses afterwards."""
    trainer = Trainer(
        recipe(str(paths["model_a"]), paths["b"], paths["root"] / "runs", name, STEPS_B),
        RunDir.create(paths["root"] / "runs", name),
    )
    task_a = prepare_split(str(paths["a"]), trainer.objective, trainer.recipe.data).features
    task_b = list(trainer.train_split.features)
    if ewc:
        trainer.hooks.append(EwcHook.from_previous_task(trainer.model, trainer.objective, task_a, ewc))
    if replay:
        trainer.train_split.features = mix_replay(task_b, task_a, replay, seed=0)
    before = {f"{task}_before": loss(trainer, feats) for task, feats in (("a", task_a), ("b", task_b))}
    trainer.fit()
    return {**before, "a": loss(trainer, task_a), "b": loss(trainer, task_b)}


def loss(trainer: Trainer, features: list[dict]) -> float:
    return evaluate_loss(trainer.model, trainer.objective, features, 8, "cpu")["eval_loss"]


def test_ewc_and_replay_forget_less_than_sequential_training(two_tasks: dict[str, Path]) -> None:
    plain = learn_b(two_tasks, "plain")
    # The empirical Fisher of a task the model has memorised is small, hence a large lambda.
    ewc = learn_b(two_tasks, "ewc", ewc=1e7)
    replay = learn_b(two_tasks, "replay", replay=0.5)
    assert plain["a_before"] < 0.3, "task A was learnt first"
    assert plain["a"] > 5 * plain["a_before"], "plain sequential training forgets task A"
    assert ewc["a"] < 0.6 * plain["a"], (ewc, plain)
    assert replay["a"] < 0.6 * plain["a"], (replay, plain)
    for run in (plain, ewc, replay):
        assert run["b"] < 0.6 * run["b_before"], ("task B is still learnt", run)


def test_fisher_is_mean_squared_gradient_of_trainable_parameters(tiny_recipe) -> None:
    trainer = Trainer(tiny_recipe("lora"), RunDir.create(Path(tiny_recipe().output.dir), "fisher"))
    features = trainer.train_split.features[:4]
    fisher = estimate_fisher(trainer.model, trainer.objective, features, batch_size=2, n_batches=2)
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert set(fisher) == trainable and all("lora_" in n for n in fisher)
    assert all(p.grad is None for p in trainer.model.parameters())
    name = next(iter(fisher))
    param = dict(trainer.model.named_parameters())[name]
    expected = torch.zeros_like(param)
    for start in (0, 2):
        trainer.model.zero_grad()
        out = trainer.objective.loss(trainer.model, trainer.objective.collate(features[start : start + 2]))
        (out.loss_sum / out.n_units).backward()
        expected += param.grad**2 / 2
    torch.testing.assert_close(fisher[name], expected)


def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic_away_from_it() -> None:
    model = torch.nn.Linear(3, 2)
    fisher = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    hook = EwcHook(model, fisher, lam=4.0)
    assert float(hook.penalty(model)) == 0.0
    with torch.no_grad():
        model.weight.add_(0.5)
    # lambda/2 · F · d² summed over 6 weights = 2 · 2 · 0.25 · 6
    assert float(hook.penalty(model)) == pytest.approx(6.0)
    assert EwcHook(model, fisher, lam=0.0).penalty(model) is None


def test_mix_replay_fraction_and_determinism() -> None:
    new, old = [f"n{i}" for i in range(30)], [f"o{i}" for i in range(4)]
    mixed = mix_replay(new, old, 0.25, seed=3)
    assert len(mixed) == 40 and sum(x.startswith("o") for x in mixed) == replay_count(30, 0.25) == 10
    assert set(new) <= set(mixed) and {x for x in mixed if x.startswith("o")} == set(old)
    assert mixed == mix_replay(new, old, 0.25, seed=3) != mix_replay(new, old, 0.25, seed=4)
    assert sorted(mix_replay(new, old, 0.0)) == sorted(new)
    with pytest.raises(ValueError, match="fraction"):
        mix_replay(new, old, 1.0)
