"""Recommended settings: sensible with size and method, every value with a rule, recipes that validate."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from tunelab.plan import apply_recommendations, count_params, recommend, recommend_cmd
from tunelab.plan.recommend import METHODS, human_params
from tunelab.recipe import parse_recipe

SIZES = [int(135e6), int(1.7e9), int(7e9), int(70e9)]


def value(recs: list, field: str):
    return next(r.value for r in recs if r.field == field)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_learning_rate_falls_with_model_size(method: str) -> None:
    lrs = [value(recommend(n, method), "training.learning_rate") for n in SIZES]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1]


def test_anchors_reproduce_the_published_settings() -> None:
    assert value(recommend(int(7e9), "lora"), "training.learning_rate") == 2e-4  # QLoRA 7B
    assert value(recommend(int(65e9), "qlora"), "training.learning_rate") == pytest.approx(
        1e-4, rel=0.05
    )  # QLoRA 65B
    assert value(recommend(int(7e9), "full"), "training.learning_rate") == 2e-5  # Alpaca 7B
    assert value(recommend(int(70e9), "full"), "training.learning_rate") == pytest.approx(
        1e-5, rel=0.1
    )  # Tulu 2 70B
    assert value(recommend(int(100e6), "lora"), "training.learning_rate") == 5e-4  # capped for small models


def test_adapters_learn_faster_and_in_smaller_batches_than_full_finetuning() -> None:
    for n in SIZES:
        lora, full = recommend(n, "lora"), recommend(n, "full")
        assert value(lora, "training.learning_rate") > 3 * value(full, "training.learning_rate")
        effective = {
            name: value(recs, "training.batch_size") * value(recs, "training.grad_accum")
            for name, recs in (("lora", lora), ("full", full))
        }
        assert effective == {"lora": 16, "full": 64}
    assert value(recommend(SIZES[0], "full"), "training.lr_scheduler") == "cosine"
    assert {r.field for r in recommend(SIZES[0], "lora")} >= {
        "method.r",
        "method.alpha",
        "method.target_modules",
    }
    assert not any(r.field.startswith("method.") for r in recommend(SIZES[0], "full"))


def test_dataset_size_sets_batch_and_epochs() -> None:
    small = recommend(SIZES[0], "full", dataset_rows=200)
    assert (
        value(small, "training.batch_size") * value(small, "training.grad_accum") == 16
    )  # ≥10 steps per epoch
    assert value(recommend(SIZES[0], "lora", dataset_rows=500_000), "training.epochs") == 2
    assert value(recommend(SIZES[0], "lora", dataset_rows=5_000), "training.epochs") == 3


def _states_its_value(rec, recs: list, params: int) -> bool:
    """Whether a rule's text says the value it recommends (so rule and value cannot drift apart)."""
    v, rule = rec.value, rec.rule
    if rec.field == "training.learning_rate":
        fixed = re.search(r"LR (\d(?:\.\d+)?e-\d+):", rule)
        if fixed:
            return float(fixed.group(1)) == v
        return rule.endswith(f"→ {v:.2g} at {human_params(params)}")
    if rec.field == "training.grad_accum":
        stated = re.search(r"^effective batch (\d+):.*grad_accum = (\d+) / (\d+)$", rule)
        published, numerator, micro = (int(x) for x in stated.groups())
        lowered = re.search(r"; lowered to (\d+) so", rule)  # small data sets: fewer rows per step
        effective = int(lowered.group(1)) if lowered else published
        batch = value(recs, "training.batch_size")
        return effective == numerator and micro == batch and v == effective // micro
    checks = {
        "training.batch_size": lambda: rule.startswith(f"micro-batch {v}:"),
        "training.epochs": lambda: rule.startswith(f"{v} epochs"),
        "training.lr_scheduler": lambda: v in ("cosine", "constant") and rule.startswith(v),
        "training.warmup_ratio": lambda: rule.startswith(f"{v:.0%} warmup:"),
        "training.weight_decay": lambda: v == 0 and rule.startswith("no weight decay:"),
        "training.max_grad_norm": lambda: rule.startswith(f"gradient clipping at {v:g}:"),
        "method.r": lambda: rule.startswith(f"rank {v}:"),
        "method.alpha": lambda: rule.startswith("alpha = 2·r:") and v == 2 * value(recs, "method.r"),
        "method.target_modules": lambda: v == "all-linear" and rule.startswith("all linear layers:"),
        "method.num_virtual_tokens": lambda: rule.startswith(f"{v} virtual tokens:"),
    }
    return checks[rec.field]()  # a KeyError: a new field needs its check here


@pytest.mark.parametrize("method", METHODS)
def test_every_row_states_its_rule(method: str) -> None:
    for n in SIZES:
        for rows in (None, 200, 500_000):
            recs = recommend(n, method, dataset_rows=rows)
            fields = [r.field for r in recs]
            assert len(fields) == len(set(fields)) and "training.learning_rate" in fields
            for rec in recs:
                what, _, source = rec.rule.partition(":")  # "<what>: <source>"
                assert what and len(source.strip()) > 3, rec
                assert _states_its_value(rec, recs, n), rec


def test_unknown_method_has_no_guess() -> None:
    with pytest.raises(ValueError, match="no recommendation rules"):
        recommend(SIZES[0], "mystery")


@pytest.mark.parametrize("method", ["lora", "full"])
def test_recommendations_fill_a_recipe_that_validates(method: str, tmp_path: Path) -> None:
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(tmp_path / "train.jsonl")},
        "method": {"name": method},
        "training": {"epochs": 1},
    }
    filled = apply_recommendations(raw, recommend(count_params("tiny:llama"), method))
    recipe = parse_recipe(filled)
    assert recipe.training.epochs == 1, "what the user wrote wins"
    assert recipe.training.learning_rate == value(
        recommend(count_params("tiny:llama"), method), "training.learning_rate"
    )
    assert raw["training"] == {"epochs": 1}, "the input is not modified"
    if method == "lora":
        assert (recipe.method.r, recipe.method.alpha) == (16, 32)


def test_recommendations_respect_explicit_warmup_steps(tmp_path: Path) -> None:
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": "x.jsonl"},
        "method": {"name": "lora"},
        "training": {"warmup_steps": 5},
    }
    recipe = parse_recipe(apply_recommendations(raw, recommend(SIZES[0], "lora")))
    assert recipe.training.warmup_steps == 5 and recipe.training.warmup_ratio is None


def test_count_params_without_loading_weights(tmp_path: Path) -> None:
    from tunelab.models.gguf_write import write_llama_gguf
    from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny_model

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(tokenizer)
    expected = sum(p.numel() for p in model.parameters())
    assert count_params("tiny:llama") == expected
    assert count_params(str(save_tiny_model(tmp_path / "hf"))) == expected  # config only, meta device
    assert count_params(str(write_llama_gguf(model, tokenizer, tmp_path / "tiny.gguf"))) == expected


def test_recommend_command_prints_a_table() -> None:
    app = typer.Typer()
    app.command("recommend")(recommend_cmd)
    result = CliRunner().invoke(app, ["--model", "tiny:llama", "--method", "lora"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "training.learning_rate" in result.output and "QLoRA" in result.output
    as_set = CliRunner().invoke(app, ["--model", "tiny:llama", "--method", "full", "--set-args"])
    assert "--set training.learning_rate=" in as_set.output
    bad = CliRunner().invoke(app, ["--model", "tiny:llama", "--method", "mystery"])
    assert bad.exit_code == 2
