"""classify, reward and the DPO family: formulas by hand, parity with TRL on identical tensors, and
training from the shipped recipes on the tiny model."""

from __future__ import annotations

import copy
import json
import math
import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tunelab.objectives import OBJECTIVES
from tunelab.objectives.classify import ClassifyConfig, ClassifyObjective, sort_labels
from tunelab.objectives.dpo import DpoConfig, DpoObjective, response_logps
from tunelab.objectives.kto import KtoConfig, KtoObjective, kl_pairs
from tunelab.objectives.preference_losses import (
    bradley_terry,
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_log_odds_ratio,
    orpo_loss,
    simpo_loss,
)
from tunelab.recipe import load_recipe, parse_recipe
from tunelab.train.run import train

REPO = Path(__file__).resolve().parents[1]
OURS = ("classify", "reward", "dpo", "simpo", "orpo", "kto")


def nls(x: float) -> float:
    """-log σ(x), by hand."""
    return math.log1p(math.exp(-x))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- formulas against hand-computed values ------------------------------------------------------


def test_bradley_terry_by_hand():
    assert bradley_terry(t(2.0), t(1.0)).item() == pytest.approx(nls(1.0))
    assert bradley_terry(t(2.0), t(1.0), margin=t(1.0)).item() == pytest.approx(math.log(2))


def test_dpo_variants_by_hand():
    # policy/reference log-ratios: chosen +1, rejected -1 → Δ = 2
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))
    assert dpo_loss(*args, beta=0.5).item() == pytest.approx(nls(1.0))
    assert dpo_loss(*args, beta=0.5, label_smoothing=0.1).item() == pytest.approx(
        0.9 * nls(1) + 0.1 * nls(-1)
    )
    assert dpo_loss(*args, beta=0.25, loss_type="hinge").item() == pytest.approx(0.5)
    assert dpo_loss(*args, beta=0.5, loss_type="hinge").item() == 0.0
    robust = (0.9 * nls(1) - 0.1 * nls(-1)) / 0.8
    assert dpo_loss(*args, beta=0.5, loss_type="robust", label_smoothing=0.1).item() == pytest.approx(robust)
    # IPO on per-token ratios: 1/2 - (-1/4) = 0.75, target 1/(2β) = 1
    ipo = dpo_loss(*args, beta=0.5, loss_type="ipo", chosen_lengths=t(2), rejected_lengths=t(4))
    assert ipo.item() == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(*args, beta=0.5, loss_type="ipo")


def test_simpo_orpo_kto_by_hand():
    # SimPO: β(avg_c - avg_r) - γ = 2·1 - 1 = 1
    assert simpo_loss(t(-1.0), t(-2.0), beta=2.0, gamma=1.0).item() == pytest.approx(nls(1.0))
    # ORPO: p_c = 1/2 (odds 1), p_r = 1/4 (odds 1/3) → log σ(log 3) = log 3/4
    c, r = t(math.log(0.5)), t(math.log(0.25))
    assert orpo_log_odds_ratio(c, r).item() == pytest.approx(math.log(0.75))
    assert orpo_loss(t(0.7), c, r, beta=0.1).item() == pytest.approx(0.7 - 0.1 * math.log(0.75))
    # KTO with z = 0.5, β = 1: desirable ratio 1 → 1 - σ(0.5); undesirable ratio -1 → 1 - σ(1.5)
    losses = kto_loss(
        t(0.0, -3.0), t(-1.0, -2.0), torch.tensor([True, False]), torch.tensor(0.5), 1.0, 2.0, 3.0
    )
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert losses.tolist() == pytest.approx([2 * (1 - sig(0.5)), 3 * (1 - sig(1.5))])
    assert kto_kl_estimate(t(-2.0, -2.0), t(-1.0, -1.0)).item() == 0.0  # clamped at zero
    assert kto_kl_estimate(t(-1.0, -2.0), t(-2.0, -2.0)).item() == pytest.approx(0.5)


# ---- parity with TRL on identical tensors --------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fake_trainer(**attrs):
    """The attributes TRL's loss code reads from `self`, on one CPU process."""
    accelerator = SimpleNamespace(device="cpu", gather_for_metrics=lambda x: x, gather=lambda x: x)
    base = dict(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    return SimpleNamespace(**(base | attrs))


def lm_outputs(per_token_logps: torch.Tensor) -> SimpleNamespace:
    """What TRL's fused LM head returns, given the per-token log-probs we want it to see."""
    zeros = torch.zeros_like(per_token_logps)
    return SimpleNamespace(log_probs=per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def random_completion_logps(n: int, width: int, generator: torch.Generator):
    """Per-token log-probs (zero outside the completion) and the completion mask, TRL layout."""
    mask = torch.zeros(n, width + 1, dtype=torch.long)
    lengths = torch.randint(1, width + 1, (n,), generator=generator)
    for i, k in enumerate(lengths.tolist()):
        mask[i, width + 1 - k :] = 1
    logps = -torch.rand(n, width, generator=generator, dtype=torch.float64) * 3 * mask[:, 1:]
    return logps, mask


@pytest.mark.parametrize(
    ("loss_type", "smoothing"), [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)]
)
def test_dpo_matches_trl(loss_type, smoothing):
    from trl import DPOTrainer

    g = torch.Generator().manual_seed(0)
    pairs, width, beta = 4, 6, 0.3
    per_token, mask = random_completion_logps(2 * pairs, width, g)
    ref = -torch.rand(2 * pairs, generator=g, dtype=torch.float64) * 10
    fake = fake_trainer(
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=smoothing,
        use_weighting=False,
    )
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref[:pairs],
        "ref_rejected_logps": ref[pairs:],
    }
    trl_loss = DPOTrainer._compute_loss(fake, lambda **kw: lm_outputs(per_token), inputs, False)

    logps, lengths = per_token.sum(-1), mask.sum(-1)
    ours = dpo_loss(
        logps[:pairs],
        logps[pairs:],
        ref[:pairs],
        ref[pairs:],
        beta,
        loss_type,
        smoothing,
        chosen_lengths=lengths[:pairs],
        rejected_lengths=lengths[pairs:],
    )
    assert ours.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6)
    chosen_rewards = beta * (logps[:pairs] - ref[:pairs])
    assert chosen_rewards.mean().item() == pytest.approx(
        fake._metrics["train"]["rewards/chosen"][0], abs=1e-6
    )


def test_kto_matches_trl():
    from trl import KTOTrainer

    g = torch.Generator().manual_seed(1)
    n, width, beta = 6, 5, 0.2
    per_token, mask = random_completion_logps(n, width, g)
    kl_per_token, kl_mask = random_completion_logps(n, width, g)
    ref, ref_kl = (-torch.rand(n, generator=g, dtype=torch.float64) * 8 for _ in range(2))
    ref_kl = ref_kl - 2  # make the KL estimate positive so the clamp does not hide it
    labels = torch.tensor([True, False, True, True, False, False])
    fake = fake_trainer(
        calculate_KL=True,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=beta,
        desirable_weight=1.3,
        undesirable_weight=0.7,
    )
    fake._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(fake, model, batch)
    kl_ids = torch.full_like(kl_mask, 7)
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "KL_input_ids": kl_ids,
        "KL_attention_mask": torch.ones_like(kl_mask),
        "KL_completion_mask": kl_mask,
        "label": labels,
        "ref_logps": ref,
        "ref_KL_logps": ref_kl,
    }

    def model(input_ids, **kwargs):
        return lm_outputs(kl_per_token if input_ids is kl_ids else per_token)

    trl_loss = KTOTrainer._compute_loss(fake, model, inputs, False)
    kl = kto_kl_estimate(kl_per_token.sum(-1), ref_kl)
    ours = kto_loss(per_token.sum(-1), ref, labels, kl, beta, 1.3, 0.7)
    assert kl.item() > 0
    assert kl.item() == pytest.approx(fake._metrics["train"]["kl"][0], abs=1e-6)
    assert ours.mean().item() == pytest.approx(trl_loss.item(), abs=1e-6)


def test_simpo_and_orpo_match_trl():
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    g = torch.Generator().manual_seed(2)
    chosen, rejected = (-torch.rand(8, generator=g, dtype=torch.float64) * 3 - 0.01 for _ in range(2))
    for smoothing in (0.0, 0.1):
        cpo = fake_trainer(alpha=0.0, beta=2.5, loss_type="simpo", simpo_gamma=1.2, label_smoothing=smoothing)
        trl_losses, *_ = CPOTrainer.cpo_loss(cpo, chosen, rejected)
        ours = simpo_loss(chosen, rejected, beta=2.5, gamma=1.2, label_smoothing=smoothing)
        torch.testing.assert_close(ours, trl_losses, atol=1e-6, rtol=0)
    # conservative DPO (sigmoid + label smoothing): TRL 1.16 keeps that formula in CPO; with a zero
    # reference, CPO's logits are DPO's
    cpo = fake_trainer(alpha=0.0, beta=0.3, loss_type="sigmoid", label_smoothing=0.2)
    trl_losses, *_ = CPOTrainer.cpo_loss(cpo, chosen, rejected)
    zero = torch.zeros_like(chosen)
    ours = dpo_loss(chosen, rejected, zero, zero, beta=0.3, label_smoothing=0.2)
    torch.testing.assert_close(ours, trl_losses, atol=1e-6, rtol=0)
    nll = torch.rand(8, generator=g, dtype=torch.float64) * 4
    trl_terms, *_ = ORPOTrainer.odds_ratio_loss(fake_trainer(beta=0.25), chosen, rejected)
    trl_total = nll.mean() - trl_terms.mean()  # ORPOTrainer: policy_nll_loss - losses.mean()
    assert orpo_loss(nll, chosen, rejected, beta=0.25).mean().item() == pytest.approx(
        trl_total.item(), abs=1e-6
    )


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_loss_matches_trl(with_margin):
    from trl import RewardTrainer

    g = torch.Generator().manual_seed(3)
    scores = torch.randn(10, 1, generator=g, dtype=torch.float64)
    margin = torch.rand(5, generator=g, dtype=torch.float64) if with_margin else None
    fake = fake_trainer(args=SimpleNamespace(center_rewards_coefficient=0.01))
    inputs = {"input_ids": torch.ones(10, 3, dtype=torch.long), "attention_mask": torch.ones(10, 3)}
    if with_margin:
        inputs["margin"] = margin
    trl_loss = RewardTrainer.compute_loss(fake, lambda **kw: SimpleNamespace(logits=scores), inputs)
    chosen, rejected = scores[:, 0].chunk(2)
    ours = bradley_terry(chosen, rejected, margin).mean() + 0.01 * ((chosen + rejected) ** 2).mean()
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-6)


# ---- objectives: encoding, labels, reference --------------------------------------------------


def test_every_objective_here_is_registered_with_a_recipe():
    for name in OURS:
        OBJECTIVES.get(name)
        assert load_recipe(REPO / "recipes" / f"tiny-{name}.yaml").objective.name == name


def test_classify_label_mapping_and_balanced_weights():
    assert sort_labels({"10", "2", "1"}) == ["1", "2", "10"]
    objective = ClassifyObjective(
        ClassifyConfig(class_weights="balanced"), _CharTokenizer(), SimpleNamespace(max_length=8)
    )
    rows = [("good", "pos"), ("bad", "neg"), ("fine", "pos"), ("great", "pos")]
    features = [objective.encode(i, {"text": x, "label": y}) for i, (x, y) in enumerate(rows)]
    assert objective.model_kwargs()["id2label"] == {0: "neg", 1: "pos"}
    objective.prepare(nn.Linear(1, 1), features, [])
    assert objective.weights.tolist() == pytest.approx([4 / (2 * 1), 4 / (2 * 3)])
    assert objective.collate(features)["labels"].tolist() == [1, 0, 1, 1]
    fixed = ClassifyObjective(
        ClassifyConfig(labels=["pos", "neg"]), _CharTokenizer(), SimpleNamespace(max_length=8)
    )
    assert "not one of" in fixed.encode(0, {"text": "x", "label": "meh"}).reason


class _CharTokenizer:
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 50 + 1 for c in text]}


@pytest.fixture(scope="module")
def tiny_lm():
    from tunelab.models.load import load_model

    return load_model("tiny:llama", device="cpu", seed=0)


PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"What colour is the {c} {a}?"}],
        "chosen": [{"role": "assistant", "content": f"The {a} is {c}."}],
        "rejected": [{"role": "assistant", "content": "I do not know."}],
    }
    for a, c in [("pig", "red"), ("cat", "blue"), ("dog", "green"), ("cow", "white")]
]


def test_dpo_lora_reference_is_the_base_with_adapter_off(tiny_lm, monkeypatch):
    """No second model: the live reference (adapter switched off) equals reference log-probs
    precomputed before training, even after the adapter has moved away from zero."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base, tokenizer = tiny_lm
    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    data = SimpleNamespace(max_length=64)
    pre = DpoObjective(DpoConfig(precompute_reference=True), tokenizer, data)
    live = DpoObjective(DpoConfig(), tokenizer, data)
    pre_features = [pre.encode(i, p) for i, p in enumerate(PAIRS)]
    live_features = [live.encode(i, p) for i, p in enumerate(PAIRS)]
    pre.prepare(model, pre_features, [])
    live.prepare(model, live_features, [])
    assert "ref_chosen_logps" in pre_features[0] and "ref_chosen_logps" not in live_features[0]

    with torch.no_grad():  # the adapter learns something: policy ≠ reference from here on
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    calls, deep_copied = [], []
    original = PeftModel.disable_adapter
    monkeypatch.setattr(PeftModel, "disable_adapter", lambda self: calls.append(1) or original(self))
    real_deepcopy = copy.deepcopy
    monkeypatch.setattr(
        copy,
        "deepcopy",
        lambda x, *a: deep_copied.append(x) if isinstance(x, nn.Module) else real_deepcopy(x, *a),
    )

    live_batch, pre_batch = live.collate(live_features), pre.collate(pre_features)
    ref_chosen, ref_rejected = live.reference_logps(model, live_batch)
    torch.testing.assert_close(ref_chosen, pre_batch["ref_chosen_logps"], atol=1e-5, rtol=0)
    torch.testing.assert_close(ref_rejected, pre_batch["ref_rejected_logps"], atol=1e-5, rtol=0)
    policy = response_logps(model, live_batch)[0].detach()[: len(PAIRS)]
    assert (policy - ref_chosen).abs().max() > 1e-3
    assert live.loss(model, live_batch).loss_sum.item() == pytest.approx(
        pre.loss(model, pre_batch).loss_sum.item(), abs=1e-4
    )
    assert calls and not deep_copied


def test_kto_pairs_prompts_with_other_completions(tiny_lm):
    _, tokenizer = tiny_lm
    objective = KtoObjective(KtoConfig(), tokenizer, SimpleNamespace(max_length=64))
    unpaired = {"prompt": PAIRS[0]["prompt"], "completion": PAIRS[0]["chosen"], "label": False}
    single = objective.encode(0, unpaired)
    assert [e["desirable"] for e in single["examples"]] == [False]
    features = [objective.encode(i, p) for i, p in enumerate(PAIRS)]
    assert [e["desirable"] for e in features[0]["examples"]] == [True, False]
    pairs = kl_pairs(features)
    text = tokenizer.decode(pairs[1][0][0])
    assert "cat" in text and "The pig is red." in text  # prompt of pair 1, completion of pair 0


# ---- training from the shipped recipes ----------------------------------------------------------


def shipped(name: str, tmp_path: Path, *overrides: str):
    recipe = load_recipe(REPO / "recipes" / f"tiny-{name}.yaml")
    raw = recipe.resolved()
    raw["output"] = {**raw["output"], "dir": str(tmp_path / "runs")}
    return parse_recipe(raw, overrides=list(overrides))


@pytest.mark.parametrize("name", ["dpo", "simpo", "orpo", "kto", "classify"])
def test_objective_trains_from_recipe(name, tmp_path):
    result = train(shipped(name, tmp_path, "training.max_steps=10"))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first, result.losses
    key = "eval_accuracy" if name == "classify" else "eval_rewards/margins"
    assert key in result.final_eval
    if name == "classify":
        assert result.final_eval["eval_accuracy"] >= 0.75


@pytest.mark.parametrize(("objective", "start"), [("dpo", math.log(2)), ("kto", 0.5)])
def test_full_finetune_starts_at_reference_with_precomputed_logps(objective, start, tiny_recipe, tmp_path):
    """Policy = reference at step 0, so the first loss is exactly log 2 (DPO) or 1 - σ(0) (KTO): the
    reference was precomputed, since a fully fine-tuned model has no adapter to switch off."""
    train_path = write_jsonl(tmp_path / "pref.jsonl", PAIRS)
    recipe = tiny_recipe(
        "full",
        objective__name=objective,
        data__train=str(train_path),
        data__eval=str(train_path),
        training__max_steps=2,
        training__batch_size=4,
    )
    result = train(recipe)
    assert result.losses[0] == pytest.approx(start, abs=1e-5)
    assert result.losses[1] < result.losses[0]


WORDS = [
    "the",
    "sky",
    "sea",
    "sun",
    "tree",
    "book",
    "car",
    "moon",
    "city",
    "song",
    "red",
    "blue",
    "green",
    "old",
    "big",
    "small",
    "fast",
    "slow",
    "warm",
    "cold",
]


def keyword_pairs(n: int, seed: int, keyword_wins: bool) -> list[dict]:
    """Pairs that differ in one word at a random position: ``thanks`` in one answer, another word in
    the other. ``keyword_wins`` says which of the two is preferred."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words, at = rng.sample(WORDS, 5), rng.randrange(6)
        other = rng.choice([w for w in WORDS if w not in words])
        with_kw = " ".join(words[:at] + ["thanks"] + words[at:])
        without = " ".join(words[:at] + [other] + words[at:])
        good, bad = (with_kw, without) if keyword_wins else (without, with_kw)
        rows.append({"prompt": "Say something.", "chosen": good, "rejected": bad})
    return rows


@pytest.mark.parametrize("keyword_wins", [True, False])
def test_reward_model_learns_held_out_preferences(keyword_wins, tmp_path):
    """Trained both ways round, so a bias the untrained model happens to have (it already ranks the
    keyword consistently one way) cannot pass both: whatever the convention, it is learned."""
    train_path = write_jsonl(tmp_path / "rm_train.jsonl", keyword_pairs(64, 0, keyword_wins))
    eval_path = write_jsonl(tmp_path / "rm_eval.jsonl", keyword_pairs(40, 1, keyword_wins))
    recipe = shipped(
        "reward", tmp_path, f"data.train={train_path}", f"data.eval={eval_path}", "training.epochs=1"
    )
    result = train(recipe)
    assert result.final_eval["eval_accuracy"] >= 0.8, result.final_eval
    assert result.final_eval["eval_margin"] > 0.5


def test_classify_trains_an_encoder_head(tiny_lm):
    """The same objective drives an encoder (BERT-style, [CLS] pooling) as a decoder."""
    from transformers import BertConfig, BertForSequenceClassification

    _, tokenizer = tiny_lm
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForSequenceClassification(config)
    objective = ClassifyObjective(ClassifyConfig(), tokenizer, SimpleNamespace(max_length=32))
    rows = [
        {"text": f"The {t} was {w}.", "label": lab}
        for t in ("film", "book", "meal")
        for w, lab in (("great", "pos"), ("awful", "neg"), ("lovely", "pos"), ("bad", "neg"))
    ]
    batch = objective.collate([objective.encode(i, r) for i, r in enumerate(rows)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        out = objective.loss(model, batch)
        (out.loss_sum / out.n_units).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss_sum / out.n_units))
    assert losses[-1] < 0.5 * losses[0]
    assert objective.loss(model, batch).metrics["accuracy"] == 1.0
