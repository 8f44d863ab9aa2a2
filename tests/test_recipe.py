"""Recipes: strict at the door, every problem at once, field paths and fixes in the message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunelab.recipe import RecipeError, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
BASE = {"model": {"name_or_path": "tiny:llama"}, "data": {"train": "t.jsonl"}, "method": {"name": "lora"}}


def problems(raw: dict, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, overrides=overrides)
    return info.value.problems


def test_all_errors_at_once_with_paths_and_hints():
    raw = {
        "model": {"name_or_path": "x", "dtyp": "bf16"},
        "data": {"train": "t.jsonl", "max_length": 2},
        "method": {"name": "lora", "r": 0},
        "training": {"learnig_rate": 1e-4},
        "evl": {},
    }
    found = problems(raw)
    assert "model.dtyp: unknown key. Did you mean 'dtype'?" in found
    assert "training.learnig_rate: unknown key. Did you mean 'learning_rate'?" in found
    assert "evl: unknown key. Did you mean 'eval'?" in found
    assert any(p.startswith("data.max_length:") and "8" in p for p in found)
    assert any(p.startswith("method.r:") for p in found)
    assert len(found) == 5


def test_unknown_method_names_the_closest_and_the_known_ones():
    (message,) = problems({**BASE, "method": {"name": "lroa"}})
    assert message.startswith("method.name: unknown method 'lroa'. Did you mean 'lora'?")
    assert "full" in message


def test_missing_sections_and_method_name():
    found = problems({"method": {"r": 4}})
    assert "model: required field is missing" in found
    assert "data: required field is missing" in found
    assert any(p.startswith("method.name: missing") for p in found)


def test_renamed_keys_say_the_new_name():
    found = problems({**BASE, "training": {"lr": 1e-3}})
    assert found == ["training.lr: was renamed to 'training.learning_rate'"]


def test_method_specific_fields_are_checked_against_that_method():
    found = problems({**BASE, "method": {"name": "full", "r": 8}})
    assert found == ["method.r: unknown key"]


def test_conflicting_warmup_says_choose_one():
    (message,) = problems({**BASE, "training": {"warmup_ratio": 0.1, "warmup_steps": 10}})
    assert message.startswith("training:") and "Choose one" in message


def test_cli_overrides_are_typed_and_validated():
    recipe = parse_recipe(
        dict(BASE), overrides=["training.learning_rate=1e-4", "method.target_modules=[q_proj, v_proj]"]
    )
    assert recipe.training.learning_rate == 1e-4
    assert recipe.method.target_modules == ["q_proj", "v_proj"]
    assert problems(dict(BASE), overrides=["training.batch_sise=4"]) == [
        "training.batch_sise: unknown key. Did you mean 'batch_size'?"
    ]


def test_resolved_recipe_fills_defaults_and_round_trips(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"text": "x"}\n')
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(BASE))
    recipe = load_recipe(path)
    resolved = recipe.resolved()
    assert (
        resolved["output"]["name"] == "r"
        and resolved["method"]["r"] == 16
        and resolved["objective"]["name"] == "sft"
    )
    assert parse_recipe(resolved).resolved() == resolved


def test_every_shipped_recipe_validates():
    recipes = [p for p in REPO.glob("recipes/**/*.yaml") if "sweeps" not in p.parts]
    paths = sorted(recipes) + sorted(REPO.glob("src/tunelab/resources/**/*.yaml"))
    assert len(paths) == 13, [p.name for p in paths]
    for path in paths:
        # the demo's template names its data only once `tunelab demo` has written it
        load_recipe(path, check_files=path.name != "demo.yaml")


def test_every_shipped_sweep_space_validates_against_its_recipe():
    from tunelab.sweep.space import load_space, sweep_base, validate_space

    spaces = sorted(REPO.glob("recipes/sweeps/*.yaml"))
    assert spaces
    for path in spaces:
        validate_space(load_space(path), sweep_base(load_recipe(REPO / "recipes" / "tiny-lora.yaml")))


def test_an_objective_section_of_sft_settings_needs_no_name():
    raw = {"model": {"name_or_path": "tiny:llama"}, "data": {"train": "x"}, "method": {"name": "lora"}}
    recipe = parse_recipe(dict(raw), overrides=["objective.completion_only=false"])
    assert recipe.objective.name == "sft" and recipe.objective.completion_only is False
    with pytest.raises(RecipeError, match="objective.name: missing"):
        parse_recipe(dict(raw), overrides=["objective.beta=0.2"])  # a DPO-family setting: say which one


@pytest.mark.parametrize(
    "objective",
    [
        {"name": "classify"},
        {"name": "reward"},
        {"name": "dpo"},
        {"name": "kto"},
        {"name": "grpo", "reward": "r.py:f"},
    ],
)
def test_packing_is_refused_for_objectives_over_whole_examples(objective):
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": "x", "packing": True},
        "method": {"name": "lora"},
        "objective": objective,
    }
    with pytest.raises(RecipeError, match="data.packing: objective .* set data.packing: false"):
        parse_recipe(raw)
    raw["objective"] = {"name": "sft"}
    assert parse_recipe(raw).data.packing is True


def test_parse_recipe_leaves_the_callers_mapping_as_given():
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": "t.jsonl"},
        "method": {"name": "lora"},
        "training": {},
    }
    parse_recipe(raw, overrides=["training.kernels=none"])
    assert raw["training"] == {} and "objective" not in raw
