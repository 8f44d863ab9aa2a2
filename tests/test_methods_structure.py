"""Freeze, bottleneck adapters and the learning-rate structure (layer-wise decay, multipliers,
gradual unfreezing): what learns, what is saved, and at which rate."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, get_scheduler

from tunelab.evaluate.run import load_for_eval
from tunelab.methods import METHODS
from tunelab.methods.adapter import AdapterConfig
from tunelab.methods.base import decay_groups, with_learning_rates
from tunelab.methods.blocks import find_blocks, head_is_tied, input_embeddings
from tunelab.methods.freeze import FreezeConfig
from tunelab.methods.lr_structure import structure_learning_rates
from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer
from tunelab.recipe import RecipeError, TrainingSection
from tunelab.runs.rundir import RunDir
from tunelab.train.loop import Trainer

TOK = build_tiny_tokenizer()
IDS = torch.tensor([TOK("hello world, hello tiny model")["input_ids"]])


def _prepare(method: str, model: torch.nn.Module | None = None, weight_decay: float = 0.0, **cfg):
    entry = METHODS.get(method)
    model = model if model is not None else build_tiny_llama(TOK)
    return entry.impl.apply(model, entry.config_cls(name=method, **cfg), weight_decay=weight_decay)


def _train_loop(prepared, steps: int, lr: float = 1e-2):
    """Plain AdamW steps with the prepared hooks; yields (step, snapshot-free model) after each."""
    opt = torch.optim.AdamW(prepared.param_groups, lr=lr, weight_decay=0.0)
    for step in range(steps):
        for hook in prepared.hooks:
            hook.on_step_start(prepared.model, step, steps)
        prepared.model(input_ids=IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        yield step + 1


def _moved(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _fit_and_save(recipe):
    run = RunDir.create(recipe.output.dir, recipe.output.name)
    run.write_recipe(recipe.resolved())
    trainer = Trainer(recipe, run)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = _snapshot(model)
    trainer.fit()
    trainer.save_final()
    return trainer, model, before


LAYER1 = {n for n, _ in build_tiny_llama(TOK).named_parameters() if n.startswith("model.layers.1.")}


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({}, {"lm_head.weight"}),
        ({"last_n_blocks": 1}, LAYER1 | {"model.norm.weight"}),
        ({"last_n_blocks": 1, "head": True}, LAYER1 | {"model.norm.weight", "lm_head.weight"}),
        (
            {"pattern": r"layers\.0\.mlp\."},
            {f"model.layers.0.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")},
        ),
    ],
)
def test_freeze_trains_exactly_the_selection(cfg, expected):
    prepared = _prepare("freeze", **cfg)
    before = _snapshot(prepared.model)
    list(_train_loop(prepared, 2))
    assert {n for n, p in prepared.model.named_parameters() if p.requires_grad} == expected
    assert _moved(prepared.model, before) == expected


def test_freeze_config_errors_name_the_setting(tiny_recipe):
    with pytest.raises(RecipeError, match="pattern alone"):
        tiny_recipe("freeze", method__pattern="mlp", method__head="true")
    with pytest.raises(ValidationError, match="nothing else is chosen"):
        FreezeConfig(head=False)
    assert FreezeConfig().head and not FreezeConfig(last_n_blocks=2).head
    with pytest.raises(ValidationError, match="not a valid regex"):
        FreezeConfig(pattern="layers.(")
    with pytest.raises(ValueError, match=r"'no_such_module' matches no parameter"):
        _prepare("freeze", pattern="no_such_module")
    with pytest.raises(ValueError, match="has 2 blocks"):
        _prepare("freeze", last_n_blocks=3)


def test_freeze_head_of_a_tied_model_trains_the_shared_embeddings():
    model = build_tiny_llama(TOK, tie_word_embeddings=True)
    assert head_is_tied(model)
    with pytest.warns(UserWarning, match="ties its head"):
        prepared = _prepare("freeze", model=model)
    assert "tied_head" in prepared.notes
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.embed_tokens.weight"]
    with pytest.warns(UserWarning, match="embeddings' rate"):
        structured = structure_learning_rates(
            prepared, TrainingSection(learning_rate=1.0, layerwise_lr_decay=0.5)
        )
    assert _lr_of(structured) == {"model.embed_tokens.weight": 0.25}  # d^n_blocks, the embeddings' rate


def test_freeze_run_saves_only_trained_tensors_and_reloads_identically(tiny_recipe):
    trainer, model, before = _fit_and_save(tiny_recipe("freeze", method__last_n_blocks=1))
    saved = load_file(str(trainer.run.final_dir / "trained.safetensors"))
    assert set(saved) == LAYER1 | {"model.norm.weight"} == _moved(model, before)
    reloaded, _ = load_for_eval(str(trainer.run.path))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, reloaded(input_ids=IDS).logits)


def test_adapter_starts_as_the_base_model_and_counts_its_parameters():
    base_logits = build_tiny_llama(TOK)(input_ids=IDS).logits
    for placement, n_adapters in (("pfeiffer", 2), ("houlsby", 4)):
        prepared = _prepare("adapter", placement=placement, bottleneck_size=8)
        assert torch.equal(prepared.model(input_ids=IDS).logits, base_logits)
        trainable = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
        assert trainable == n_adapters * (64 * 8 + 8 + 8 * 64 + 64)
    with pytest.raises(ValidationError, match="Choose one"):
        AdapterConfig(reduction_factor=8, bottleneck_size=4)
    assert AdapterConfig().bottleneck(64) == 4 and AdapterConfig(reduction_factor=8).bottleneck(64) == 8


def test_adapter_contract_train_save_reload(tiny_recipe):
    trainer, model, before = _fit_and_save(tiny_recipe("adapter", method__placement="houlsby"))
    adapter = {n for n in before if ".adapter." in n}
    assert adapter and _moved(model, before) == adapter  # every adapter weight moved, no base weight
    final = trainer.run.final_dir
    weights = load_file(str(final / "adapter_model.safetensors"))
    n_params = sum(t.numel() for t in weights.values())
    assert set(weights) == adapter and n_params == sum(before[n].numel() for n in adapter)
    size = (final / "adapter_model.safetensors").stat().st_size
    assert n_params * 4 <= size <= n_params * 4 + 4096
    reloaded, _ = load_for_eval(str(trainer.run.path))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=IDS).logits, reloaded(input_ids=IDS).logits)
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_blocks_and_adapters_on_another_architecture():
    config = GPT2Config(vocab_size=len(TOK), n_embd=32, n_layer=3, n_head=2, n_positions=64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    name, blocks = find_blocks(model)
    assert name == "transformer.h" and len(blocks) == 3 and head_is_tied(model)
    assert [m is model.transformer.wpe for m in input_embeddings(model)] == [False, True]
    logits = model(input_ids=IDS).logits
    prepared = _prepare("adapter", model=model, placement="houlsby", bottleneck_size=4)
    assert torch.equal(prepared.model(input_ids=IDS).logits, logits)
    frozen = _prepare("freeze", model=GPT2LMHeadModel(config), last_n_blocks=1)
    trainable = {n for n, p in frozen.model.named_parameters() if p.requires_grad}
    assert {"transformer.ln_f.weight", "transformer.h.2.attn.c_attn.weight"} <= trainable
    assert not any(n.startswith(("transformer.h.1.", "transformer.wte")) for n in trainable)


def _lr_of(prepared, lr: float = 1.0) -> dict[str, float]:
    rate = {id(p): g["lr"] for g in with_learning_rates(prepared.param_groups, lr) for p in g["params"]}
    return {n: rate[id(p)] for n, p in prepared.model.named_parameters() if p.requires_grad}


def test_layerwise_decay_gives_block_k_from_the_top_lr_times_d_to_the_k():
    prepared = _prepare("full", model=build_tiny_llama(TOK, num_layers=3), weight_decay=0.1)
    wd_of = {id(p): g["weight_decay"] for g in decay_groups(prepared.model, 0.1) for p in g["params"]}
    lr, d = 1e-3, 0.5
    structured = structure_learning_rates(prepared, TrainingSection(learning_rate=lr, layerwise_lr_decay=d))
    for name, got in _lr_of(structured, lr).items():
        if name.startswith("model.layers."):
            expected = lr * d ** (2 - int(name.split(".")[2]))
        else:
            expected = lr * d**3 if "embed_tokens" in name else lr
        assert got == pytest.approx(expected, rel=1e-12), name
    for group in structured.param_groups:  # the decay / no-decay split survives
        assert {wd_of[id(p)] for p in group["params"]} == {group["weight_decay"]}
    assert (
        with_learning_rates(structured.param_groups, lr)[0]["lr"] == lr
    )  # logged lr (group 0) is the top rate


def test_lr_multipliers_and_lora_through_the_peft_wrapper():
    full = _prepare("full")
    mult = {"embeddings": 0.1, "head": 3.0, "norm": 0.5}
    rates = _lr_of(structure_learning_rates(full, TrainingSection(learning_rate=1.0, lr_multipliers=mult)))
    assert rates["model.embed_tokens.weight"] == pytest.approx(0.1)
    assert rates["lm_head.weight"] == pytest.approx(3.0)
    assert rates["model.norm.weight"] == rates["model.layers.0.input_layernorm.weight"] == pytest.approx(0.5)
    assert rates["model.layers.0.mlp.up_proj.weight"] == 1.0
    lora = structure_learning_rates(
        _prepare("lora"), TrainingSection(learning_rate=1.0, layerwise_lr_decay=0.1)
    )
    rates = _lr_of(lora)
    assert rates and all(n.count("lora_") == 1 for n in rates)
    for name, got in rates.items():
        assert got == pytest.approx(0.1 if ".layers.0." in name else 1.0), name


def test_per_group_rates_survive_the_scheduler():
    prepared = _prepare("full", model=build_tiny_llama(TOK, num_layers=3))
    structured = structure_learning_rates(
        prepared, TrainingSection(learning_rate=1e-3, layerwise_lr_decay=0.8)
    )
    groups = with_learning_rates(structured.param_groups, 1e-3)
    set_rates = [g["lr"] for g in groups]
    assert len(set(set_rates)) == 4  # top block with head and final norm, 2 blocks, embeddings
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    assert [g["initial_lr"] for g in optimizer.param_groups] == set_rates
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    scale = scheduler.get_last_lr()[0] / set_rates[0]
    assert 0 < scale < 1
    assert scheduler.get_last_lr() == pytest.approx([r * scale for r in set_rates], rel=1e-12)


@pytest.mark.parametrize("method_cfg", [("full", {}), ("freeze", {"last_n_blocks": 2, "head": True})])
def test_gradual_unfreezing_opens_one_more_block_every_n_steps(method_cfg):
    method, cfg = method_cfg
    every, n_layers = 2, 4
    prepared = _prepare(method, model=build_tiny_llama(TOK, num_layers=n_layers), **cfg)
    method_trainable = {n for n, p in prepared.model.named_parameters() if p.requires_grad}
    trainable_blocks = sorted({int(n.split(".")[2]) for n in method_trainable if ".layers." in n})
    prepared = structure_learning_rates(prepared, TrainingSection(gradual_unfreeze_every=every))
    before = _snapshot(prepared.model)
    for step in _train_loop(prepared, every * (len(trainable_blocks) + 1) + 1):
        moved = _moved(prepared.model, before)
        assert moved <= method_trainable  # never a parameter the method froze
        assert {"lm_head.weight", "model.norm.weight"} <= moved
        open_blocks = min(1 + (step - 1) // every, len(trainable_blocks))
        assert {int(n.split(".")[2]) for n in moved if ".layers." in n} == set(
            trainable_blocks[-open_blocks:]
        )
        embeddings_open = (step - 1) // every >= len(trainable_blocks)
        assert ("model.embed_tokens.weight" in moved) == (embeddings_open and method == "full"), step


def test_gradual_unfreezing_runs_in_the_engine(tiny_recipe):
    recipe = tiny_recipe("full", training__max_steps=2, training__gradual_unfreeze_every=2)
    _, model, before = _fit_and_save(recipe)
    moved = _moved(model, before)
    assert moved == LAYER1 | {"model.norm.weight", "lm_head.weight"}


def test_no_structure_fields_return_prepared_unchanged():
    prepared = _prepare("full", weight_decay=0.1)
    groups = [dict(g) for g in prepared.param_groups]
    assert structure_learning_rates(prepared, TrainingSection()) is prepared
    assert prepared.param_groups == groups and prepared.hooks == [] and "lr_structure" not in prepared.notes
