"""The contract every registered method passes, in one table: registering a method adds its row.

For each method on the tiny model: a short run changes exactly the trainable parameters (all of
them) and nothing else; the trainable count is reported; save → reload gives identical logits;
where PEFT can merge, merged logits equal adapter logits; an adapter on disk is small.
"""

from __future__ import annotations

import json

import pytest
import torch

from tunelab.evaluate.run import load_for_eval
from tunelab.methods import METHODS
from tunelab.runs.rundir import RunDir
from tunelab.train.loop import Trainer

IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 300, 12]])


def _train(tiny_recipe, name: str):
    recipe = tiny_recipe(name, training__max_steps=3, training__learning_rate=5e-3, output__name=f"c-{name}")
    run = RunDir.create(recipe.output.dir, recipe.output.name)
    run.write_recipe(recipe.resolved())
    trainer = Trainer(recipe, run)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    trainer.fit()
    trainer.save_final()
    return trainer, model, before, trainable, run


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(tiny_recipe, name):
    trainer, model, before, trainable, run = _train(tiny_recipe, name)
    after = dict(model.named_parameters())

    changed = {n for n in after if not torch.equal(before[n], after[n].detach())}
    assert trainable and changed == trainable, (
        f"{name}: trainable but unchanged {sorted(trainable - changed)[:5]}, "
        f"changed but frozen {sorted(changed - trainable)[:5]}"
    )
    assert trainer.trainable == sum(after[n].numel() for n in trainable)
    assert 0 < trainer.trainable <= trainer.total_params

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=IDS).logits
        loaded, _ = load_for_eval(str(run.path))
        torch.testing.assert_close(loaded.eval()(input_ids=IDS).logits, expected)

    meta = json.loads((run.final_dir / "tunelab.json").read_text())
    if meta["artifact"] != "full":
        weights = sorted(run.final_dir.glob("*.safetensors"))
        assert weights, f"{name}: no adapter weights file in final/"
        expected_bytes = sum(after[n].numel() * after[n].element_size() for n in trainable)
        # the file holds the trainable tensors (PEFT may also store a few buffers) plus a JSON header
        assert weights[0].stat().st_size < 1.5 * expected_bytes + 64_000

    if meta["artifact"] == "peft" and hasattr(loaded, "merge_and_unload"):
        try:
            merged = loaded.merge_and_unload()
        except (ValueError, NotImplementedError, AttributeError):
            return  # prompt-learning methods cannot merge; nothing to compare
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=IDS).logits, expected, atol=1e-4, rtol=1e-4)
