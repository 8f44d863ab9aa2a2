"""Head-based classification eval, reward/DPO preference eval and generation timing on tiny models."""

from __future__ import annotations

import copy
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from torch import nn
from transformers import AutoModelForSequenceClassification

from tunelab.evaluate.classify import evaluate_classifier
from tunelab.evaluate.efficiency import count_generated, measure_generation, stop_token_ids
from tunelab.evaluate.preference import evaluate_dpo_implicit_reward, evaluate_reward_model
from tunelab.models.load import load_model
from tunelab.objectives.dpo import encode_response

TEXTS = [
    "a warm, funny and moving film",
    "dull",
    "I walked out after twenty minutes of this mess",
    "the best thing I have seen all year, and I have seen a lot",
    "fine",
    "not good, not bad, just long",
    "a triumph",
]
GOLDS = ["pos", "neg", "neg", "pos", "pos", "neg", "pos"]

PAIRS = [
    {
        "prompt": [{"role": "user", "content": f"What colour is the {c} {a}?"}],
        "chosen": [{"role": "assistant", "content": f"The {a} is {c}."}],
        "rejected": [{"role": "assistant", "content": "I do not know."}],
    }
    for a, c in [("pig", "red"), ("cat", "blue"), ("dog", "green"), ("cow", "white")]
]


@pytest.fixture(scope="module")
def tiny_lm():
    return load_model("tiny:llama", device="cpu", seed=0)


def _head_model(**kwargs):
    return load_model(
        "tiny:llama", device="cpu", seed=1, model_cls=AutoModelForSequenceClassification, model_kwargs=kwargs
    )


# -- classification head --------------------------------------------------------------------------


def test_classifier_predictions_are_the_argmax_of_the_head() -> None:
    model, tokenizer = _head_model(num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    report, predicted = evaluate_classifier(model, tokenizer, TEXTS, GOLDS, batch_size=3)

    with torch.no_grad():  # one text at a time, no padding: what the batched path must reproduce
        logits = [model(**tokenizer(t, return_tensors="pt")).logits[0] for t in TEXTS]
    assert predicted == [["neg", "pos"][int(x.argmax())] for x in logits]

    p, r, f, s = precision_recall_fscore_support(GOLDS, predicted, labels=["neg", "pos"], zero_division=0)
    assert [report.per_class[x]["f1"] for x in ("neg", "pos")] == f.tolist()
    assert [report.per_class[x]["precision"] for x in ("neg", "pos")] == p.tolist()
    assert [report.per_class[x]["support"] for x in ("neg", "pos")] == s.tolist()
    assert report.confusion == [
        row + [0] for row in confusion_matrix(GOLDS, predicted, labels=["neg", "pos"]).tolist()
    ]
    assert report.accuracy == np.mean([a == b for a, b in zip(predicted, GOLDS)])
    assert report.out_of_label_rate == 0.0 and report.n == len(TEXTS)


def test_classifier_truncates_like_training_and_rejects_unknown_golds() -> None:
    model, tokenizer = _head_model(num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    _, predicted = evaluate_classifier(model, tokenizer, TEXTS, GOLDS, max_length=3)
    with torch.no_grad():
        logits = [model(input_ids=torch.tensor([tokenizer(t)["input_ids"][:3]])).logits[0] for t in TEXTS]
    assert predicted == [["neg", "pos"][int(x.argmax())] for x in logits]
    with pytest.raises(ValueError, match=r"\['meh'\] are not among the model's labels \['neg', 'pos'\]"):
        evaluate_classifier(model, tokenizer, ["x"], ["meh"])


# -- reward model ---------------------------------------------------------------------------------


def test_reward_eval_equals_scoring_each_sequence_directly() -> None:
    model, tokenizer = _head_model(num_labels=1)
    got = evaluate_reward_model(model, tokenizer, PAIRS, batch_size=3)

    def score(pair: dict, side: str) -> float:
        text = tokenizer.apply_chat_template([*pair["prompt"], *pair[side]], tokenize=False)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            return model(**enc).logits[0, 0].item()

    margins = [score(p, "chosen") - score(p, "rejected") for p in PAIRS]
    assert got["margins"] == pytest.approx(margins, abs=1e-5)
    assert got["per_example"] == [m > 0 for m in margins]
    assert got["reward_accuracy"] == np.mean([m > 0 for m in margins])
    assert got["reward_margin_mean"] == pytest.approx(np.mean(margins), abs=1e-5)
    assert got["n"] == len(PAIRS)
    # plain strings are accepted and mean the same as the canonical message lists
    plain = [
        {
            "prompt": p["prompt"][0]["content"],
            "chosen": p["chosen"][0]["content"],
            "rejected": "I do not know.",
        }
        for p in PAIRS
    ]
    assert evaluate_reward_model(model, tokenizer, plain)["margins"] == pytest.approx(
        got["margins"], abs=1e-6
    )


# -- DPO implicit reward --------------------------------------------------------------------------


def test_implicit_reward_is_zero_when_policy_is_the_reference(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    got = evaluate_dpo_implicit_reward(model, model, tokenizer, PAIRS, beta=0.1)
    assert got["margins"] == [0.0] * len(PAIRS)
    assert got["implicit_reward_accuracy"] == 0.0  # ties are not correct
    assert got["implicit_margin_mean"] == 0.0 and got["per_example"] == [False] * len(PAIRS)


def test_implicit_reward_with_adapter_off_reference_equals_an_explicit_base_copy(tiny_lm) -> None:
    from peft import LoraConfig, get_peft_model

    base, tokenizer = tiny_lm
    policy = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    fresh = evaluate_dpo_implicit_reward(policy, None, tokenizer, PAIRS, beta=0.1)
    assert fresh["margins"] == [0.0] * len(PAIRS) and fresh["implicit_reward_accuracy"] == 0.0

    with torch.no_grad():  # move the adapter away from zero so policy ≠ reference
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param, generator=torch.Generator().manual_seed(3)) * 0.5)
    live = evaluate_dpo_implicit_reward(policy, None, tokenizer, PAIRS, beta=0.1)
    explicit = evaluate_dpo_implicit_reward(policy, base, tokenizer, PAIRS, beta=0.1)
    assert live["margins"] == pytest.approx(explicit["margins"], abs=1e-5)
    assert any(abs(m) > 1e-3 for m in live["margins"])
    with pytest.raises(ValueError, match="pass the reference model explicitly"):
        evaluate_dpo_implicit_reward(base, None, tokenizer, PAIRS, beta=0.1)


class BoostTokens(nn.Module):
    """The base LM with ``delta`` added to some tokens' logits: their log-probs rise, all others fall."""

    def __init__(self, base: nn.Module, token_ids: list[int], delta: float) -> None:
        super().__init__()
        self.base = base
        bonus = torch.zeros(base.config.vocab_size)
        bonus[token_ids] = delta
        self.register_buffer("bonus", bonus)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None, logits_to_keep=0):
        out = self.base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
        )
        return SimpleNamespace(logits=out.logits + self.bonus)


def _response_logp(model: nn.Module, tokenizer, pair: dict, side: str) -> float:
    """Sum of the response tokens' log-probs for one unpadded sequence, written out by hand."""
    enc = encode_response(tokenizer, pair["prompt"], pair[side], None)
    ids, labels = torch.tensor([enc.input_ids]), torch.tensor(enc.labels)
    with torch.no_grad():
        logps = F.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
    keep = labels[1:] != -100
    return float(logps[keep].gather(-1, labels[1:][keep, None]).sum())


def test_raising_the_chosen_answers_log_prob_makes_every_pair_correct(tiny_lm) -> None:
    base, tokenizer = tiny_lm
    chosen_tokens = {
        t for p in PAIRS for t in encode_response(tokenizer, p["prompt"], p["chosen"], None).labels
    }
    rejected_tokens = {
        t for p in PAIRS for t in encode_response(tokenizer, p["prompt"], p["rejected"], None).labels
    }
    policy = BoostTokens(base, sorted(chosen_tokens - rejected_tokens - {-100}), delta=3.0)
    beta = 0.5
    got = evaluate_dpo_implicit_reward(policy, base, tokenizer, PAIRS, beta=beta, batch_size=3)

    expected = [
        beta * (_response_logp(policy, tokenizer, p, "chosen") - _response_logp(base, tokenizer, p, "chosen"))
        - beta
        * (_response_logp(policy, tokenizer, p, "rejected") - _response_logp(base, tokenizer, p, "rejected"))
        for p in PAIRS
    ]
    assert got["margins"] == pytest.approx(expected, abs=1e-4)
    assert got["implicit_reward_accuracy"] == 1.0 and got["per_example"] == [True] * len(PAIRS)
    assert got["chosen_mean"] > 0 > got["rejected_mean"]


# -- generation timing ----------------------------------------------------------------------------


def test_measure_generation_with_a_fake_clock(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    prompts = ["Say hi", "Count to three please", "Name a colour", "What is two plus two", "Say bye"]
    ticks = iter([0.0, 0.1, 1.0, 1.3, 2.0, 2.2])  # three batches: 0.1 s, 0.3 s, 0.2 s
    calls = itertools.count()

    def clock() -> float:
        next(calls)
        return next(ticks)

    got = measure_generation(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, warmup=1, timer=clock)

    expected_tokens = 0
    for batch in (prompts[0:2], prompts[2:4], prompts[4:]):
        enc = tokenizer(
            batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False
        )
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected_tokens += count_generated(
            out[:, enc["input_ids"].size(1) :], stop_token_ids(model, tokenizer)
        )
    assert next(calls) == 6  # warm-up is untimed: two readings per timed batch only
    assert got["generated_tokens"] == expected_tokens > 0
    assert got["tokens_per_s"] == pytest.approx(expected_tokens / 0.6)
    latencies = [100.0, 100.0, 300.0, 300.0, 200.0]
    assert got["latency_p50_ms"] == pytest.approx(np.percentile(latencies, 50))
    assert got["latency_p95_ms"] == pytest.approx(np.percentile(latencies, 95))
    assert got["n_requests"] == 5
    assert got["peak_rss_mb"] > 0 and "peak_memory_mb" not in got


@pytest.mark.gpu
def test_measure_generation_reports_cuda_allocator_peak(tiny_lm) -> None:
    base, tokenizer = tiny_lm
    model = copy.deepcopy(base).to("cuda")
    got = measure_generation(model, tokenizer, ["Say hi", "Say bye"], max_new_tokens=4)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    assert got["peak_memory_mb"] >= weights_mb and "peak_rss_mb" not in got
