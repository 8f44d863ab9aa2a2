"""`tunelab eval`: evaluate a base model or a run's final model on a dataset, the same way every time."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from tunelab.data.templates import select_template, split_prompt_answer
from tunelab.evaluate.lm import LMEval, evaluate_conversations
from tunelab.evaluate.metrics import accuracy, exact_match, normalise_answer
from tunelab.models.load import MODEL_CLASSES, load_model
from tunelab.train.data import read_canonical

FINAL_META = "tunelab.json"
MAX_INFERRED_LABELS = 20


@dataclass
class EvalResult:
    model: str
    n: int
    loss: float
    perplexity: float
    accuracy_loglik: float | None
    exact_match: float
    labels: list[str] | None

    def as_row(self) -> dict[str, Any]:
        return asdict(self)


def final_dir_of(spec: str) -> Path | None:
    """A run directory or its ``final/`` → the ``final/`` folder; anything else → None."""
    path = Path(spec)
    for candidate in (path / "final", path):
        if (candidate / FINAL_META).exists():
            return candidate
    return None


def load_for_eval(spec: str, *, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """Load a base model (hub id, dir, .gguf, tiny:llama, asset:NAME) or a tunelab run's trained model."""
    final = final_dir_of(spec)
    if final is None:
        return load_model(spec, device=device, dtype=dtype)
    meta = json.loads((final / FINAL_META).read_text(encoding="utf-8"))
    artifact = meta.get("artifact") or ("peft" if meta.get("is_adapter") else "full")
    head = {
        "model_cls": MODEL_CLASSES[meta.get("model_kind", "causal_lm")],
        "model_kwargs": _head_kwargs(meta),
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


def _head_kwargs(meta: dict[str, Any]) -> dict[str, Any]:
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
    with Progress(console=console or Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"eval {name}", total=len(conversations))
        raw = evaluate_conversations(
            model,
            tokenizer,
            conversations,
            labels=labels,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=lambda n: progress.advance(task, n),
        )
    acc = accuracy(raw.label_predictions, golds) if labels else None
    em = sum(exact_match(p, g) for p, g in zip(raw.generations, golds)) / len(golds)
    return EvalResult(name, raw.n, raw.loss, raw.perplexity, acc, em, labels), raw


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


def write_predictions(path: Path, conversations: list[list[dict[str, str]]], raw: LMEval) -> None:
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


def results_table(results: list[EvalResult], title: str = "evaluation") -> Table:
    table = Table(title=title)
    for column in ("model", "n", "loss", "perplexity", "accuracy (log-lik)", "exact match"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in results:
        acc = "—" if r.accuracy_loglik is None else f"{100 * r.accuracy_loglik:.1f}%"
        table.add_row(
            r.model, str(r.n), f"{r.loss:.4f}", f"{r.perplexity:.3f}", acc, f"{100 * r.exact_match:.1f}%"
        )
    return table
