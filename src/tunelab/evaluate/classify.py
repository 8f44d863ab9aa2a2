"""Evaluation of a run trained with the ``classify`` objective: predict with its head, score with sklearn.

The texts are encoded and batched by :class:`~tunelab.objectives.classify.ClassifyObjective` itself
(same tokenizer call, truncation and right padding, same last-token pooling), so evaluation sees
exactly what training saw. Label names come from the model config's ``id2label``, which the
objective wrote when it built the head.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunelab.evaluate.metrics import ClassificationReport, classification_metrics
from tunelab.objectives.classify import ClassifyConfig, ClassifyObjective, sequence_scores
from tunelab.objectives.dpo import model_device


def head_labels(model: nn.Module) -> list[str]:
    """Label names in head-output order, from ``config.id2label``."""
    config = model.config
    id2label = {int(i): str(name) for i, name in (getattr(config, "id2label", None) or {}).items()}
    n = int(getattr(config, "num_labels", len(id2label)))
    missing = [i for i in range(n) if i not in id2label]
    if missing:
        raise ValueError(
            f"model config id2label has no name for output(s) {missing}; "
            "this does not look like a model trained with objective 'classify'"
        )
    return [id2label[i] for i in range(n)]


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd, restoring the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def predict_ids(
    objective: ClassifyObjective, model: nn.Module, texts: list[str], batch_size: int
) -> list[int]:
    """Argmax of the head over ``texts``, encoded and padded by the objective."""
    device = model_device(model)
    placeholder = objective.label_names[0]  # encode() wants a label; predictions do not use it
    features = [objective.encode(i, {"text": t, "label": placeholder}) for i, t in enumerate(texts)]
    predicted: list[int] = []
    with inference(model):
        for start in range(0, len(features), batch_size):
            batch = objective.collate(features[start : start + batch_size])
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            predicted += sequence_scores(model, batch).argmax(-1).tolist()
    return predicted


def evaluate_classifier(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    golds: list[str],
    *,
    batch_size: int = 16,
    max_length: int = 512,
) -> tuple[ClassificationReport, list[str]]:
    """Predicted label per text and the classification report against ``golds``."""
    if len(texts) != len(golds):
        raise ValueError(f"got {len(texts)} texts but {len(golds)} gold labels; pass one label per text")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    labels = head_labels(model)
    unknown = sorted(set(golds) - set(labels))
    if unknown:
        raise ValueError(
            f"gold label(s) {unknown} are not among the model's labels {labels} (config.id2label); "
            "evaluate on data with the labels the model was trained on"
        )
    objective = ClassifyObjective(
        ClassifyConfig(labels=labels), tokenizer, SimpleNamespace(max_length=max_length)
    )
    predictions = [labels[i] for i in predict_ids(objective, model, texts, batch_size)]
    return classification_metrics(predictions, golds, labels), predictions
