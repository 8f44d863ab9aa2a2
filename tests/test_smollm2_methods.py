"""Real-model check (slow): short jobs on SmolLM2-135M with several methods lower the held-out loss.

Skipped when the embedded model has not been fetched (`tunelab assets fetch`).
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

# short-job learning rates per method: adapters with few parameters need larger steps
METHOD_LR = {"lora": 1e-3, "dora": 1e-3, "ia3": 1e-2, "prompt_tuning": 3e-2, "freeze": 1e-4}


@pytest.mark.parametrize("method", sorted(METHOD_LR))
def test_short_job_lowers_held_out_loss(review_files, tmp_path, method):
    from tunelab.recipe import parse_recipe
    from tunelab.runs.rundir import RunDir
    from tunelab.train.loop import Trainer

    recipe = parse_recipe(
        {
            "model": {"name_or_path": "asset:smollm2-135m-instruct"},
            "data": {
                "train": str(review_files.train_path),
                "eval": str(review_files.eval_path),
                "max_length": 256,
            },
            "method": {"name": method},
            "training": {
                "max_steps": 6,
                "batch_size": 8,
                "learning_rate": METHOD_LR[method],
                "warmup_steps": 0,
            },
            "eval": {"batch_size": 16},
            "output": {"dir": str(tmp_path), "name": method},
        }
    )
    run = RunDir.create(recipe.output.dir, method)
    run.write_recipe(recipe.resolved())
    trainer = Trainer(recipe, run)
    before = trainer.maybe_evaluate(final=True)["eval_loss"]
    trainer.last_eval = None
    trainer.fit()
    after = trainer.maybe_evaluate(final=True)["eval_loss"]
    (tmp_path / "result.json").write_text(json.dumps({"method": method, "before": before, "after": after}))
    print(f"{method}: held-out answer loss {before:.4f} -> {after:.4f}")
    assert after < before
