"""Packing: the same loss as unpacked, examples never see each other, refusal where they would."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.packing import PackingUnsupported, collate_packed, pack_features, packing_isolates
from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer
from tunelab.objectives.sft import SftConfig, SftObjective


class _Data:
    max_length = 256


def _features(tok, completion_only=True):
    objective = SftObjective(SftConfig(completion_only=completion_only), tok, _Data)
    rows = [
        ("Say hi", "hi there"),
        ("Count to three please", "one two three"),
        ("Name a colour", "blue"),
        ("What is two plus two", "four"),
        ("Name an animal", "a big cat"),
    ]
    examples = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in rows
    ]
    return objective, [objective.encode(i, e) for i, e in enumerate(examples)]


@pytest.mark.parametrize("completion_only", [True, False])
def test_packed_loss_equals_unpacked_loss(completion_only):
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, seed=5).eval()
    objective, features = _features(tok, completion_only)
    unpacked = objective.loss(model, objective.collate(features))
    packs = pack_features(features, max_length=48)
    assert 1 < len(packs) < len(features)  # something was really packed
    packed = objective.loss(model, collate_packed(packs, tok.pad_token_id))
    assert int(packed.n_units) == int(unpacked.n_units)
    assert float(packed.loss_sum) == pytest.approx(float(unpacked.loss_sum), rel=1e-4)


def test_packs_respect_max_length_and_keep_every_token():
    tok = build_tiny_tokenizer()
    _, features = _features(tok)
    packs = pack_features(features, max_length=48)
    assert all(len(p["input_ids"]) <= 48 for p in packs)
    assert sum(len(p["input_ids"]) for p in packs) == sum(len(f["input_ids"]) for f in features)
    starts = [i for p in packs for i, pos in enumerate(p["position_ids"]) if pos == 0]
    assert len(starts) == len(features)


def test_isolation_probe_detects_leaking_attention():
    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, seed=6)
    assert packing_isolates(model, len(tok))

    class Leaky(torch.nn.Module):
        """Mixes every position with the sequence mean: the leak a non-packing-aware model has."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, position_ids, use_cache=False):
            out = self.inner(input_ids=input_ids, position_ids=position_ids)
            out.logits = out.logits + out.logits.mean(dim=1, keepdim=True)
            return out

    assert not packing_isolates(Leaky(model), len(tok))


def test_training_with_packing_is_refused_when_examples_would_mix(tiny_recipe, monkeypatch):
    from tunelab.train import loop
    from tunelab.train.run import train

    monkeypatch.setattr(loop, "packing_isolates", lambda model, vocab: False)
    with pytest.raises(PackingUnsupported, match="data.packing"):
        train(tiny_recipe("lora", data__packing="true"))


def test_training_with_packing_runs_fewer_sequences_with_the_same_loss(tiny_recipe):
    """Six 19-23-token examples fill three packs of at most 64 tokens (first fit: 19+21+21, 23+22,
    23): one micro-batch of 3 → one step (unpacked at batch 3: two). Packed or not, that step sees
    the same tokens with the same starting weights, so its loss is the same."""
    from io import StringIO

    from tunelab.console import make_console
    from tunelab.train.run import train

    log = StringIO()
    packed = train(
        tiny_recipe("lora", data__packing="true", training__max_steps="null", training__epochs=1),
        console=make_console(file=log),
    )
    assert "packing: 6 examples in 3 sequences of at most 64 tokens" in log.getvalue()
    assert packed.steps == 1
    unpacked = train(
        tiny_recipe(
            "lora",
            training__max_steps="null",
            training__epochs=1,
            training__batch_size=6,
            output__name="unpacked",
        )
    )
    assert unpacked.steps == 1  # all six examples in one step, as the packed run had them
    assert packed.losses[0] == pytest.approx(unpacked.losses[0], rel=1e-4)
