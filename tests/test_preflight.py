"""Pre-flight checks at train start, and splitting on the fly."""

from __future__ import annotations

import json

import pytest

from tunelab.recipe import RecipeError
from tunelab.train.preflight import PreflightError
from tunelab.train.run import train


def test_leakage_warns_and_strict_refuses(tiny_recipe, tmp_path, qa_rows, capsys):
    # the tiny_recipe eval file is the first three training rows: a planted exact leak
    with pytest.raises(PreflightError) as info:
        train(tiny_recipe("lora", data__strict="true", output__name="strict"))
    assert "3 rows of" in str(info.value) and "also appear in the training file" in str(info.value)

    result = train(tiny_recipe("lora", training__max_steps=1, output__name="lenient"))
    problems = json.loads((result.run_dir / "preflight.json").read_text())["problems"]
    assert any("also appear in the training file" in p for p in problems)


def test_truncation_is_reported_exactly(tiny_recipe, tmp_path):
    result = train(tiny_recipe("lora", training__max_steps=1, data__max_length=18, output__name="short"))
    problems = json.loads((result.run_dir / "preflight.json").read_text())["problems"]
    assert any("exceed data.max_length=18" in p for p in problems)


def test_split_on_the_fly_gives_disjoint_files_and_an_eval(tmp_path, qa_rows):
    from tunelab.recipe import parse_recipe

    rows = [
        {"instruction": f"{q['instruction']} number {i}", "output": q["output"]}
        for i in range(5)
        for q in qa_rows
    ]
    data = tmp_path / "all.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = parse_recipe(
        {
            "model": {"name_or_path": "tiny:llama"},
            "method": {"name": "lora"},
            "data": {"train": str(data), "split": {"eval_ratio": 0.2, "seed": 1}, "max_length": 64},
            "training": {"max_steps": 2, "batch_size": 4},
            "output": {"dir": str(tmp_path / "runs"), "name": "s"},
        }
    )
    result = train(recipe)
    train_rows = (result.run_dir / "data" / "train.jsonl").read_text().splitlines()
    eval_rows = (result.run_dir / "data" / "validation.jsonl").read_text().splitlines()
    assert len(train_rows) + len(eval_rows) == len(rows) and not set(train_rows) & set(eval_rows)
    assert "eval_loss" in result.final_eval


def test_eval_and_split_together_is_an_error():
    with pytest.raises(RecipeError, match="data.eval or data.split"):
        from tunelab.recipe import parse_recipe

        parse_recipe(
            {
                "model": {"name_or_path": "tiny:llama"},
                "method": {"name": "lora"},
                "data": {"train": "a.jsonl", "eval": "b.jsonl", "split": {}},
            }
        )
