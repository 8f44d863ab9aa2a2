"""The PEFT-backed methods (LoRA family, QLoRA, AdaLoRA, IA3, prompt/prefix/P-tuning) through the
engine on the tiny model: what learns, what is saved, and that it loads back to the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from tunelab.evaluate.run import load_for_eval
from tunelab.methods import METHODS, Prepared
from tunelab.methods.base import with_learning_rates
from tunelab.models.load import load_model
from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer, save_tiny_model
from tunelab.runs.rundir import RunDir
from tunelab.train.loop import Trainer

# (method, recipe overrides, names every trainable parameter must contain one of)
CASES = {
    "lora": ("lora", {}, ("lora_",)),
    "dora": ("dora", {}, ("lora_",)),
    "rslora": ("lora", {"method.use_rslora": True}, ("lora_",)),
    "pissa": ("lora", {"method.init": "pissa", "method.r": 4}, ("lora_",)),
    "olora": ("lora", {"method.init": "olora", "method.r": 4}, ("lora_",)),
    "lora+head": (
        "lora",
        {"method.modules_to_save": "[lm_head]", "method.r": 4},
        ("lora_", "modules_to_save"),
    ),
    "qlora": ("qlora", {"method.r": 4}, ("lora_",)),
    "adalora": ("adalora", {"method.init_r": 6, "method.target_r": 2, "method.tinit": 1}, ("lora_",)),
    "ia3": ("ia3", {}, ("ia3_l",)),
    "prompt_tuning": ("prompt_tuning", {"method.num_virtual_tokens": 4}, ("prompt_encoder",)),
    "prefix_tuning": ("prefix_tuning", {"method.num_virtual_tokens": 4}, ("prompt_encoder",)),
    "p_tuning": ("p_tuning", {"method.num_virtual_tokens": 4}, ("prompt_encoder",)),
}
MERGEABLE = {"lora", "dora", "rslora", "pissa", "olora", "lora+head", "adalora", "ia3"}


def _trainer(tiny_recipe, case: str, steps: int) -> Trainer:
    method, overrides, _ = CASES[case]
    name = "t-" + case.replace("+", "-")
    recipe = tiny_recipe(method, training__max_steps=steps, output__name=name, **overrides)
    run = RunDir.create(recipe.output.dir, recipe.output.name)
    run.write_recipe(recipe.resolved())
    return Trainer(recipe, run)


def _probe() -> torch.Tensor:
    tok = build_tiny_tokenizer()
    return torch.tensor([tok("What is two plus two? four")["input_ids"]])


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    return model(input_ids=_probe()).logits


@pytest.mark.parametrize("case", list(CASES))
def test_method_contract(tiny_recipe, case):
    """Two steps (LoRA's A only moves once B is non-zero) change exactly the trainable parameters, all
    of them and nothing else; save → load_for_eval gives identical logits; merging keeps them; the
    adapter on disk is the size of what it stores."""
    trainer = _trainer(tiny_recipe, case, steps=2)
    model = trainer.accelerator.unwrap_model(trainer.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.fit()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert trainable and changed == trainable
    assert all(any(key in n for key in CASES[case][2]) for n in trainable), sorted(trainable)

    final = trainer.save_final()
    trained = _logits(model)
    loaded, _ = load_for_eval(str(trainer.run.path), device="cpu")
    if case in ("pissa", "olora"):  # saved as W + (BA - B0A0) rather than W_res + BA: equal up to rounding
        torch.testing.assert_close(_logits(loaded), trained, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(_logits(loaded), trained)

    if case in MERGEABLE:
        merged = loaded.merge_and_unload()
        torch.testing.assert_close(_logits(merged), trained, atol=1e-4, rtol=1e-4)

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored = n_trainable
    if case == "p_tuning":  # the encoder trains; only the virtual-token embeddings it produces are stored
        stored = 4 * model.config.hidden_size
    if case in ("pissa", "olora"):  # saved converted to a plain LoRA of rank 2r (see methods/lora.save_lora)
        stored = 2 * n_trainable
    size = (final / "adapter_model.safetensors").stat().st_size
    header = 1024 + 200 * len(trainable)
    if case == "adalora":  # ranks dropped by the budget are cut from the stored matrices
        assert size <= 4 * stored + header
    else:
        assert 4 * stored <= size <= 4 * stored + header, (size, stored)


def test_qlora_keeps_the_base_in_4bit_and_reloads_it_so(tiny_recipe):
    import bitsandbytes as bnb

    trainer = _trainer(tiny_recipe, "qlora", steps=2)
    model = trainer.accelerator.unwrap_model(trainer.model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14  # 7 linear layers × 2 blocks; lm_head stays dense, as in transformers
    assert all(m.weight.dtype == torch.uint8 and m.weight.quant_state.nested for m in layers.values())
    assert {m.weight.quant_state.quant_type for m in layers.values()} == {"nf4"}

    def packed() -> dict[str, torch.Tensor]:
        # state_dict gives the canonical 4-bit layout (bitsandbytes repacks for eval on some CPUs)
        return {n: m.state_dict()["weight"].clone() for n, m in layers.items()}

    start = packed()
    trainer.fit()
    end = packed()
    assert all(end[n].dtype == torch.uint8 and torch.equal(start[n], end[n]) for n in layers)
    meta = json.loads((trainer.save_final() / "tunelab.json").read_text())
    assert meta["artifact"] == "custom" and meta["method_config"]["double_quant"] is True
    loaded, _ = load_for_eval(str(trainer.run.path), device="cpu")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.base_model.model.modules()) == 14


def _avx512_bf16_gemv(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """What bitsandbytes' AVX512-BF16 CPU kernel computes on a repacked weight ([N, K/2] nibbles in
    blocks of 32 rows, absmax [K/blocksize, N] in bf16, activations in bf16), in plain torch."""
    n, k = state.shape
    nibbles = B.view(torch.uint8).reshape(-1, 32)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)
    codes = codes.reshape(n // 32, k // 2, 32, 2).transpose(1, 2).reshape(n, k)
    scale = state.absmax.T.float()[..., None]
    weight = (state.code[codes.long()].reshape(n, -1, state.blocksize) * scale).reshape(n, k)
    return (A.bfloat16() @ weight.bfloat16().T).to(A.dtype)


@pytest.fixture
def avx512_bf16_cpu(monkeypatch):
    """This CPU as bitsandbytes sees an Intel Xeon with AVX512-BF16 (issue 26): 4-bit layers built now
    repack themselves on an eval-mode forward, and the repacked matmul runs the kernel's arithmetic."""
    import bitsandbytes as bnb
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)
    monkeypatch.setattr(bnb.functional, "gemv_4bit", _avx512_bf16_gemv)
    # the simulation is live: a bare 4-bit layer repacks its weight on an eval forward
    bare = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")
    before = bare.weight.data.clone()
    with torch.no_grad():
        bare.eval()(torch.ones(1, 64))
    assert bare.weight.quant_state.packing_format_for_cpu and not torch.equal(bare.weight.data, before)


def test_qlora_on_an_avx512_bf16_cpu_keeps_the_base_and_the_logits(tiny_recipe, avx512_bf16_cpu):
    """bitsandbytes repacks 4-bit weights for eval on such CPUs; tunelab's layers must not: the frozen base
    stays bit-identical through training and its evaluation, and the reloaded adapter gives the same logits."""
    trainer = _trainer(tiny_recipe, "qlora", steps=2)
    model = trainer.accelerator.unwrap_model(trainer.model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer.fit()

    def moved() -> list[str]:
        return [
            n for n, p in model.named_parameters() if n in frozen and not torch.equal(p.detach(), frozen[n])
        ]

    trained = _logits(model)
    assert not moved(), f"frozen 4-bit weights changed: {moved()[:3]}"
    trainer.save_final()
    loaded, _ = load_for_eval(str(trainer.run.path), device="cpu")
    assert torch.equal(_logits(loaded), trained)
    assert not moved(), f"frozen 4-bit weights changed on save: {moved()[:3]}"


def test_qlora_without_4bit_kernels_names_the_alternative(monkeypatch):
    import bitsandbytes as bnb

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(bnb.functional, "quantize_4bit", broken)
    entry = METHODS.get("qlora")
    with pytest.raises(RuntimeError, match="method.name: lora"):
        entry.impl.apply(build_tiny_llama(), entry.config_cls(), weight_decay=0.0)


def test_qlora_rejects_inits_that_rewrite_the_base(tiny_recipe):
    with pytest.raises(Exception, match="pissa"):
        tiny_recipe("qlora", **{"method.init": "pissa"})


def test_loraplus_gives_the_b_matrices_a_higher_learning_rate(tiny_recipe):
    recipe = tiny_recipe(
        "lora", training__learning_rate=1e-3, training__weight_decay=0.1, **{"method.loraplus_lr_ratio": 16}
    )
    entry = METHODS.get("lora")
    prepared = entry.impl.apply(build_tiny_llama(), recipe.method, weight_decay=0.1)
    groups = with_learning_rates(prepared.param_groups, recipe.training.learning_rate)
    names = {id(p): n for n, p in prepared.model.named_parameters()}
    fast = [g for g in groups if "lr" in g]
    assert len(fast) == 1 and fast[0]["lr"] == pytest.approx(16e-3) and fast[0]["weight_decay"] == 0.1
    assert all("lora_B" in names[id(p)] for p in fast[0]["params"])
    slow = [names[id(p)] for g in groups if "lr" not in g for p in g["params"]]
    assert slow and all("lora_A" in n for n in slow)
    n_b = sum("lora_B" in n for n, p in prepared.model.named_parameters() if p.requires_grad)
    assert len(fast[0]["params"]) == n_b


def test_dora_and_rslora_reach_peft(tiny_recipe):
    entry = METHODS.get("dora")
    cfg = tiny_recipe("dora", **{"method.use_rslora": True, "method.r": 4, "method.alpha": 8}).method
    model = entry.impl.apply(build_tiny_llama(), cfg, weight_decay=0.0).model
    config = model.peft_config["default"]
    assert config.use_dora and config.use_rslora
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)
    assert any("lora_magnitude_vector" in n for n, p in model.named_parameters() if p.requires_grad)
    assert tiny_recipe("lora").method.use_dora is False


def test_adalora_reallocates_ranks_and_reloads_with_them(tiny_recipe):
    method_overrides = {"method.init_r": 4, "method.target_r": 1, "method.tinit": 1, "method.tfinal": 1}
    recipe = tiny_recipe("adalora", training__max_steps=5, output__name="t-ada", **method_overrides)
    run = RunDir.create(recipe.output.dir, recipe.output.name)
    trainer = Trainer(recipe, run)
    trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = model.peft_config["default"]
    assert config.total_step == 5 and config.rank_pattern
    kept = sum(int(torch.as_tensor(mask).sum()) for mask in config.rank_pattern.values())
    assert kept < 4 * len(config.rank_pattern)  # the budget shrank
    trainer.save_final()
    saved = json.loads((run.final_dir / "adapter_config.json").read_text())
    assert saved["total_step"] == 5 and saved["rank_pattern"]
    loaded, _ = load_for_eval(str(run.path), device="cpu")
    # the reloaded matrices are cut to the kept ranks: same sums, different summation order
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-6, rtol=1e-5)


def test_adalora_schedule_that_leaves_no_budget_phase_is_an_error(tiny_recipe):
    recipe = tiny_recipe("adalora", training__max_steps=3, **{"method.tinit": 2, "method.tfinal": 1})
    run = RunDir.create(recipe.output.dir, recipe.output.name)
    with pytest.raises(ValueError, match="method.tinit"):
        Trainer(recipe, run).fit()


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning", "p_tuning"])
def test_virtual_tokens_keep_the_sft_loss_aligned(tiny_recipe, method):
    """The objective's windowed loss on a prompt-learning model equals PEFT's own full-sequence loss."""
    recipe = tiny_recipe(method, **{"method.num_virtual_tokens": 3})
    run = RunDir.create(recipe.output.dir, recipe.output.name)
    trainer = Trainer(recipe, run)
    model = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = trainer.objective.collate(trainer.train_split.features[:1])
    with torch.no_grad():
        out = trainer.objective.loss(model, batch)
        reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(out.loss_sum / out.n_units, reference)


def test_prompt_tuning_starts_from_the_text_embeddings(tmp_path):
    path = save_tiny_model(tmp_path / "tiny")
    model, tokenizer = load_model(str(path), device="cpu")
    entry = METHODS.get("prompt_tuning")
    cfg = entry.config_cls(num_virtual_tokens=5, init="text", init_text="Say hi")
    peft_model = entry.impl.apply(model, cfg, weight_decay=0.0).model
    ids = tokenizer("Say hi", add_special_tokens=False)["input_ids"]
    ids = (ids * 5)[:5]
    expected = model.get_input_embeddings().weight[ids]
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, expected)


def test_prompt_text_init_needs_both_fields():
    with pytest.raises(ValueError, match="init_text"):
        METHODS.get("prompt_tuning").config_cls(init="text")


def test_peft_artifacts_load_with_plain_peft(tiny_recipe):
    """A saved LoRA adapter is an ordinary PEFT folder: PeftModel.from_pretrained reads it on the base."""
    trainer = _trainer(tiny_recipe, "lora", steps=1)
    trainer.fit()
    final = trainer.save_final()
    loaded = PeftModel.from_pretrained(build_tiny_llama(build_tiny_tokenizer()), str(final))
    assert torch.equal(_logits(loaded), _logits(trainer.accelerator.unwrap_model(trainer.model)))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_save_as_a_plain_lora_on_the_untouched_base(tiny_recipe, tmp_path, init):
    trainer = _trainer(tiny_recipe, init, steps=2)
    trainer.fit()
    model = trainer.accelerator.unwrap_model(trainer.model)
    METHODS.get("lora").impl.save(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 64 and config["init_lora_weights"] is True
    base = build_tiny_llama(build_tiny_tokenizer())
    untouched = {n: p.clone() for n, p in base.named_parameters()}
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    base_after = {n.replace(".base_layer", ""): p for n, p in loaded.get_base_model().named_parameters()}
    assert all(torch.equal(untouched[n], base_after[n]) for n in untouched)
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)


def test_pissa_with_dora_is_refused(tiny_recipe):
    with pytest.raises(Exception, match="use_dora"):
        tiny_recipe("dora", **{"method.init": "pissa"})


def test_lr_scale_factors_multiply_in_order_as_the_old_per_group_rates_did():
    """LoRA+'s ratio then a layer-wise factor: the same float as ``(lr * ratio) * factor``, which is not
    always ``lr * (ratio * factor)``; a group without a scale is left to the optimizer's default."""
    lr, ratio, factor = 1e-2, 3.0, 0.7
    plain = {"params": [], "group": "decay"}
    scaled, kept = with_learning_rates([{"params": [], "lr_scale": (ratio, factor)}, plain], lr)
    assert scaled["lr"] == (lr * ratio) * factor and "lr_scale" not in scaled
    assert kept is plain and "lr" not in kept


def test_the_optimizer_a_method_asks_for_is_a_field_of_prepared():
    bnb = pytest.importorskip("bitsandbytes")
    from tunelab.train.common import build_optimizer

    layer = torch.nn.Linear(4, 4)
    groups = [{"params": list(layer.parameters()), "lr_scale": (2.0,)}]
    optimizer = build_optimizer(
        Prepared(model=layer, param_groups=groups, optimizer="paged_adamw_32bit"), 1e-3
    )
    assert isinstance(optimizer, bnb.optim.PagedAdamW32bit) and optimizer.param_groups[0]["lr"] == 2e-3
    plain = build_optimizer(Prepared(model=layer, param_groups=[{"params": list(layer.parameters())}]), 1e-3)
    assert type(plain) is torch.optim.AdamW and plain.param_groups[0]["lr"] == 1e-3
