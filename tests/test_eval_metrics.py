"""Evaluation metrics, each cross-checked against the library that defines it on fixed inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu
import torch
import torch.nn.functional as F
from rouge_score.rouge_scorer import RougeScorer
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from tunelab.evaluate.efficiency import count_generated, generation_summary
from tunelab.evaluate.metrics import (
    OTHER_LABEL,
    classification_metrics,
    generation_metrics,
    lm_metrics,
    per_example_generation_scores,
)

PREDICTIONS = [
    "The cat sat on the mat.",
    "hello world",
    "Running quickly to the stores",
    "four",
    "an entirely unrelated sentence",
]
REFERENCES = [
    "A cat sat on a mat",
    "hello there world",
    "He runs quickly to the store",
    "Four.",
    "the answer is blue",
]


def test_generation_metrics_match_rouge_score_and_sacrebleu() -> None:
    got = generation_metrics(PREDICTIONS, REFERENCES)
    scorer = RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    scores = [scorer.score(r, p) for p, r in zip(PREDICTIONS, REFERENCES)]
    for kind in ("rouge1", "rouge2", "rougeL"):
        assert got[kind] == pytest.approx(np.mean([s[kind].fmeasure for s in scores]), abs=1e-9)
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, [REFERENCES]).score, abs=1e-9)
    # SQuAD normalisation: articles and punctuation ignored, so examples 0 and 3 match
    assert got["exact_match"] == pytest.approx(2 / 5)
    # the stemmer is on: "Running"/"runs" and "stores"/"store" count as the same unigram
    assert scorer.score(REFERENCES[2], PREDICTIONS[2])["rouge1"].fmeasure > (
        RougeScorer(["rouge1"]).score(REFERENCES[2], PREDICTIONS[2])["rouge1"].fmeasure
    )


def test_per_example_scores_average_to_the_corpus_means() -> None:
    per = per_example_generation_scores(PREDICTIONS, REFERENCES)
    assert per["exact_match"] == [1.0, 0.0, 0.0, 1.0, 0.0]
    scorer = RougeScorer(["rougeL"], use_stemmer=True)
    assert per["rougeL"] == [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(PREDICTIONS, REFERENCES)]
    corpus = generation_metrics(PREDICTIONS, REFERENCES)
    assert np.mean(per["rougeL"]) == pytest.approx(corpus["rougeL"], abs=1e-12)


def test_generation_metrics_reject_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        generation_metrics(["a", "b"], ["a"])


def test_classification_hand_computed_example() -> None:
    # a: TP 1, FP 1 (gold b), FN 0; b: TP 1, FP 0, FN 2 (one predicted a, one out of label)
    report = classification_metrics(["a", "b", "maybe", "a"], ["a", "b", "b", "b"], ["a", "b"])
    assert report.accuracy == 0.5
    assert report.per_class["a"] == {
        "precision": 0.5,
        "recall": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 1,
    }
    assert report.per_class["b"] == {
        "precision": 1.0,
        "recall": pytest.approx(1 / 3),
        "f1": 0.5,
        "support": 3,
    }
    assert report.macro_precision == 0.75
    assert report.macro_recall == pytest.approx(2 / 3)
    assert report.macro_f1 == pytest.approx((2 / 3 + 0.5) / 2)
    assert report.out_of_label_rate == 0.25
    assert report.confusion == [[1, 0, 0], [1, 1, 1]]
    assert report.confusion_columns == ["a", "b", OTHER_LABEL]
    assert report.n == 4
    assert report.as_metrics() == {
        "accuracy": 0.5,
        "macro_precision": 0.75,
        "macro_recall": pytest.approx(2 / 3),
        "macro_f1": pytest.approx(7 / 12),
        "out_of_label_rate": 0.25,
        "f1/a": pytest.approx(2 / 3),
        "f1/b": 0.5,
    }
    dumped = report.to_json()
    assert dumped["confusion"] == report.confusion and dumped["per_class"]["b"]["support"] == 3


def test_classification_matches_sklearn_directly() -> None:
    rng = np.random.default_rng(0)
    labels = ["neg", "neu", "pos"]
    golds = rng.choice(labels, 60).tolist()
    predictions = rng.choice([*labels, "unsure", ""], 60, p=[0.3, 0.2, 0.3, 0.1, 0.1]).tolist()
    report = classification_metrics(predictions, golds, labels)

    mapped = [p if p in labels else "__none__" for p in predictions]
    p, r, f, s = precision_recall_fscore_support(golds, mapped, labels=labels, zero_division=0)
    macro = precision_recall_fscore_support(golds, mapped, labels=labels, average="macro", zero_division=0)
    assert [report.per_class[x]["precision"] for x in labels] == p.tolist()
    assert [report.per_class[x]["recall"] for x in labels] == r.tolist()
    assert [report.per_class[x]["f1"] for x in labels] == f.tolist()
    assert [report.per_class[x]["support"] for x in labels] == s.tolist()
    assert (report.macro_precision, report.macro_recall, report.macro_f1) == pytest.approx(
        macro[:3], abs=1e-12
    )
    assert report.accuracy == sum(a == b for a, b in zip(predictions, golds)) / 60
    full = confusion_matrix(golds, mapped, labels=[*labels, "__none__"])
    assert report.confusion == full[:3].tolist()
    assert report.out_of_label_rate == sum(x not in labels for x in predictions) / 60
    assert sum(map(sum, report.confusion)) == 60


def test_classification_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"gold label\(s\) \['c'\] are not in labels"):
        classification_metrics(["a"], ["c"], ["a", "b"])
    with pytest.raises(ValueError, match="duplicates"):
        classification_metrics(["a"], ["a"], ["a", "a"])
    with pytest.raises(ValueError, match="1 predictions but 2 golds"):
        classification_metrics(["a"], ["a", "b"], ["a", "b"])


def test_lm_metrics_weight_by_tokens_like_cross_entropy_over_all_tokens() -> None:
    torch.manual_seed(0)
    lengths = [2, 9]  # unequal on purpose: a mean of per-example means would differ
    logits = [torch.randn(n, 11, dtype=torch.float64) for n in lengths]
    targets = [torch.randint(0, 11, (n,)) for n in lengths]
    loss_sum = sum(float(F.cross_entropy(x, y, reduction="sum")) for x, y in zip(logits, targets))
    got = lm_metrics(loss_sum, sum(lengths))

    expected = F.cross_entropy(torch.cat(logits), torch.cat(targets)).item()
    per_example_mean = np.mean([F.cross_entropy(x, y).item() for x, y in zip(logits, targets)])
    assert got["loss"] == pytest.approx(expected, abs=1e-9)
    assert got["perplexity"] == pytest.approx(math.exp(expected), rel=1e-9)
    assert abs(got["loss"] - per_example_mean) > 1e-3
    assert math.isnan(lm_metrics(0.0, 0)["loss"])
    assert lm_metrics(1e6, 1)["perplexity"] == float("inf")


def test_generation_summary_arithmetic() -> None:
    # three batches of 2, 2 and 1 requests taking 0.1 s, 0.3 s and 0.2 s; 50 tokens generated
    got = generation_summary([0.1, 0.3, 0.2], [2, 2, 1], 50)
    latencies = [100.0, 100.0, 300.0, 300.0, 200.0]
    assert got["tokens_per_s"] == pytest.approx(50 / 0.6)
    assert got["latency_p50_ms"] == pytest.approx(np.percentile(latencies, 50)) == pytest.approx(200.0)
    assert got["latency_p95_ms"] == pytest.approx(np.percentile(latencies, 95)) == pytest.approx(300.0)
    assert got["n_requests"] == 5 and got["generated_tokens"] == 50


def test_count_generated_stops_at_the_first_stop_token() -> None:
    new = torch.tensor([[5, 6, 2, 2, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]])
    assert count_generated(new, [2]) == 3 + 5 + 1
