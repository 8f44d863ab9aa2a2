"""`tunelab eval`: evaluate a base model or a run's final model on a dataset, the same way every time."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from tunelab.console import make_console, progress
from tunelab.data.canonical import read_canonical
from tunelab.data.formats import prompt_text, target_text
from tunelab.data.templates import select_template, split_prompt_answer
from tunelab.evaluate.lm import LMEval, evaluate_conversations
from tunelab.evaluate.metrics import accuracy, exact_match, normalise_answer
from tunelab.models.load import MODEL_CLASSES, load_model

FINAL_META = "tunelab.json"
MAX_INFERRED_LABELS = 20
PREFERENCE_POLICY_OBJECTIVES = ("dpo", "simpo", "orpo", "kto")
TaskKind = Literal["lm", "classify", "reward", "preference"]


@dataclass
class EvalResult:
    """One model on one dataset. ``metrics`` is the flat name → value view every table, gate and report
    reads; ``per_example`` holds the per-example scores (1/0 for correct, or a score) that a paired
    bootstrap resamples; the named fields before them are kept for callers written against them."""

    model: str
    n: int
    loss: float
    perplexity: float
    accuracy_loglik: float | None
    exact_match: float
    labels: list[str] | None
    metrics: dict[str, float] = field(default_factory=dict)
    per_example: dict[str, list[float]] = field(default_factory=dict)
    generations: list[str] = field(default_factory=list)
    label_predictions: list[str] = field(default_factory=list)
    confusion_matrices: dict[str, dict[str, Any]] = field(default_factory=dict)


def final_dir_of(spec: str) -> Path | None:
    """A run directory or its ``final/`` → the ``final/`` folder; anything else → None."""
    path = Path(spec)
    for candidate in (path / "final", path):
        if (candidate / FINAL_META).exists():
            return candidate
    return None


def run_meta(spec: str) -> dict[str, Any] | None:
    """A run's ``final/tunelab.json`` (objective, head, base model), or None for a plain model spec."""
    final = final_dir_of(spec)
    return None if final is None else json.loads((final / FINAL_META).read_text(encoding="utf-8"))


def run_dir_of(spec: str) -> Path | None:
    """The run directory of a run spec (given as the run or as its ``final/``), else None."""
    final = final_dir_of(spec)
    if final is None:
        return None
    return final.parent if final.name == "final" else final


def load_for_eval(
    spec: str, *, device: str = "auto", dtype: str = "auto", head_meta: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    """Load a base model (hub id, dir, .gguf, tiny:llama, asset:NAME) or a tunelab run's trained model.

    ``head_meta`` (another run's ``tunelab.json``) puts that run's head on a plain base model, so the
    base of a classification or reward run is measured through the same kind of head."""
    final = final_dir_of(spec)
    if final is None and (Path(spec) / "adapter_config.json").is_file():
        return load_adapter_dir(Path(spec), device=device, dtype=dtype)
    if final is None:
        if head_meta and head_meta.get("model_kind", "causal_lm") != "causal_lm":
            head = {
                "model_cls": MODEL_CLASSES[head_meta["model_kind"]],
                "model_kwargs": head_kwargs(head_meta),
            }
            return load_model(spec, device=device, dtype=dtype, seed=head_meta.get("seed", 0), **head)
        return load_model(spec, device=device, dtype=dtype)
    meta = json.loads((final / FINAL_META).read_text(encoding="utf-8"))
    artifact = meta.get("artifact") or ("peft" if meta.get("is_adapter") else "full")
    head = {
        "model_cls": MODEL_CLASSES[meta.get("model_kind", "causal_lm")],
        "model_kwargs": head_kwargs(meta),
    }
    if artifact == "full":
        return load_model(str(final), device=device, dtype=dtype, **head)
    from transformers import AutoTokenizer  # noqa: PLC0415

    base, _ = load_model(meta["base_model"], device=device, dtype=dtype, seed=meta.get("seed", 0), **head)
    tokenizer = AutoTokenizer.from_pretrained(str(final))
    if artifact == "peft":
        from peft import PeftModel  # noqa: PLC0415  (only needed for adapter runs)

        return PeftModel.from_pretrained(base, str(final)), tokenizer
    from tunelab.methods import METHODS  # noqa: PLC0415

    entry = METHODS.get(meta["method"])
    cfg = entry.config_cls.model_validate(meta["method_config"])
    return entry.impl.load(base, final, cfg), tokenizer


def load_adapter_dir(path: Path, *, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """An adapter in PEFT's format (``tunelab export --adapter``) on its base; the base may be a tunelab
    spec (``tiny:llama`` with the seed its export recorded) that plain PEFT could not load."""
    from peft import PeftModel  # noqa: PLC0415
    from transformers import AutoTokenizer  # noqa: PLC0415

    config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    export_meta = path / "tunelab_export.json"
    provenance = json.loads(export_meta.read_text(encoding="utf-8")) if export_meta.is_file() else {}
    seed = provenance.get("base_model_seed") or 0
    base, _ = load_model(config["base_model_name_or_path"], device=device, dtype=dtype, seed=seed)
    return PeftModel.from_pretrained(base, str(path)), AutoTokenizer.from_pretrained(str(path))


def head_kwargs(meta: dict[str, Any]) -> dict[str, Any]:
    """Head arguments as saved; JSON turned ``id2label``'s integer keys into strings."""
    kwargs = dict(meta.get("model_kwargs") or {})
    if "id2label" in kwargs:
        kwargs["id2label"] = {int(k): v for k, v in kwargs["id2label"].items()}
    return kwargs


def infer_labels(golds: list[str]) -> list[str] | None:
    """A closed answer set when the gold answers are few distinct strings (a label-style task)."""
    distinct = sorted(set(golds))
    if 1 < len(distinct) <= min(MAX_INFERRED_LABELS, len(golds) // 2):
        return distinct
    return None


@dataclass
class EvalTask:
    """The examples every model is measured on, loaded once so base and tuned see identical inputs.

    ``kind`` follows the run's objective: ``lm`` (answers of a chat/instruction model), ``classify``
    (a classification head), ``reward`` (a reward model ranking pairs), ``preference`` (a DPO-family
    policy's implicit reward on pairs)."""

    kind: TaskKind
    data: str
    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    golds: list[str] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    labels: list[str] | None = None
    meta: dict[str, Any] | None = None
    beta: float = 0.1
    max_length: int | None = None  # the run's data.max_length (classifier inputs are cut as in training)

    @property
    def n(self) -> int:
        return len(self.conversations or self.texts or self.pairs)

    @property
    def main_metric(self) -> str:
        if self.kind == "classify":
            return "accuracy"
        if self.kind == "reward":
            return "reward_accuracy"
        if self.kind == "preference":
            return "implicit_reward_accuracy"
        return "accuracy_loglik" if self.labels else "exact_match"


def task_kind(meta: dict[str, Any] | None, data_format: str) -> TaskKind:
    objective = (meta or {}).get("objective")
    if objective in ("classify", "reward"):
        return objective
    if objective in PREFERENCE_POLICY_OBJECTIVES and data_format == "preference":
        return "preference"
    return "lm"


def run_recipe(spec: str) -> dict[str, Any]:
    """The resolved recipe a run was trained with (``recipe.yaml``); empty for a plain model."""
    run = run_dir_of(spec)
    recipe = run / "recipe.yaml" if run else None
    if recipe is None or not recipe.is_file():
        return {}
    import yaml  # noqa: PLC0415

    return yaml.safe_load(recipe.read_text(encoding="utf-8")) or {}


def objective_beta(recipe: dict[str, Any], default: float = 0.1) -> float:
    """The run's ``objective.beta`` (the β its implicit reward was trained with)."""
    objective = recipe.get("objective") or {}
    return float(objective.get("beta", default))


def trained_max_length(recipe: dict[str, Any]) -> int | None:
    """The run's ``data.max_length``: a classifier is evaluated on the text it was trained to see."""
    value = (recipe.get("data") or {}).get("max_length")
    return int(value) if value else None


def load_task(
    data: str,
    subject: str,
    *,
    labels: list[str] | None = None,
    max_examples: int | None = None,
) -> EvalTask:
    """Read ``data`` the way the run ``subject`` (the model being judged) needs it."""
    meta = run_meta(subject)
    trained = run_recipe(subject)  # read once: β and max_length come from it
    rows, _, fmt = read_canonical(data)
    examples = [example for _, example in rows][:max_examples] if max_examples else [e for _, e in rows]
    kind = task_kind(meta, fmt)
    task = EvalTask(
        kind, data, meta=meta, beta=objective_beta(trained), max_length=trained_max_length(trained)
    )
    if kind == "lm":
        task.conversations = [e["messages"] for e in examples if "messages" in e]
        if not task.conversations:
            raise ValueError(f"{data}: eval needs instruction or chat data (prompt and answer); found {fmt}")
        golds = [split_prompt_answer(c)[1] for c in task.conversations]
        task.labels = labels or infer_labels(golds)
    elif kind == "classify":
        # classification rows, or chats whose answer is the label (unpaired rows' bool labels are not classes)
        usable = [e for e in examples if "text" in e and "label" in e or "messages" in e]
        if not usable:
            raise ValueError(f"{data}: a classify run is evaluated on text + label data; found {fmt}")
        task.texts = [e["text"] if "text" in e else prompt_text(e) for e in usable]
        task.golds = [e["label"] if "text" in e else target_text(e) or "" for e in usable]
    else:
        task.pairs = [e for e in examples if "chosen" in e]
        if not task.pairs:
            raise ValueError(
                f"{data}: a {meta.get('objective')} run is evaluated on preference pairs; found {fmt}"
            )
    return task


def load_conversations(
    path: str, fmt: str = "auto", columns: dict[str, str] | None = None, limit: int | None = None
) -> list[list[dict[str, str]]]:
    rows, _, _ = read_canonical(path, fmt, columns)
    conversations = [example["messages"] for _, example in rows if "messages" in example]
    if not conversations:
        raise ValueError(f"{path}: eval needs instruction or chat data (prompt and answer)")
    return conversations[:limit] if limit else conversations


def evaluate_model(
    model: Any,
    tokenizer: Any,
    conversations: list[list[dict[str, str]]],
    *,
    name: str,
    labels: list[str] | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    console: Console | None = None,
) -> tuple[EvalResult, LMEval]:
    """All metrics for one model on one set of conversations."""
    golds = [split_prompt_answer(c)[1] for c in conversations]
    labels = labels or infer_labels(golds)
    with progress(console or make_console(stderr=True), f"eval {name}", len(conversations)) as advance:
        raw = evaluate_conversations(
            model,
            tokenizer,
            conversations,
            labels=labels,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=advance,
        )
    acc = accuracy(raw.label_predictions, golds) if labels else None
    em = sum(exact_match(p, g) for p, g in zip(raw.generations, golds)) / len(golds)
    result = EvalResult(name, raw.n, raw.loss, raw.perplexity, acc, em, labels)
    result.generations, result.label_predictions = raw.generations, raw.label_predictions
    result.metrics = {"loss": raw.loss, "perplexity": raw.perplexity, "exact_match": em}
    result.per_example["exact_match"] = [float(exact_match(p, g)) for p, g in zip(raw.generations, golds)]
    if labels:
        result.metrics["accuracy_loglik"] = acc
        result.per_example["accuracy_loglik"] = [float(p == g) for p, g in zip(raw.label_predictions, golds)]
        add_label_metrics(result, raw, golds, labels)
    add_generation_metrics(result, raw.generations, golds)
    return result, raw


def add_generation_metrics(result: EvalResult, generations: list[str], golds: list[str]) -> None:
    """ROUGE/BLEU/chrF of the generated answers (exact match is already there)."""
    from tunelab.evaluate.metrics import generation_metrics, per_example_generation_scores  # noqa: PLC0415

    for key, value in generation_metrics(generations, golds).items():
        result.metrics.setdefault(key, value)
    for key, values in per_example_generation_scores(generations, golds).items():
        result.per_example.setdefault(key, values)


def as_label(generated: str, labels: list[str]) -> str:
    """A generated answer as the label it names after normalisation, else the text itself (out of set)."""
    by_norm = {normalise_answer(label): label for label in labels}
    return by_norm.get(normalise_answer(generated), generated)


def add_label_metrics(result: EvalResult, raw: LMEval, golds: list[str], labels: list[str]) -> None:
    """Per-class precision/recall/F1 and confusion twice: label chosen by log-likelihood (``*_loglik``)
    and label named by the free generation (``*_generated``, with its out-of-label-set rate)."""
    from tunelab.evaluate.metrics import classification_metrics  # noqa: PLC0415

    if set(golds) - set(labels):
        return  # answers outside the label set: not a classification task, nothing to report per class
    generated = [as_label(g, labels) for g in raw.generations]
    for suffix, predictions in (("loglik", raw.label_predictions), ("generated", generated)):
        report = classification_metrics(predictions, golds, labels)
        for key, value in report.as_metrics().items():
            if key == "out_of_label_rate" and suffix == "loglik":
                continue  # always 0: log-likelihood only ever picks a label
            result.metrics.setdefault(f"{key}_{suffix}", value)
        result.confusion_matrices[f"{result.model} ({suffix})"] = confusion_entry(report)


def confusion_entry(report: Any) -> dict[str, Any]:
    """Rows are gold labels; columns the same labels, plus the out-of-label column when it is used."""
    matrix = report.confusion
    if any(row[-1] for row in matrix):
        return {"labels": report.labels, "columns": report.confusion_columns, "matrix": matrix}
    return {"labels": report.labels, "columns": report.labels, "matrix": [row[:-1] for row in matrix]}


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: EvalTask,
    *,
    name: str,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    reference: Any = None,
    console: Console | None = None,
) -> EvalResult:
    """The metrics of ``task.kind`` for one loaded model (``reference``: a DPO-family policy's reference;
    None uses the adapter switched off, as in training)."""
    if task.kind == "lm":
        result, _ = evaluate_model(
            model,
            tokenizer,
            task.conversations,
            name=name,
            labels=task.labels,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            console=console,
        )
        return result
    if task.kind == "classify":
        return _classifier_result(model, tokenizer, task, name, batch_size)
    return _preference_result(model, tokenizer, task, name, batch_size, reference)


def _blank_result(name: str, n: int, labels: list[str] | None = None) -> EvalResult:
    nan = float("nan")
    return EvalResult(name, n, nan, nan, None, nan, labels)


def _classifier_result(model: Any, tokenizer: Any, task: EvalTask, name: str, batch_size: int) -> EvalResult:
    from tunelab.evaluate.classify import evaluate_classifier  # noqa: PLC0415

    report, predictions = evaluate_classifier(
        model, tokenizer, task.texts, task.golds, batch_size=batch_size, max_length=task.max_length or 512
    )
    result = _blank_result(name, task.n, report.labels)
    result.metrics = report.as_metrics()
    result.per_example["accuracy"] = [float(p == g) for p, g in zip(predictions, task.golds)]
    result.generations = predictions
    result.confusion_matrices[name] = confusion_entry(report)
    return result


def _preference_result(
    model: Any, tokenizer: Any, task: EvalTask, name: str, batch_size: int, reference: Any
) -> EvalResult:
    from tunelab.evaluate import preference  # noqa: PLC0415

    if task.kind == "reward":
        out = preference.evaluate_reward_model(model, tokenizer, task.pairs, batch_size=batch_size)
        margin_key = "reward_margin_mean"
    else:
        out = preference.evaluate_dpo_implicit_reward(
            model, reference, tokenizer, task.pairs, beta=task.beta, batch_size=batch_size
        )
        margin_key = "implicit_margin_mean"
    result = _blank_result(name, task.n)
    result.metrics = {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and k != "n"}
    result.per_example[task.main_metric] = [float(c) for c in out["per_example"]]
    result.per_example[margin_key] = [float(m) for m in out["margins"]]
    return result


def run_eval(
    spec: str,
    data: str,
    *,
    labels: list[str] | None = None,
    template: str | None = None,
    max_examples: int | None = None,
    max_new_tokens: int = 16,
    batch_size: int = 16,
    predictions_path: Path | None = None,
    console: Console | None = None,
) -> EvalResult:
    """Load ``spec``, evaluate on ``data`` and optionally write per-example predictions (JSONL)."""
    model, tokenizer = load_for_eval(spec)
    select_template(tokenizer, template)
    conversations = load_conversations(data, limit=max_examples)
    result, raw = evaluate_model(
        model,
        tokenizer,
        conversations,
        name=spec,
        labels=labels,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        console=console,
    )
    if predictions_path is not None:
        write_predictions(predictions_path, conversations, raw)
    return result


def write_predictions(
    path: Path, conversations: list[list[dict[str, str]]], raw: LMEval | EvalResult
) -> None:
    """One line per example: gold, generated answer, label choice — for reading errors, not just counts."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for i, conv in enumerate(conversations):
            gold = split_prompt_answer(conv)[1]
            row = {
                "gold": gold,
                "generated": raw.generations[i],
                "generated_correct": normalise_answer(raw.generations[i]) == normalise_answer(gold),
            }
            if raw.label_predictions:
                row["label_choice"] = raw.label_predictions[i]
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
