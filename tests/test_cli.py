"""The command line: every stage is there, errors are clear, a tiny run goes end to end."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import app

runner = CliRunner()


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    stages = (
        "assets", "data", "recipe", "plan", "train", "sweep", "eval", "runs", "export", "serve", "demo",
        "recommend", "adapters", "studio",
    )  # fmt: skip
    for command in stages:
        assert f"│ {command} " in result.output, command
    for command in stages:
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "Usage" in sub.output


def test_recipe_show_reports_every_problem(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name_or_path": "tiny:llama"},
                "data": {"train": "x"},
                "method": {"name": "lora", "alhpa": 3},
                "training": {"epoch": 1},
            }
        )
    )
    result = runner.invoke(app, ["recipe", "show", str(path)])
    assert result.exit_code == 2
    assert "method.alhpa: unknown key. Did you mean 'alpha'?" in result.output
    assert "training.epoch: unknown key. Did you mean 'epochs'?" in result.output


def _tiny_recipe(tmp_path, qa_rows) -> str:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    recipe = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data), "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "training": {"max_steps": 2, "batch_size": 3},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "cli-run.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_train_then_refuse_same_name_then_eval(tmp_path, qa_rows):
    recipe = _tiny_recipe(tmp_path, qa_rows)
    first = runner.invoke(app, ["train", recipe, "--set", "training.learning_rate=1e-3"])
    assert first.exit_code == 0, first.output
    run = tmp_path / "runs" / "cli-run"
    assert yaml.safe_load((run / "recipe.yaml").read_text())["training"]["learning_rate"] == 1e-3
    again = runner.invoke(app, ["train", recipe])
    assert again.exit_code == 2 and "--resume" in again.output
    evaluated = runner.invoke(app, ["eval", str(run), "--data", str(tmp_path / "train.jsonl"), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    row = json.loads(evaluated.stdout)  # warnings from libraries go to stderr
    assert row["n"] == len(qa_rows) and row["perplexity"] > 1


def test_missing_model_names_the_path(tmp_path, qa_rows):
    recipe = _tiny_recipe(tmp_path, qa_rows)
    result = runner.invoke(app, ["train", recipe, "--set", "model.name_or_path=./no/such/model.gguf"])
    assert result.exit_code == 2
    assert "no/such/model.gguf" in result.output


@pytest.mark.parametrize("line", ['{"instruction": "hi", "output": "x"}\n{oops\n'])
def test_malformed_data_line_names_file_and_line(tmp_path, line):
    data = tmp_path / "bad.jsonl"
    data.write_text(line)
    recipe = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data)},
        "method": {"name": "full"},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", str(path)])
    assert result.exit_code == 2
    assert f"{data}:2" in result.output
