"""Robustness perturbations, the safety classifier probe and the bias probe."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from tunelab.evaluate.compare import EvalPlan, evaluate_models
from tunelab.evaluate.probes import (
    SafetyClassifier,
    bias_report,
    load_bias_probe,
    pick_unsafe_label,
    unsafe_share,
)
from tunelab.evaluate.robustness import (
    DISTRACTORS,
    PERTURBATIONS,
    add_typos,
    perturb_conversation,
    perturb_text,
    robustness_report,
)
from tunelab.evaluate.run import evaluate_model, load_for_eval
from tunelab.models.tiny import build_tiny_tokenizer, save_tiny_model

TEXT = "Classify the sentiment of this movie review as positive or negative. A wonderful, moving picture."
CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": TEXT},
    {"role": "assistant", "content": "positive"},
]
SENTIMENT = [
    ("a fine film", "positive"),
    ("dull and far too long", "negative"),
    ("great", "positive"),
    ("bad acting, bad plot", "negative"),
]


def _sentiment_data(tmp_path: Path) -> str:
    rows = [{"instruction": f"Sentiment of: {r}", "output": label} for r, label in SENTIMENT]
    path = tmp_path / "sentiment.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---- robustness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PERTURBATIONS))
def test_perturbations_are_deterministic_per_seed_and_change_the_text(name):
    assert perturb_text(TEXT, name, seed=1) == perturb_text(TEXT, name, seed=1)
    assert perturb_text(TEXT, name, seed=1) != TEXT
    draws = {perturb_text(TEXT, name, seed=s) for s in range(8)}
    assert len(draws) > 1  # the seed matters


def test_typos_swap_or_drop_one_inner_letter_per_changed_word():
    rng = random.Random(0)
    out = add_typos(TEXT, rng, rate=0.5)
    before, after = TEXT.split(), out.split()
    assert len(before) == len(after)
    changed = [(b, a) for b, a in zip(before, after) if a != b]
    assert changed
    for b, a in changed:
        assert a[0] == b[0] and a[-1] == b[-1]  # first and last letters stay
        dropped = len(a) == len(b) - 1 and any(b[:i] + b[i + 1 :] == a for i in range(len(b)))
        swapped = len(a) == len(b) and sorted(a) == sorted(b) and sum(x != y for x, y in zip(a, b)) == 2
        assert dropped or swapped, (b, a)


def test_casing_whitespace_and_distractors_change_only_what_they_say():
    cased = perturb_text(TEXT, "casing", seed=0)
    assert cased in (TEXT.upper(), TEXT.lower())
    spaced = perturb_text(TEXT, "whitespace", seed=0)
    assert spaced.split() == TEXT.split() and spaced != TEXT
    noisy = perturb_text(TEXT, "distractors", seed=0)
    assert noisy.startswith(TEXT + "\n\n")
    appended = noisy[len(TEXT) + 2 :]
    used = [s for s in DISTRACTORS if s in appended]
    assert len(used) == 2 and len(appended) == sum(map(len, used)) + 1


def test_perturbing_a_conversation_keeps_the_answer_and_other_turns():
    for name in PERTURBATIONS:
        out = perturb_conversation(CONV, name, seed=0, index=3)
        assert out[0] == CONV[0] and out[2] == CONV[2]
        assert out[1]["content"] == perturb_text(TEXT, name, 0, 3)
    assert CONV[1]["content"] == TEXT  # the input is not modified in place


def test_robustness_report_drop_is_clean_minus_perturbed():
    report = robustness_report({"m": 0.8}, {"typos": {"m": 0.65}}, "accuracy_loglik", seed=0)
    assert report["perturbations"]["typos"]["m"] == {"value": 0.65, "drop": pytest.approx(0.15)}


def test_eval_robustness_values_equal_evaluating_perturbed_prompts(tmp_path):
    data = _sentiment_data(tmp_path)
    payload = evaluate_models(
        [("model", "tiny:llama")], data, EvalPlan(max_new_tokens=1, robustness=True, seed=5)
    )
    report = payload["robustness"]
    assert report["metric"] == "accuracy_loglik"
    model, tok = load_for_eval("tiny:llama")
    convs = [
        [{"role": "user", "content": f"Sentiment of: {r}"}, {"role": "assistant", "content": label}]
        for r, label in SENTIMENT
    ]
    name = payload["models"][0]["name"]
    clean = report["clean"][name]
    for pert in PERTURBATIONS:
        perturbed = [perturb_conversation(c, pert, 5, i) for i, c in enumerate(convs)]
        direct, _ = evaluate_model(model, tok, perturbed, name="x", max_new_tokens=1)
        entry = report["perturbations"][pert][name]
        assert entry["value"] == pytest.approx(direct.accuracy_loglik)
        assert entry["drop"] == pytest.approx(clean - entry["value"])
        assert payload["models"][0]["metrics"][f"robustness_drop_{pert}"] == pytest.approx(entry["drop"])


# ---- safety classifier ---------------------------------------------------------------------------


def _tiny_classifier(path: Path, id2label: dict[int, str]) -> Path:
    """A random 2-layer Llama sequence classifier saved with the tiny tokenizer; nothing downloaded."""
    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        model.score.weight.normal_(0, 2.0)  # spread the probabilities so a threshold splits them
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _direct_probabilities(path: Path, texts: list[str], index: int) -> list[float]:
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = build_tiny_tokenizer()
    with torch.no_grad():
        return [
            float(model(**tok(t or " ", return_tensors="pt")).logits.softmax(-1)[0, index]) for t in texts
        ]


def test_unsafe_label_choice():
    assert pick_unsafe_label({0: "non-toxic", 1: "toxic"}) == 1
    assert pick_unsafe_label({0: "UNSAFE", 1: "safe"}) == 0
    assert pick_unsafe_label({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}) == 1
    assert pick_unsafe_label({0: "a", 1: "b"}, "0") == 0
    assert pick_unsafe_label({0: "a", 1: "b"}, "B") == 1
    with pytest.raises(ValueError, match="0=a, 1=b"):
        pick_unsafe_label({0: "a", 1: "b"}, "toxic")


def test_safety_probabilities_match_the_classifier_run_one_text_at_a_time(tmp_path):
    path = _tiny_classifier(tmp_path / "clf", {0: "toxic", 1: "neutral"})
    texts = ["hello there", "you are awful and I hate this", "", "a much longer text " * 5]
    classifier = SafetyClassifier(str(path), batch_size=3)
    assert classifier.label_index == 0 and classifier.label_name == "toxic"
    got = classifier.unsafe_probabilities(texts)
    assert got == pytest.approx(_direct_probabilities(path, texts, 0), abs=1e-5)


def test_eval_reports_unsafe_share_of_generations_before_and_after(tmp_path):
    path = _tiny_classifier(tmp_path / "clf", {0: "ok", 1: "unsafe"})
    other = save_tiny_model(tmp_path / "other", seed=3)  # a second model that writes other text
    data = _sentiment_data(tmp_path)
    convs = [
        [{"role": "user", "content": f"Sentiment of: {r}"}, {"role": "assistant", "content": label}]
        for r, label in SENTIMENT
    ]
    probs = {}
    for spec in ("tiny:llama", str(other)):
        model, tok = load_for_eval(spec)
        generations = evaluate_model(model, tok, convs, name="x", max_new_tokens=4)[0].generations
        probs[spec] = _direct_probabilities(path, generations, 1)
    pooled = sorted(p for values in probs.values() for p in values)
    threshold = (pooled[0] + pooled[-1]) / 2
    plan = EvalPlan(max_new_tokens=4, safety_classifier=str(path), safety_threshold=threshold)
    payload = evaluate_models([("base", "tiny:llama"), ("tuned", str(other))], data, plan)
    safety = payload["probes"]["safety"]
    assert safety["label"] == "unsafe" and safety["threshold"] == threshold
    shares = []
    for entry in payload["models"]:
        expected = sum(p > threshold for p in probs[entry["name"]]) / len(convs)
        assert safety["models"][entry["name"]]["unsafe_share"] == pytest.approx(expected)
        assert entry["metrics"]["unsafe_share"] == pytest.approx(expected)
        assert unsafe_share(probs[entry["name"]], threshold) == pytest.approx(expected)
        shares.append(expected)
    assert shares[0] != shares[1]  # the threshold separates the two models' generations


# ---- bias probe ----------------------------------------------------------------------------------


def _probe_file(tmp_path: Path, probe: dict) -> Path:
    path = tmp_path / "probe.json"
    path.write_text(json.dumps(probe), encoding="utf-8")
    return path


PROBE = {
    "templates": [
        {"prompt": "The {group} critic loved the film. Sentiment?", "answer": "positive"},
        {"prompt": "The {group} critic hated the film. Sentiment?", "answer": "negative"},
        {"prompt": "A {group} viewer walked out early. Sentiment?", "answer": "negative"},
    ],
    "groups": ["young", "elderly", "foreign"],
    "labels": ["positive", "negative"],
}


def test_bias_probe_file_is_validated(tmp_path):
    bad = {"templates": [{"prompt": "no slot here", "answer": "x"}], "groups": ["a"], "extra": 1}
    with pytest.raises(ValueError) as err:
        load_bias_probe(_probe_file(tmp_path, bad))
    message = str(err.value)
    assert "unknown key 'extra'" in message and "at least two groups" in message and "{group}" in message
    probe = load_bias_probe(_probe_file(tmp_path, PROBE))
    assert probe.conversations("elderly")[0][0]["content"] == "The elderly critic loved the film. Sentiment?"


def test_bias_report_spread_is_max_minus_min():
    report = bias_report({"m": {"a": 0.5, "b": 0.75, "c": 0.25}}, "accuracy_loglik")
    assert report["models"]["m"]["spread"] == pytest.approx(0.5)


def test_eval_bias_probe_per_group_equals_direct_evaluation(tmp_path):
    probe_path = _probe_file(tmp_path, PROBE)
    data = _sentiment_data(tmp_path)
    payload = evaluate_models(
        [("model", "tiny:llama")], data, EvalPlan(max_new_tokens=1, bias_probe=str(probe_path))
    )
    bias = payload["probes"]["bias"]
    assert bias["metric"] == "accuracy_loglik"
    name = payload["models"][0]["name"]
    per_group = bias["models"][name]["per_group"]
    probe = load_bias_probe(probe_path)
    model, tok = load_for_eval("tiny:llama")
    for group in PROBE["groups"]:
        direct, _ = evaluate_model(
            model, tok, probe.conversations(group), name="x", labels=PROBE["labels"], max_new_tokens=1
        )
        assert per_group[group] == pytest.approx(direct.accuracy_loglik)
    spread = max(per_group.values()) - min(per_group.values())
    assert bias["models"][name]["spread"] == pytest.approx(spread)
    assert payload["models"][0]["metrics"]["bias_spread"] == pytest.approx(spread)
