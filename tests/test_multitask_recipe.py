"""Recipe-level multi-task mixing, replay, EWC and recommended defaults, through the engine."""

from __future__ import annotations

import json
import re

import torch

from tunelab.plan.recommend import count_params, recommend
from tunelab.recipe import parse_recipe
from tunelab.runs.rundir import RunDir
from tunelab.train.loop import Trainer
from tunelab.train.run import train


def _rows(prefix: str, n: int) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "output": f"{prefix} answer {i}"} for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _base(tmp_path, **data):
    return {
        "model": {"name_or_path": "tiny:llama"},
        "method": {"name": "full"},
        "data": {"max_length": 64, **data},
        "training": {"max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 0},
        "output": {"dir": str(tmp_path / "runs"), "name": "run"},
    }


def test_tasks_are_mixed_by_weight_and_evaluated_per_task(tmp_path):
    tasks = [
        {
            "name": "alpha",
            "train": _write(tmp_path / "a.jsonl", _rows("alpha", 30)),
            "weight": 3,
            "eval": _write(tmp_path / "ae.jsonl", _rows("alpha-eval", 4)),
        },
        {
            "name": "beta",
            "train": _write(tmp_path / "b.jsonl", _rows("beta", 30)),
            "weight": 1,
            "eval": _write(tmp_path / "be.jsonl", _rows("beta-eval", 4)),
        },
    ]
    raw = _base(tmp_path, tasks=tasks, mixing={"total": 40, "tag": "[{task}] "})
    result = train(parse_recipe(raw))
    names = (result.run_dir / "data" / "mixture.tasks.txt").read_text().split()
    assert names.count("alpha") == 30 and names.count("beta") == 10
    mixture = [
        json.loads(line) for line in (result.run_dir / "data" / "mixture.jsonl").read_text().splitlines()
    ]
    for name, row in zip(names, mixture, strict=True):  # each row tagged with its own task, from it
        prompt = row["messages"][0]["content"]
        assert prompt.startswith(f"[{name}] {name} question "), (name, prompt)
    assert {"alpha/eval_loss", "beta/eval_loss", "eval_loss"} <= set(result.final_eval)
    assert result.final_eval["alpha/eval_loss"] != result.final_eval["beta/eval_loss"]


def test_replay_mixes_earlier_data_into_training(tmp_path):
    raw = _base(
        tmp_path,
        train=_write(tmp_path / "new.jsonl", _rows("new", 12)),
        replay={"path": _write(tmp_path / "old.jsonl", _rows("old", 12)), "fraction": 0.25},
    )
    recipe = parse_recipe(raw)
    trainer = Trainer(recipe, RunDir.create(recipe.output.dir, recipe.output.name))
    texts = [trainer.tokenizer.decode(f["input_ids"]) for f in trainer.train_split.features]
    questions = [re.search(r"(new|old) question (\d+)", t).groups() for t in texts]
    new = sorted(int(i) for source, i in questions if source == "new")
    old = [int(i) for source, i in questions if source == "old"]
    assert new == list(range(12))  # every new example, once
    assert len(old) == 4 and len(set(old)) == 4  # 4 / (12 + 4) = 25%, drawn without replacement
    assert len(texts) == 16


def test_ewc_section_anchors_at_the_start_and_penalises_drift(tmp_path):
    """Wiring only: the effect of EWC on forgetting is shown in tests/test_continual.py."""
    from tunelab.train.continual import EwcHook

    raw = _base(tmp_path, train=_write(tmp_path / "new.jsonl", _rows("new", 8)))
    raw["training"]["ewc"] = {
        "previous_data": _write(tmp_path / "prev.jsonl", _rows("prev", 8)),
        "lambda": 10.0,
    }
    recipe = parse_recipe(raw)
    assert recipe.resolved()["training"]["ewc"]["lambda"] == 10.0  # written back under its YAML name
    trainer = Trainer(recipe, RunDir.create(recipe.output.dir, recipe.output.name))
    model = trainer.accelerator.unwrap_model(trainer.model)
    (hook,) = [h for h in trainer.hooks if isinstance(h, EwcHook)]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert set(hook.fisher) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(torch.equal(hook.anchor[n], start[n]) for n in hook.anchor)
    assert float(hook.penalty(model)) == 0.0
    trainer.fit()
    assert float(hook.penalty(model)) > 0.0


def test_recommended_defaults_fill_only_what_is_omitted(tmp_path):
    raw = _base(tmp_path, train=_write(tmp_path / "t.jsonl", _rows("t", 4)))
    raw["method"] = {"name": "lora"}
    raw["recommended_defaults"] = True
    raw["training"].pop("learning_rate")
    recipe = parse_recipe(raw)
    plain = parse_recipe({**raw, "recommended_defaults": False})
    rules = {r.field: r.value for r in recommend(count_params("tiny:llama"), "lora")}
    filled, unfilled = recipe.resolved(), plain.resolved()

    def value(resolved: dict, field: str) -> object:
        section, key = field.split(".")
        return resolved[section][key]

    written = {"training.batch_size": 4, "training.max_steps": 2, "training.warmup_steps": 0}
    for field, expected in written.items():  # what the user wrote wins
        assert value(filled, field) == expected, field
    # warmup_steps was given, so the recommended warmup_ratio is not added next to it
    assert value(filled, "training.warmup_ratio") == value(unfilled, "training.warmup_ratio")
    omitted = {f: v for f, v in rules.items() if f not in written and f != "training.warmup_ratio"}
    assert "training.learning_rate" in omitted and "method.r" in omitted
    for field, expected in omitted.items():  # every omitted field is the rule's value
        assert value(filled, field) == expected, field
    assert recipe.training.learning_rate != plain.training.learning_rate  # and the rule changed it
