"""Evaluation metrics as pure functions over lists of strings and numbers.

Each score is computed by the library the field reports it with (rouge-score, sacrebleu,
scikit-learn), so a number from tunelab can be compared with a number in a paper or a model card.
Only the SQuAD normalisation and the loss/perplexity arithmetic are written here, being one line each.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import asdict, dataclass
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
OTHER_LABEL = "<other>"
"""Column of the confusion matrix that counts predictions outside the label set."""


def normalise_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(gold)


def accuracy(predictions: list[str], golds: list[str]) -> float:
    if not golds:
        return float("nan")
    return sum(p == g for p, g in zip(predictions, golds)) / len(golds)


def _check_pairs(predictions: list[str], references: list[str], what: str = "references") -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} {what}; pass one per example"
        )


def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer  # noqa: PLC0415  (nltk import is slow; only when used)

    return RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def per_example_generation_scores(predictions: list[str], references: list[str]) -> dict[str, list[float]]:
    """Exact match (0/1) and ROUGE-L F1 per example: the units a bootstrap resamples."""
    _check_pairs(predictions, references)
    scorer = _rouge_scorer()
    return {
        "exact_match": [float(exact_match(p, r)) for p, r in zip(predictions, references)],
        "rougeL": [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)],
    }


def generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact match and ROUGE-1/2/L F1 (means over examples), corpus BLEU and chrF (sacrebleu, 0..100).

    BLEU and chrF are corpus statistics (n-gram counts pooled before the ratio), as sacrebleu
    reports them; averaging sentence BLEU instead gives a different, non-standard number.
    """
    _check_pairs(predictions, references)
    if not predictions:
        return {key: float("nan") for key in ("exact_match", *ROUGE_TYPES, "bleu", "chrf")}
    import sacrebleu  # noqa: PLC0415

    scorer = _rouge_scorer()
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    n = len(predictions)
    out = {"exact_match": sum(exact_match(p, r) for p, r in zip(predictions, references)) / n}
    for kind in ROUGE_TYPES:
        out[kind] = sum(s[kind].fmeasure for s in scores) / n
    out["bleu"] = sacrebleu.corpus_bleu(predictions, [references]).score
    out["chrf"] = sacrebleu.corpus_chrf(predictions, [references]).score
    return out


@dataclass
class ClassificationReport:
    """Scores of predicted labels against gold labels over a fixed label set.

    ``confusion`` has one row per gold label and one column per label plus a last column,
    ``OTHER_LABEL``, counting predictions outside the label set (a generated answer that names no
    label). Those predictions are wrong: they lower accuracy and the recall of their gold class, but
    they are no label's false positive, so they do not lower any label's precision. Macro averages
    are over the label set only.
    """

    accuracy: float
    macro_precision: float
    macro_recall: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    labels: list[str]
    confusion: list[list[int]]
    out_of_label_rate: float
    n: int

    @property
    def confusion_columns(self) -> list[str]:
        return [*self.labels, OTHER_LABEL]

    def as_metrics(self) -> dict[str, float]:
        """Flat name → value, for metrics.jsonl and result tables."""
        flat = {
            "accuracy": self.accuracy,
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "out_of_label_rate": self.out_of_label_rate,
        }
        return flat | {f"f1/{label}": self.per_class[label]["f1"] for label in self.labels}

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"confusion_columns": self.confusion_columns}


def _check_labels(golds: list[str], labels: list[str]) -> None:
    if not labels:
        raise ValueError("labels is empty; pass the label set, e.g. ['positive', 'negative']")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels has duplicates: {labels}; list each label once")
    if OTHER_LABEL in labels:
        raise ValueError(f"{OTHER_LABEL!r} is reserved for out-of-label predictions; rename that label")
    unknown = sorted(set(golds) - set(labels))
    if unknown:
        raise ValueError(f"gold label(s) {unknown} are not in labels {labels}; add them to labels")


def classification_metrics(
    predictions: list[str], golds: list[str], labels: list[str]
) -> ClassificationReport:
    """Accuracy, macro and per-class precision/recall/F1 and the confusion matrix (scikit-learn)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support  # noqa: PLC0415

    _check_pairs(predictions, golds, "golds")
    _check_labels(golds, labels)
    n = len(golds)
    mapped = [p if p in labels else OTHER_LABEL for p in predictions]
    columns = [*labels, OTHER_LABEL]
    if n == 0:
        zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
        nan = float("nan")
        confusion = [[0] * len(columns) for _ in labels]
        return ClassificationReport(
            nan, nan, nan, nan, {x: dict(zero) for x in labels}, list(labels), confusion, nan, 0
        )
    precision, recall, f1, support = precision_recall_fscore_support(
        golds, mapped, labels=labels, zero_division=0
    )
    # Gold labels are all in the label set, so the OTHER_LABEL row is all zeros: drop it.
    confusion = confusion_matrix(golds, mapped, labels=columns)[: len(labels)]
    per_class = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    return ClassificationReport(
        accuracy=sum(p == g for p, g in zip(mapped, golds)) / n,
        macro_precision=float(precision.mean()),
        macro_recall=float(recall.mean()),
        macro_f1=float(f1.mean()),
        per_class=per_class,
        labels=list(labels),
        confusion=confusion.tolist(),
        out_of_label_rate=mapped.count(OTHER_LABEL) / n,
        n=n,
    )


def lm_metrics(loss_sum: float, n_tokens: int) -> dict[str, float]:
    """Token-weighted mean loss and perplexity = exp(mean loss).

    Weighting by tokens (sum of token losses / number of tokens) is the perplexity of the corpus;
    a mean of per-example means over-weights short answers.
    """
    if n_tokens <= 0:
        return {"loss": float("nan"), "perplexity": float("nan")}
    mean = loss_sum / n_tokens
    try:
        perplexity = math.exp(mean)
    except OverflowError:
        perplexity = float("inf")
    return {"loss": mean, "perplexity": perplexity}
