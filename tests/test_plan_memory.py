"""The memory plan against torch's own accounting on CPU.

Parameters, gradients and optimizer states are compared byte for byte with real tiny models after
an optimizer step. Activations are compared with the tensors autograd actually saves
(``saved_tensors_hooks``), and a whole training step's peak with a live-bytes tracker (a
``TorchDispatchMode`` that follows every storage an op creates until it is freed). The ±15%
against CUDA's ``max_memory_allocated`` needs a GPU: ``benchmarks/gpu_sft.py --plan-check``.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from tunelab.methods import METHODS
from tunelab.objectives.losses import causal_lm_loss_sum
from tunelab.plan.gpus import GPUS
from tunelab.plan.live_bytes import LiveBytes
from tunelab.plan.memory import (
    Regime,
    estimate,
    largest_micro_batch,
    layer_bytes_per_token,
    model_facts,
    optimizer_state_bytes,
    plan_for,
    plan_inputs,
    prepared_on_meta,
)
from tunelab.plan.shapes import LLAMA_SHAPES
from tunelab.train.activations import setup_activation_memory

TOLERANCE = 0.15


def config(layers: int = 2, vocab: int = 1000, hidden: int = 128, tied: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=344,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
    )


def prepared(cfg: LlamaConfig, method: str, dtype: torch.dtype = torch.float32):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(dtype)
    spec = METHODS.get(method)
    result = spec.impl.apply(model, spec.config_cls(name=method), weight_decay=0.0)
    result.model.train()
    return result


def padded_batch(batch: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, : seq // 4] = 0  # left padding, as tunelab's SFT batches have
    return ids, mask


def regime(
    compute_bytes: int, *, autocast: bool = False, checkpointing: bool = False, seq: int = 64
) -> Regime:
    return Regime("cpu", compute_bytes, autocast, "adamw", checkpointing, True, seq, 1)


def close(predicted: float, measured: float) -> bool:
    return abs(predicted - measured) <= TOLERANCE * measured


@pytest.mark.parametrize("method", ["full", "lora", "ia3"])
def test_weights_gradients_and_adamw_states_match_real_tensors_exactly(method: str) -> None:
    cfg = config(tied=True)
    facts = model_facts(
        prepared_on_meta(cfg, METHODS.get(method).config_cls(name=method), torch.float32), cfg
    )
    real = prepared(cfg, method)
    optimizer = torch.optim.AdamW(real.param_groups, lr=1e-3)
    ids, mask = padded_batch(2, 16, cfg.vocab_size)
    real.model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in real.model.parameters() if p.grad is not None)
    optimizer.step()
    states = sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for key, t in state.items()
        if key != "step"  # one scalar per tensor
    )
    weights = sum(p.numel() * p.element_size() for p in real.model.parameters())
    assert facts.weight_bytes == weights
    assert facts.trainable_bytes == grads
    assert optimizer_state_bytes(facts, "adamw") == states


def saved_bytes(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, autocast: bool) -> int:
    """Bytes of distinct storages autograd saves in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    return sum(size for ptr, size in seen.items() if ptr not in params)


@pytest.mark.parametrize(
    ("method", "dtype", "autocast"),
    [
        ("full", torch.float32, False),
        ("lora", torch.float32, False),
        ("full", torch.bfloat16, False),
        ("lora", torch.bfloat16, True),  # the GPU default: bf16 weights, bf16 autocast, fp32 adapters
    ],
)
def test_per_layer_activations_match_saved_tensor_hooks(
    method: str, dtype: torch.dtype, autocast: bool
) -> None:
    batch, seq = 2, 64
    ids, mask = padded_batch(batch, seq, 1000)
    measured = []
    for layers in (2, 3):  # the difference is one layer, whatever happens outside the layers
        model = prepared(config(layers), method, dtype).model
        measured.append(saved_bytes(model, ids, mask, autocast))
    per_token = (measured[1] - measured[0]) / (batch * seq)
    facts = model_facts(model, config(3))
    compute = 4 if dtype == torch.float32 and not autocast else 2
    predicted = sum(layer_bytes_per_token(facts, regime(compute, autocast=autocast, seq=seq)).values())
    assert close(predicted, per_token), (predicted, per_token)


def step_peak(
    method: str,
    dtype: torch.dtype,
    checkpointing: bool,
    cfg: LlamaConfig,
    batch: int,
    seq: int,
    every: int | None = None,
) -> int:
    """Peak live bytes over two training steps (the second has optimizer states), as the engine runs them."""
    result = prepared(cfg, method, dtype)
    model = result.model
    setup_activation_memory(model, checkpointing=checkpointing, every=every, offload=False, device="cpu")
    optimizer = torch.optim.AdamW(result.param_groups, lr=1e-3)
    ids, mask = padded_batch(batch, seq, cfg.vocab_size)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    tracker = LiveBytes()
    with tracker:
        for param in model.parameters():
            tracker.track(param)
        for _ in range(2):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            loss, count = causal_lm_loss_sum(logits, ids)
            del logits
            (loss / count).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return tracker.peak


@pytest.mark.parametrize(
    ("method", "dtype", "checkpointing"),
    [
        ("full", torch.float32, False),
        ("full", torch.float32, True),
        ("lora", torch.float32, False),
        ("lora", torch.float32, True),
        ("lora", torch.bfloat16, True),
    ],
)
def test_step_peak_within_15_percent_of_live_bytes(
    method: str, dtype: torch.dtype, checkpointing: bool
) -> None:
    cfg, batch, seq = config(layers=3, vocab=4000), 2, 128
    measured = step_peak(method, dtype, checkpointing, cfg, batch, seq)
    facts = model_facts(prepared(cfg, method, dtype).model, cfg)
    compute = 4 if dtype == torch.float32 else 2
    _, predicted = estimate(facts, regime(compute, checkpointing=checkpointing, seq=seq), batch)
    assert close(predicted, measured), (predicted, measured)


@pytest.mark.slow  # three live-bytes training steps per case
@pytest.mark.parametrize("every", [2, 3])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_checkpointing_one_layer_in_k_peak_within_15_percent_of_live_bytes(method: str, every: int) -> None:
    """Checkpointed layers keep their input, the others everything: the plan follows the measured
    peak as k changes (6 layers: k=2 checkpoints 3, k=3 checkpoints 2)."""
    cfg, batch, seq = config(layers=6, vocab=1000), 2, 128
    facts = model_facts(prepared(cfg, method, torch.float32).model, cfg)
    measured, predicted = [], []
    for k in (1, every, None):
        measured.append(step_peak(method, torch.float32, k is not None, cfg, batch, seq, every=k))
        ckpt = Regime("cpu", 4, False, "adamw", k is not None, True, seq, 1, checkpoint_every=k or 1)
        predicted.append(estimate(facts, ckpt, batch)[1])
    assert close(predicted[1], measured[1]), (predicted, measured)
    # fewer checkpointed layers, more memory: in the measurement and in the plan alike
    assert measured[0] < measured[1] < measured[2] and predicted[0] < predicted[1] < predicted[2]


def test_checkpointing_cuts_predicted_activations(tiny_recipe) -> None:
    plain = plan_for(plan_inputs(tiny_recipe("lora"), GPUS["a100-40gb"]), 8)
    ckpt = plan_for(
        plan_inputs(tiny_recipe("lora", training__gradient_checkpointing="true"), GPUS["a100-40gb"]), 8
    )
    saved = plain.components["activations (saved for backward)"]
    assert ckpt.components["activations (layer inputs, checkpointed)"] < saved / 5
    assert ckpt.flops_per_token > plain.flops_per_token  # the forward runs twice


def test_largest_micro_batch_is_the_boundary_of_fitting(tiny_recipe) -> None:
    inputs = plan_inputs(tiny_recipe("full", data__max_length=512), GPUS["t4-16gb"])
    capacity = 1024**3  # the CUDA context takes half of it
    best = largest_micro_batch(inputs, capacity)
    assert best >= 1
    assert plan_for(inputs, best).device_total <= capacity * 0.92 < plan_for(inputs, best + 1).device_total


def test_benchmark_shape_parameter_count_is_llama_3_2_1b() -> None:
    cfg = LlamaConfig(**LLAMA_SHAPES["1b"])
    facts = model_facts(
        prepared_on_meta(cfg, METHODS.get("full").config_cls(name="full"), torch.bfloat16), cfg
    )
    assert facts.trainable_params == 1_235_814_400  # Llama-3.2-1B's published count
    assert facts.weight_bytes == 2 * 1_235_814_400


def test_plan_command_json_and_table(tiny_recipe, tmp_path) -> None:
    from tunelab.cli import app
    from tunelab.recipe import dump_yaml

    path = tmp_path / "r.yaml"
    path.write_text(dump_yaml(tiny_recipe("lora")), encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(path), "--gpu", "rtx4090-24gb", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["device"] == "rtx4090-24gb" and plan["fits"] is True and plan["largest_micro_batch"] >= 8
    assert plan["peak_allocated_bytes"] >= sum(
        plan["components_bytes"][k] for k in ("weights", "optimizer states")
    )
    table = runner.invoke(app, ["plan", str(path), "--gpu", "a100-40gb", "--batch", "2"])
    assert "largest micro-batch that fits" in table.stdout and "micro-batch 2" in table.stdout
    bad = runner.invoke(app, ["plan", str(path), "--gpu", "h1000"])
    assert bad.exit_code == 2 and "h100-80gb" in bad.output


def test_plan_needs_no_data_files(tiny_recipe, tmp_path) -> None:
    """A plan reads shapes from the recipe: it works before the data exists (recipe check would not)."""
    from tunelab.cli import app
    from tunelab.recipe import dump_yaml

    path = tmp_path / "r.yaml"
    path.write_text(
        dump_yaml(tiny_recipe("lora", data__train=str(tmp_path / "later.jsonl"))), encoding="utf-8"
    )
    result = CliRunner().invoke(app, ["plan", str(path), "--gpu", "rtx4090-24gb", "--json"])
    assert result.exit_code == 0, result.output
    check = CliRunner().invoke(app, ["recipe", "check", str(path)])
    assert check.exit_code == 2 and "data.train" in check.output


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_loss_transient_matches_the_loss_layer_alone(tiny_recipe, fused: bool, method: str) -> None:
    """The plan's loss term against live bytes of the loss layer's forward + backward (hidden states
    and the output weight already exist), for the plain and the fused cross-entropy."""
    from tunelab.objectives.fused_ce import fused_linear_cross_entropy_sum
    from tunelab.plan.memory import logits_bytes

    recipe = tiny_recipe(method, objective__name="sft", objective__fused_cross_entropy=str(fused).lower())
    inputs = plan_inputs(recipe, device="cpu")
    assert inputs.regime.fused_loss is fused
    batch, seq = 4, recipe.data.max_length
    facts, vocab, width = inputs.facts, inputs.facts.arch.vocab, inputs.facts.arch.hidden
    hidden = torch.randn(batch, seq, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=facts.head_trains)
    labels = torch.randint(0, vocab, (batch, seq))
    with LiveBytes() as tracker:
        for tensor in (hidden, weight, labels):
            tracker.track(tensor)
        tracker.peak = before = tracker.current
        if fused:
            loss, _ = fused_linear_cross_entropy_sum(hidden, weight, labels)
        else:
            loss, _ = causal_lm_loss_sum(hidden @ weight.t(), labels)
        loss.backward()
    measured, predicted = tracker.peak - before, logits_bytes(facts, inputs.regime, batch)
    assert close(predicted, measured), (predicted, measured)


def planned_activations(plan) -> int:
    return sum(v for k, v in plan.components.items() if k.startswith("activations"))


def test_checkpoint_every_and_offload_shape_the_plan(tiny_recipe) -> None:
    """Device activations grow as fewer layers are checkpointed and shrink with offload, whose bytes
    appear as host memory; the recompute's FLOPs follow the checkpointed share of the layers."""
    cfg = config(layers=8)
    gpu = GPUS["a100-40gb"]

    def plan(**training: object):
        sets = {f"training__{k}": v for k, v in training.items()}
        return plan_for(plan_inputs(tiny_recipe("lora", **sets), gpu, config=cfg), 8)

    plain = plan()
    every = {k: plan(gradient_checkpointing="true", checkpoint_every=k) for k in (1, 2, 4, 8)}
    offload = {
        k: plan(gradient_checkpointing="true", checkpoint_every=k, offload_activations="true") for k in (1, 2)
    }
    sizes = [planned_activations(every[k]) for k in (1, 2, 4, 8)] + [planned_activations(plain)]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), sizes
    assert every[1].components == plan(gradient_checkpointing="true").components  # k=1 is today's default
    for k, off in offload.items():
        assert planned_activations(off) < planned_activations(every[k])
        assert (
            off.host_bytes
            == every[k].components["activations (layer inputs, checkpointed)"]
            - off.components["activations (outside the layers)"]
        )
        assert off.peak_allocated < every[k].peak_allocated and every[k].host_bytes == 0
    flops = [every[k].flops_per_token for k in (1, 2, 4, 8)] + [plain.flops_per_token]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == len(flops)


def test_offload_changes_nothing_in_a_cpu_plan(tiny_recipe) -> None:
    sets = {"training__gradient_checkpointing": "true"}
    plain = plan_for(plan_inputs(tiny_recipe("lora", **sets), device="cpu"), 4)
    offload = plan_for(
        plan_inputs(tiny_recipe("lora", training__offload_activations="true", **sets), device="cpu"), 4
    )
    assert offload.components == plain.components and offload.host_bytes == 0
    assert any("nothing moves" in note for note in offload.notes)


def test_plan_command_shows_checkpoint_every_and_offload(tiny_recipe, tmp_path) -> None:
    from tunelab.cli import app
    from tunelab.recipe import dump_yaml

    path = tmp_path / "r.yaml"
    # kernels none: with Liger's fused loss planned (installed here) the tiny model's peak is not where
    # its activations live, and this test is about where they live
    recipe = tiny_recipe("lora", training__gradient_checkpointing="true", training__kernels="none")
    path.write_text(dump_yaml(recipe), encoding="utf-8")
    runner = CliRunner()
    base = ["plan", str(path), "--gpu", "a100-40gb"]

    def as_json(*sets: str) -> dict:
        result = runner.invoke(app, [*base, "--json", *(x for s in sets for x in ("--set", s))])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    every, half = as_json(), as_json("training.checkpoint_every=2")
    assert "activations (layers not checkpointed)" not in every["components_bytes"]
    assert half["components_bytes"]["activations (layers not checkpointed)"] > 0
    assert half["peak_allocated_bytes"] > every["peak_allocated_bytes"]
    offloaded = as_json("training.checkpoint_every=2", "training.offload_activations=true")
    assert offloaded["host_bytes"] > 0 and offloaded["peak_allocated_bytes"] < half["peak_allocated_bytes"]
    table = runner.invoke(
        app, [*base, "--set", "training.checkpoint_every=2", "--set", "training.offload_activations=true"]
    )
    assert "activations (layers not checkpointed)" in table.stdout
    assert "host memory (offloaded layer inputs)" in table.stdout
    refused = runner.invoke(
        app, [*base, "--set", "training.gradient_checkpointing=false", "--set", "training.checkpoint_every=2"]
    )
    assert refused.exit_code == 2 and "set training.gradient_checkpointing: true" in refused.output


def test_a_cuda_plan_counts_no_whole_logits_where_liger_takes_the_loss(monkeypatch):
    """training.kernels on CUDA: Liger's fused linear cross-entropy runs the SFT loss, so the plan
    must not count the whole logits tensor (it did, and overshot the H200's 1B LoRA peak 4.7-fold)."""
    from tunelab.plan import memory
    from tunelab.plan.gpus import GPUS
    from tunelab.recipe import parse_recipe

    def peak(kernels: str) -> int:
        recipe = parse_recipe(
            {
                "model": {"name_or_path": "tiny:llama"},
                "data": {"train": "t.jsonl", "max_length": 512},
                "method": {"name": "lora"},
                "training": {"kernels": kernels},
            }
        )
        return memory.plan_for(memory.plan_inputs(recipe, GPUS["h100-80gb"]), 8).peak_allocated

    assert peak("liger") < peak("none")
    monkeypatch.setattr(memory, "_liger_loss_planned", lambda *a: False)
    assert peak("liger") == peak("none")
