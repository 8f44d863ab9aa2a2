"""Real-model sweep (slow): a small learning-rate sweep of LoRA on SmolLM2-135M with review sentiment.

Skipped when the embedded model or reviews have not been fetched (`tunelab assets fetch`).
"""

from __future__ import annotations

import json

import pytest
from rich.console import Console

pytestmark = pytest.mark.slow


def test_learning_rate_sweep_on_smollm2_picks_the_lowest_held_out_loss(review_files, tmp_path):
    from tunelab.recipe import load_recipe, parse_recipe
    from tunelab.sweep.run import SweepSettings, run_sweep
    from tunelab.sweep.space import parse_space

    recipe = parse_recipe(
        {
            "model": {"name_or_path": "asset:smollm2-135m-instruct"},
            "data": {
                "train": str(review_files.train_path),
                "eval": str(review_files.eval_path),
                "max_length": 256,
            },
            "method": {"name": "lora", "r": 8, "alpha": 16},
            "training": {"max_steps": 6, "batch_size": 8, "eval_every": 3, "warmup_steps": 0},
            "eval": {"batch_size": 16},
            "output": {"dir": str(tmp_path), "name": "reviews"},
        }
    )
    # 1e-5 barely moves an adapter in 6 steps; 1e-3 is the short-job LoRA rate that learns the task
    space = parse_space({"training.learning_rate": [1e-5, 1e-3]})
    settings = SweepSettings(trials=2, sampler="grid", pruner="none")
    result = run_sweep(recipe, space, settings, console=Console(stderr=True))

    rows = result.report.rows
    assert [r["state"] for r in rows] == ["complete", "complete"]
    best = result.report.best
    assert best["eval_loss"] == min(r["eval_loss"] for r in rows)
    assert best["params"]["training.learning_rate"] == 1e-3
    for r in rows:
        manifest = json.loads((result.sweep_dir / f"trial-{r['trial']:03d}" / "manifest.json").read_text())
        assert manifest["final_eval"]["eval_loss"] == pytest.approx(r["eval_loss"])
    best_recipe = load_recipe(result.sweep_dir / "best_recipe.yaml")
    assert best_recipe.training.learning_rate == 1e-3 and best_recipe.output.name == "reviews-sweep-best"
    print("  ".join(f"lr {r['params']['training.learning_rate']:g}: {r['eval_loss']:.4f}" for r in rows))
