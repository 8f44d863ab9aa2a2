"""Real-model check (slow): the embedded all-MiniLM-L6-v2 encoder learns review sentiment with the
`classify` objective (a new two-label head) on the embedded Rotten Tomatoes reviews, on a CPU."""

from __future__ import annotations

import json

import pytest

from tunelab.assets import AssetMissingError, asset_path

pytestmark = pytest.mark.slow


def test_minilm_classifies_reviews_well_above_chance(tmp_path):
    try:
        encoder = asset_path("all-minilm-l6-v2")
        reviews_path = asset_path("rotten-tomatoes")
    except AssetMissingError:
        pytest.skip("run `tunelab assets fetch` first")
    from tunelab.demo import read_reviews, stratified_split
    from tunelab.recipe import parse_recipe
    from tunelab.train.run import train

    reviews, _ = read_reviews(reviews_path)
    train_rows, held = stratified_split(reviews, n_eval=200, n_train=800, seed=0)
    for name, rows in (("train", train_rows), ("eval", held)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = parse_recipe(
        {
            "model": {"name_or_path": str(encoder)},
            "data": {
                "train": str(tmp_path / "train.jsonl"),
                "eval": str(tmp_path / "eval.jsonl"),
                "max_length": 96,
            },
            "method": {"name": "full"},
            "objective": {"name": "classify"},
            "training": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-4, "warmup_ratio": 0.1},
            "eval": {"batch_size": 64},
            "output": {"dir": str(tmp_path / "runs"), "name": "minilm"},
        }
    )
    result = train(recipe)
    assert result.final_eval["eval_accuracy"] > 0.7, result.final_eval
