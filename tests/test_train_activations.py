"""Activation memory (train/activations.py): checkpointing one decoder layer in k and offloading the
checkpointed layers' inputs give the plain path's loss and gradients; exactly the chosen layers are
recomputed; the offload moves exactly the bytes the plan puts in host memory; refusals are one line."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from tunelab.methods import METHODS
from tunelab.plan.memory import Regime, checkpointed_layers, model_facts, offloaded_bytes
from tunelab.recipe import RecipeError
from tunelab.train.activations import ActivationCheckpointingUnsupported, setup_activation_memory
from tunelab.train.run import train

LAYERS, BATCH, SEQ = 6, 2, 24
GRAD_TOLERANCE = 1e-6  # fp32; on CPU the recompute runs the same kernels, so it is exact in practice


def model(method: str = "full") -> nn.Module:
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    spec = METHODS.get(method)
    # dropout on: the checkpoint must replay the same random mask in the recompute
    config = spec.config_cls(name=method, **({"dropout": 0.1} if method == "lora" else {}))
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the same base and adapter weights for every variant
        prepared = spec.impl.apply(LlamaForCausalLM(cfg), config, weight_decay=0.0).model
    prepared.train()
    return prepared


def batch() -> torch.Tensor:
    return torch.randint(0, 300, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def loss_and_grads(net: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = batch()
    torch.manual_seed(2)  # the same dropout masks for every variant
    loss = net(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize(("every", "offload"), [(1, False), (2, False), (3, False), (1, True), (2, True)])
def test_loss_and_gradients_equal_the_plain_path(method: str, every: int, offload: bool) -> None:
    plain_loss, plain_grads = loss_and_grads(model(method))
    net = model(method)
    plan = setup_activation_memory(net, checkpointing=True, every=every, offload=offload, device="cpu")
    assert plan.checkpointed  # the switch is on, so the comparison compares something
    loss, grads = loss_and_grads(net)
    assert torch.equal(loss, plain_loss)
    assert grads.keys() == plain_grads.keys()
    worst = max((grads[n] - plain_grads[n]).abs().max().item() for n in grads)
    assert worst <= GRAD_TOLERANCE, worst
    if offload:
        assert plan.offloader is not None and plan.offloader.packed_tensors == len(plan.checkpointed)


def recomputed_layers(net: nn.Module) -> list[int]:
    """Decoder layers whose attention runs during backward (the checkpoint's recompute)."""
    in_backward: list[int] = []
    phase = {"backward": False}
    layers = net.get_base_model().model.layers if hasattr(net, "get_base_model") else net.model.layers
    for index, layer in enumerate(layers):
        layer.self_attn.register_forward_pre_hook(
            lambda _m, _a, index=index: in_backward.append(index) if phase["backward"] else None
        )
    ids = batch()
    loss = net(input_ids=ids, labels=ids, use_cache=False).loss
    phase["backward"] = True
    loss.backward()
    return sorted(in_backward)


@pytest.mark.parametrize(
    ("every", "expected"), [(1, [0, 1, 2, 3, 4, 5]), (2, [0, 2, 4]), (3, [0, 3]), (4, [0, 4])]
)
def test_only_the_chosen_layers_are_checkpointed(every: int, expected: list[int]) -> None:
    net = model("lora")
    plan = setup_activation_memory(net, checkpointing=True, every=every, offload=False, device="cpu")
    assert plan.checkpointed == expected
    assert recomputed_layers(net) == expected
    assert checkpointed_layers(
        LAYERS, Regime("cpu", 4, False, "adamw", True, True, SEQ, 1, checkpoint_every=every)
    ) == len(expected)


def test_without_checkpointing_nothing_is_recomputed() -> None:
    net = model("lora")
    plan = setup_activation_memory(net, checkpointing=False, every=None, offload=False, device="cpu")
    assert plan.checkpointed == [] and plan.describe() == "activation checkpointing: off"
    assert recomputed_layers(net) == []


@pytest.mark.parametrize("every", [1, 2, 4])
def test_offload_moves_exactly_the_bytes_the_plan_puts_in_host_memory(every: int) -> None:
    """The offload hooks see each checkpointed layer's input once and nothing else; the plan's host
    bytes are the same count."""
    net = model("full")
    plan = setup_activation_memory(net, checkpointing=True, every=every, offload=True, device="cpu")
    ids = batch()
    net(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    regime = Regime("cuda", 4, False, "adamw", True, True, SEQ, 1, checkpoint_every=every, offload=True)
    facts = model_facts(net, net.config)
    assert plan.offloader.packed_tensors == len(plan.checkpointed)
    assert (
        plan.offloader.packed_bytes
        == offloaded_bytes(facts, regime, BATCH)
        == len(plan.checkpointed) * BATCH * SEQ * 64 * 4
    )


def test_offload_hooks_are_popped_when_a_layer_raises() -> None:
    net = model("full")
    plan = setup_activation_memory(net, checkpointing=True, every=1, offload=True, device="cpu")

    def explode(*_: object) -> None:
        raise RuntimeError("boom")

    handle = net.model.layers[0].self_attn.register_forward_pre_hook(explode)
    with pytest.raises(RuntimeError, match="boom"):
        net(input_ids=batch(), use_cache=False)
    handle.remove()
    before = plan.offloader.packed_tensors
    x = torch.ones(3, requires_grad=True)
    (x * x).sum().backward()  # would pass through the offload hooks if they were still pushed
    assert plan.offloader.packed_tensors == before


def test_a_model_without_decoder_layers_is_refused() -> None:
    with pytest.raises(ActivationCheckpointingUnsupported, match=r"training\.checkpoint_every: Linear"):
        setup_activation_memory(nn.Linear(2, 2), checkpointing=True, every=2, offload=False, device="cpu")
    with pytest.raises(ActivationCheckpointingUnsupported, match=r"training\.offload_activations"):
        setup_activation_memory(nn.Linear(2, 2), checkpointing=True, every=None, offload=True, device="cpu")


def test_describe_says_what_is_in_effect() -> None:
    plan = setup_activation_memory(model("lora"), checkpointing=True, every=2, offload=True, device="cuda:0")
    assert plan.describe() == (
        "activation checkpointing: one decoder layer in 2 (3 of 6: layers 0, 2, 4); "
        "their inputs offloaded to host memory (pinned)"
    )
    assert plan.manifest() == {
        "checkpointed_layers": [0, 2, 4],
        "decoder_layers": 6,
        "checkpoint_every": 2,
        "offload_activations": True,
    }
    on_cpu = setup_activation_memory(
        model("lora"), checkpointing=True, every=None, offload=True, device="cpu"
    )
    assert on_cpu.describe().endswith(
        "offload: nothing to move on the CPU (activations already live in host memory)"
    )
    assert on_cpu.manifest()["offload_activations"] is False


# ---------------------------------------------------------------- the recipe and a whole run


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"training__checkpoint_every": 2},
            "checkpoint_every: 2 changes what gradient checkpointing keeps, but gradient_checkpointing is "
            "false; set training.gradient_checkpointing: true",
        ),
        ({"training__offload_activations": "true"}, "set training.gradient_checkpointing: true"),
        (
            {"training__gradient_checkpointing": "true", "training__checkpoint_every": 0},
            "greater than or equal to 1",
        ),
        (
            {
                "training__gradient_checkpointing": "true",
                "training__checkpoint_every": 2,
                "objective__name": "grpo",
                "objective__reward": "length",
            },
            "training.checkpoint_every: objective grpo runs its own rollout loop, which does not checkpoint "
            "activations; remove training.checkpoint_every",
        ),
    ],
)
def test_recipe_refuses_settings_that_cannot_apply(tiny_recipe, overrides: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        tiny_recipe("lora", **overrides)
    assert message in str(err.value)


def test_cli_refusal_is_one_line_with_exit_2(tiny_recipe, tmp_path) -> None:
    from tunelab.cli import app
    from tunelab.recipe import dump_yaml

    path = tmp_path / "r.yaml"
    path.write_text(dump_yaml(tiny_recipe("lora")), encoding="utf-8")
    result = CliRunner().invoke(app, ["train", str(path), "--set", "training.checkpoint_every=2"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "set training.gradient_checkpointing: true" in lines[0], result.output
    assert "Traceback" not in result.output


def test_a_run_says_and_records_what_is_in_effect(tiny_recipe, capsys) -> None:
    """tiny:llama has two decoder layers: one in two is layer 0; on the CPU offload moves nothing."""
    recipe = tiny_recipe(
        "lora",
        training__max_steps=2,
        training__gradient_checkpointing="true",
        training__checkpoint_every=2,
        training__offload_activations="true",
    )
    result = train(recipe)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["activation_memory"] == {
        "checkpointed_layers": [0],
        "decoder_layers": 2,
        "checkpoint_every": 2,
        "offload_activations": False,
    }
    err = capsys.readouterr().err
    assert "activation checkpointing: one decoder layer in 2 (1 of 2: layers 0)" in err
    assert all(loss == loss for loss in result.losses)  # finite: the run trained


@pytest.mark.gpu
def test_on_cuda_offload_frees_the_planned_host_bytes_and_keeps_the_gradients() -> None:
    """Pinned offload on a GPU: the step's peak falls by about the bytes the plan moves to host
    memory (the inputs of every checkpointed layer), and loss and gradients are unchanged."""
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    )
    ids = torch.randint(0, 512, (4, 1024), generator=torch.Generator().manual_seed(1)).cuda()

    def step(offload: bool) -> tuple[int, int, torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        net = LlamaForCausalLM(cfg).cuda().train()
        plan = setup_activation_memory(net, checkpointing=True, every=2, offload=offload, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.detach().cpu() for n, p in net.named_parameters()}
        moved = plan.offloader.packed_bytes if plan.offloader else 0
        return torch.cuda.max_memory_allocated() - base, moved, loss.detach().cpu(), grads

    kept, _, plain_loss, plain_grads = step(False)
    peak, moved, loss, grads = step(True)
    regime = Regime("cuda", 4, False, "adamw", True, False, 1024, 1, checkpoint_every=2, offload=True)
    planned = offloaded_bytes(model_facts(LlamaForCausalLM(cfg).to("meta"), cfg), regime, 4)
    assert moved == planned
    assert 0.7 * planned <= kept - peak <= 1.15 * planned, (kept, peak, planned)
    assert torch.equal(loss, plain_loss)
    for name, grad in grads.items():
        # same kernels in both runs; the tolerance only absorbs atomics in CUDA attention backward
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-3, atol=1e-5)
