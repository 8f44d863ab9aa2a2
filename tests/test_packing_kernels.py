"""Packing through each attention kernel: packed loss and gradients equal the unpacked (padded)
ones, no token attends across examples, and ``model.attention`` / ``data.packing`` resolve and
refuse as documented (docs/training.md, "The fast path").

Tolerances: fp32 throughout. The packed and padded batches run the same maths in another order
(other matmul shapes, other softmax widths), so sums agree to float rounding: loss sums within
``rel=1e-5``, every gradient within ``atol=1e-6`` plus ``rtol=1e-4``. Isolation is tighter: a
neighbour's logits may move by at most ``1e-5`` when another example's tokens change.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data.packing import collate_packed, pack_features, packing_in_effect, packing_isolates
from tunelab.data.templates import IGNORE_INDEX
from tunelab.models import varlen
from tunelab.models.attention import AttentionUnavailable, Machine, ModelAttention, decide_attention
from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer
from tunelab.objectives.sft import SftConfig, SftObjective
from tunelab.recipe import parse_recipe

LOSS_REL = 1e-5
GRAD_ATOL, GRAD_RTOL = 1e-6, 1e-4
ISOLATION_ATOL = 1e-5
ROWS = [
    ("Say hi", "hi there"),
    ("Count to three please", "one two three"),
    ("Name a colour", "blue"),
    ("What is two plus two", "four"),
    ("Name an animal", "a big cat"),
]


class _Data:
    max_length = 256


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _objective_and_features(tok):
    objective = SftObjective(SftConfig(), tok, _Data)
    examples = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in ROWS
    ]
    return objective, [objective.encode(i, e) for i, e in enumerate(examples)]


def _model(tok, attention: str):
    model = build_tiny_llama(tok, seed=11)
    model.set_attn_implementation(attention)
    return model


def _loss_and_grads(model, objective, batch):
    model.zero_grad(set_to_none=True)
    out = objective.loss(model, batch)
    out.loss_sum.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(out.loss_sum), int(out.n_units), grads


def _assert_same_loss_and_grads(packed, unpacked):
    assert packed[1] == unpacked[1]  # the same tokens carry loss
    assert packed[0] == pytest.approx(unpacked[0], rel=LOSS_REL)
    assert packed[2].keys() == unpacked[2].keys() and packed[2]
    for name, grad in unpacked[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=GRAD_ATOL, rtol=GRAD_RTOL, msg=name)


@pytest.mark.parametrize("flat", [False, True], ids=["rows", "flat"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_every_gradient_equal_unpacked(tok, attention, flat):
    """Rows: packs right-padded side by side (sdpa/eager today). Flat: one padding-free row, the
    layout the varlen kernels get; sdpa and eager isolate it too, which proves the layout on CPU."""
    model = _model(tok, attention).train()
    objective, features = _objective_and_features(tok)
    unpacked = _loss_and_grads(model, objective, objective.collate(features))
    packs = pack_features(features, max_length=48)
    assert 1 < len(packs) < len(features)  # something was really packed
    packed = _loss_and_grads(model, objective, collate_packed(packs, tok.pad_token_id, flat=flat))
    _assert_same_loss_and_grads(packed, unpacked)


def _probe_batch(tok, flat: bool):
    """Three examples in the first pack; the second one is the one that changes."""
    _, features = _objective_and_features(tok)
    packs = pack_features(features, max_length=64)
    assert len(packs) > 1 and packs[0]["position_ids"].count(0) >= 3  # rows: the second row is padded
    batch = collate_packed(packs, tok.pad_token_id, flat=flat)
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    victim = slice(starts[1], starts[2])
    altered = batch["input_ids"].clone()
    generator = torch.Generator().manual_seed(3)
    altered[0, victim] = torch.randint(4, len(tok) - 1, (victim.stop - victim.start,), generator=generator)
    return batch, altered, victim


@torch.no_grad()
def _neighbour_shift(model, tok, flat: bool) -> tuple[float, float]:
    """How far every other token's logits move when one packed example's tokens change (and how
    far the changed example's own logits move, so the probe is known to have power)."""
    batch, altered, victim = _probe_batch(tok, flat)
    device = next(model.parameters()).device
    positions = batch["position_ids"].to(device)
    before = model(input_ids=batch["input_ids"].to(device), position_ids=positions, use_cache=False).logits
    after = model(input_ids=altered.to(device), position_ids=positions, use_cache=False).logits
    moved = (before - after).abs().float()
    own = float(moved[0, victim].max())
    moved[0, victim] = 0
    return float(moved.max()), own


@pytest.mark.parametrize("flat", [False, True], ids=["rows", "flat"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_changing_one_packed_example_leaves_its_neighbours_logits(tok, attention, flat):
    neighbours, own = _neighbour_shift(_model(tok, attention).eval(), tok, flat)
    assert own > 1e-2
    assert neighbours <= ISOLATION_ATOL


def test_the_probe_catches_attention_that_leaks(tok, monkeypatch):
    """Eager attention with the document mask removed (transformers no longer sees the position
    restarts) lets later examples attend to earlier ones: both probes must say so."""
    import transformers.masking_utils as masking

    model = _model(tok, "eager").eval()
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    neighbours, _ = _neighbour_shift(model, tok, flat=True)
    assert neighbours > 1e-3
    assert not packing_isolates(model, len(tok))


def test_first_label_of_every_packed_example_is_not_trained(tok):
    """In a packed row the first token of an example would be predicted from the previous
    example's last token, which the unpacked loss never does."""
    objective, features = _objective_and_features(tok)
    packs = pack_features(features, max_length=64)
    for flat in (False, True):
        batch = collate_packed(packs, tok.pad_token_id, flat=flat)
        starts = batch["position_ids"] == 0
        assert int(starts.sum()) >= len(features)  # the rows layout adds a pad "example" per row
        assert bool((batch["labels"][starts] == IGNORE_INDEX).all())
        assert objective.units(batch) == objective.units(objective.collate(features))


def test_flat_collation_is_one_row_without_padding(tok):
    _, features = _objective_and_features(tok)
    packs = pack_features(features, max_length=48)
    flat = collate_packed(packs, tok.pad_token_id, flat=True)
    total = sum(len(f["input_ids"]) for f in features)
    assert flat["input_ids"].shape == (1, total) and int(flat["attention_mask"].sum()) == total
    assert flat["input_ids"][0].tolist() == [t for f in features for t in f["input_ids"]]


# --- resolution and refusals -------------------------------------------------------------------


def _recipe(**overrides):
    raw = {"model": {"name_or_path": "tiny:llama"}, "data": {"train": "x"}, "method": {"name": "lora"}}
    return parse_recipe(raw, overrides=[f"{k}={v}" for k, v in overrides.items()])


CUDA = Machine(
    "cuda", flash_attn=False, varlen_kernel="torch 2.8 has no torch.nn.attention.varlen", flex=True
)
"""A CUDA machine without flash-attn or PyTorch's varlen kernel (tests/test_attention_families.py
covers the machine that has the kernel)."""


def _path(recipe, machine=CUDA):
    fast = recipe.fast_path(machine.device_type, machine=machine)
    return fast.attention, fast.packing


def test_auto_keeps_todays_path_on_cpu():
    recipe = _recipe()
    assert recipe.model.attention == "auto" and recipe.data.packing == "auto"
    assert _path(recipe, Machine("cpu")) == (None, False)  # the model's default attention, unpacked
    assert _path(_recipe(**{"data.packing": "true"}), Machine("cpu")) == (None, True)
    assert _path(recipe, Machine.probe("cpu")) == (None, False)  # the probe of this machine agrees


def test_auto_on_cuda_picks_a_varlen_kernel_and_packs():
    assert _path(_recipe()) == ("flex_attention", True)
    assert _path(_recipe(**{"data.packing": "false"})) == (None, False)  # the model's default (sdpa)
    dpo = _recipe(**{"objective.name": "dpo"})  # pairs: never packed, so no reason for flex
    assert _path(dpo) == (None, False)
    flash = Machine("cuda", flash_attn=True, varlen_kernel=None)
    assert _path(_recipe(), flash) == ("flash_attention_2", True)
    assert _path(dpo, flash) == ("flash_attention_2", False)
    assert _path(_recipe(**{"model.dtype": "float32"}), flash) == ("flex_attention", True)  # flash: half only


def test_packing_auto_needs_a_varlen_kernel_and_a_token_objective():
    assert packing_in_effect("auto", True, "flex_attention")
    assert packing_in_effect("auto", True, "flash_attention_2")
    assert not packing_in_effect("auto", True, "sdpa")
    assert not packing_in_effect("auto", True, None)
    assert not packing_in_effect("auto", False, "flex_attention")
    assert packing_in_effect(True, True, "sdpa") and not packing_in_effect(False, True, "flex_attention")


@pytest.mark.parametrize(
    ("choice", "device", "reason"),
    [
        ("flash_attention_2", "cuda", "needs the flash-attn package"),
        ("flex_attention", "cpu", "has no backward pass on cpu"),
    ],
)
def test_a_kernel_that_cannot_train_here_is_refused(choice, device, reason):
    with pytest.raises(AttentionUnavailable, match=f"model.attention: {choice} {reason}"):
        decide_attention(choice, Machine(device), ModelAttention(), packing=True)


def test_flash_attention_off_cuda_and_flex_on_an_old_torch_are_refused():
    with pytest.raises(AttentionUnavailable, match="runs on CUDA GPUs only"):
        decide_attention("flash_attention_2", Machine("cpu", flash_attn=True), ModelAttention(), packing=True)
    old = Machine("cuda", flash_attn=True, flex=False)
    with pytest.raises(AttentionUnavailable, match="needs torch >= 2.5"):
        decide_attention("flex_attention", old, ModelAttention(), packing=True)
    assert decide_attention("auto", old, ModelAttention(), packing=True).name == "flash_attention_2"


def test_the_cli_refuses_an_attention_it_cannot_run_in_one_line(tmp_path, qa_rows):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    recipe = {
        "model": {"name_or_path": "tiny:llama", "attention": "flex_attention"},
        "data": {"train": str(data), "max_length": 64},
        "method": {"name": "lora"},
        "training": {"max_steps": 1, "batch_size": 2},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if "model.attention" in line]
    assert error == [error[0]] and error[0].startswith(
        "error: model.attention: flex_attention has no backward"
    )
    assert "Traceback" not in result.output


def test_the_run_says_what_is_in_effect_and_a_flat_packed_step_has_the_unpacked_loss(
    tiny_recipe, monkeypatch
):
    """The trainer's flat layout end to end: on CPU no varlen kernel runs, so the flat layout is
    forced for sdpa (which isolates a flat row too, tested above). Six examples make three packs of
    at most 64 tokens, one micro-batch of 3 (one flat row); unpacked at batch 6 that step sees the
    same tokens with the same weights, so its loss is the same."""
    from io import StringIO

    from tunelab.console import make_console
    from tunelab.train import loop
    from tunelab.train.run import train

    monkeypatch.setattr(loop, "VARLEN_ATTENTION", frozenset({None}))
    log = StringIO()
    packed = train(
        tiny_recipe("lora", data__packing="true", training__max_steps="null", training__epochs=1),
        console=make_console(file=log),
    )
    assert "attention: sdpa (model.attention: auto); packing: on (data.packing: true)" in log.getvalue()
    assert (
        "6 examples in 3 sequences of at most 64 tokens, each micro-batch one padding-free row"
        in log.getvalue()
    )
    manifest = json.loads((packed.run_dir / "manifest.json").read_text())
    assert manifest["attention"] == "sdpa" and manifest["packing"] is True
    unpacked = train(
        tiny_recipe(
            "lora", training__max_steps="null", training__epochs=1, training__batch_size=6, output__name="u"
        )
    )
    assert packed.steps == unpacked.steps == 1
    assert packed.losses[0] == pytest.approx(unpacked.losses[0], rel=1e-4)


# --- the plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "mask"),
    [
        ({"data.packing": "false", "model.attention": "sdpa"}, True),  # padded batches
        ({"data.packing": "true", "model.attention": "sdpa"}, True),  # block-diagonal mask
        ({"model.attention": "flex_attention"}, False),  # auto packs, a BlockMask
        ({"model.attention": "flash_attention_2"}, False),  # cu_seqlens, no mask at all
    ],
)
def test_the_plan_counts_a_dense_mask_only_without_a_varlen_kernel(overrides, mask):
    from tunelab.plan.gpus import GPUS
    from tunelab.plan.memory import layer_bytes_per_token, plan_inputs

    inputs = plan_inputs(_recipe(**overrides), GPUS["h100-80gb"])
    terms = layer_bytes_per_token(inputs.facts, inputs.regime)
    assert ("attention mask" in terms) is mask
    assert any(note.startswith("attention: ") for note in inputs.notes)


# --- FlexAttention ------------------------------------------------------------------------------


@pytest.fixture
def flex_uncompiled(monkeypatch):
    """transformers runs flex_attention through torch.compile; on CPU inductor takes ~30 s a shape
    and (torch 2.13) failed to build the kernel for a second shape, so these CPU tests use torch's
    uncompiled flex_attention: the same BlockMask document mask, computed by its reference path."""
    import transformers.integrations.flex_attention as flex
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(flex.WrappedFlexAttention, "__call__", lambda self: flex_attention)


@pytest.mark.slow
def test_flex_attention_packed_loss_equals_unpacked_and_isolates(tok, flex_uncompiled):
    """FlexAttention has no backward on CPU: loss and isolation here, gradients in the CUDA test."""
    model = _model(tok, "flex_attention").eval()
    objective, features = _objective_and_features(tok)
    with torch.no_grad():
        unpacked = objective.loss(model, objective.collate(features))
        packed = objective.loss(
            model, collate_packed(pack_features(features, 64), tok.pad_token_id, flat=True)
        )
    assert int(packed.n_units) == int(unpacked.n_units)
    assert float(packed.loss_sum) == pytest.approx(float(unpacked.loss_sum), rel=LOSS_REL)
    neighbours, own = _neighbour_shift(model, tok, flat=True)
    assert own > 1e-2 and neighbours <= ISOLATION_ATOL


@pytest.mark.gpu
@pytest.mark.parametrize("attention", ["flex_attention", "flash_attention_2", "tunelab_varlen"])
def test_varlen_kernels_on_cuda_give_the_unpacked_loss_and_gradients(tok, attention, monkeypatch):
    """The gradients CPU cannot check. Flex in fp32 (TF32 off) against sdpa on padded batches, with
    a GPU-reduction tolerance (loss rel 1e-4, gradients atol 1e-5 + rtol 1e-3); flash-attn and
    PyTorch's varlen kernel compute in half precision only, so they are compared in bf16 with a
    bf16 tolerance (2e-2 / 5e-2)."""
    if attention == "flash_attention_2" and not Machine.probe("cuda").flash_attn:
        pytest.skip("flash-attn is not installed")
    if attention == "tunelab_varlen":
        varlen.register()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    half = attention in ("flash_attention_2", "tunelab_varlen")
    model = build_tiny_llama(tok, seed=11).to("cuda", torch.bfloat16 if half else torch.float32).train()
    objective, features = _objective_and_features(tok)
    model.set_attn_implementation("sdpa")
    unpacked = _loss_and_grads(model, objective, _to_cuda(objective.collate(features)))
    model.set_attn_implementation(attention)
    packs = pack_features(features, max_length=48)
    packed = _loss_and_grads(model, objective, _to_cuda(collate_packed(packs, tok.pad_token_id, flat=True)))
    loss_rel, atol, rtol = (2e-2, 2e-2, 5e-2) if half else (1e-4, 1e-5, 1e-3)
    assert packed[1] == unpacked[1]
    assert packed[0] == pytest.approx(unpacked[0], rel=loss_rel)
    for name, grad in unpacked[2].items():
        torch.testing.assert_close(packed[2][name], grad, atol=atol, rtol=rtol, msg=name)
    neighbours, own = _neighbour_shift(model, tok, flat=True)
    assert own > 1e-2 and neighbours <= (1e-2 if half else ISOLATION_ATOL)


def _to_cuda(batch):
    return {k: v.to("cuda") for k, v in batch.items()}
