"""`tunelab demo`: a real model gets measurably better at a real task, on a laptop CPU.

Steps: fetch the embedded assets → build a review-sentiment instruction set (deterministic,
stratified split; "plot" rows excluded) → LoRA fine-tune SmolLM2-135M-Instruct → evaluate the base
and the trained run on the same held-out reviews with the same code (paired bootstrap CI on the
accuracy gain; perplexity on plot synopses as the forgetting check) → table and report.html.
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
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

from tunelab.assets import asset_path, fetch
from tunelab.console import make_console
from tunelab.evaluate.compare import EvalPlan, compare_models, print_payload
from tunelab.recipe import Recipe, parse_recipe
from tunelab.runs.atomic import atomic_write_json, atomic_write_text
from tunelab.runs.report import EVAL_DIR, write_eval_report
from tunelab.train.run import train

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


DEMO_METRICS = (
    ("accuracy, label by log-likelihood", "accuracy_loglik", True),
    ("accuracy, exact match of generated answer", "exact_match", True),
    ("perplexity of the answer", "perplexity", False),
    ("perplexity of general text (forgetting)", "general_perplexity", False),
)


def before_after_table(payload: dict[str, Any]) -> Table:
    """The headline: a few metrics a person reads first, and the main metric's paired-bootstrap CI."""
    base, tuned = (m["metrics"] for m in payload["models"])
    comp = payload["comparison"]
    table = Table(title=f"held-out reviews (n={payload['n']}): before vs after LoRA fine-tuning")
    for column in ("metric", "base", "fine-tuned", "change", "95% CI of the change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name, key, pct in DEMO_METRICS:
        if key not in base or key not in tuned:
            continue
        b, a = base[key], tuned[key]
        ci = ""
        if key == comp["metric"]:
            lo, hi = comp["ci95"]
            ci = f"[{100 * lo:+.1f}, {100 * hi:+.1f}] pts" if pct else f"[{lo:+.3f}, {hi:+.3f}]"
        if pct:
            table.add_row(name, f"{100 * b:.1f}%", f"{100 * a:.1f}%", f"{100 * (a - b):+.1f} pts", ci)
        else:
            table.add_row(name, f"{b:.3f}", f"{a:.3f}", f"{a - b:+.3f}", ci)
    return table


def run_demo(
    *,
    runs_dir: str = "runs",
    n_eval: int = 300,
    n_train: int = 480,
    seed: int = 0,
    forgetting_n: int = 40,
    overrides: list[str] | None = None,
    console: Console | None = None,
) -> dict[str, object]:
    console = console or make_console()
    started = time.perf_counter()
    fetch(["smollm2-135m-instruct", "rotten-tomatoes"])
    split = build_demo_data(Path(runs_dir) / "demo-data", n_eval=n_eval, n_train=n_train, seed=seed)
    console.print(
        f"data: train {split.counts['train']}, held-out {split.counts['eval']}; excluded {split.excluded}"
    )
    recipe = demo_recipe(split, runs_dir, overrides)

    console.rule("1/2 LoRA fine-tuning")
    result = train(recipe, overwrite=True, console=console)

    console.rule("2/2 base vs fine-tuned, same held-out reviews, same code")
    plan = EvalPlan(
        labels=recipe.eval.labels,
        max_new_tokens=recipe.eval.max_new_tokens,
        batch_size=recipe.eval.batch_size,
        seed=seed,
        forgetting=True,  # general text: the corpus's plot synopses, never used for training
        forgetting_n=forgetting_n,
    )
    payload = compare_models(
        recipe.model.name_or_path, str(result.run_dir), str(split.eval_path), plan, console=console
    )
    json_path, html_path = write_eval_report(result.run_dir / EVAL_DIR, payload)
    print_payload(payload, console)
    console.rule("result")
    console.print(before_after_table(payload))
    summary = {
        "comparison": payload["comparison"],
        "data": {
            "counts": split.counts,
            "excluded": split.excluded,
            "train": str(split.train_path),
            "eval": str(split.eval_path),
        },
        "run": str(result.run_dir),
        "eval_report": str(html_path),
        "run_report": str(result.run_dir / "report.html"),
        "steps": result.steps,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_json(result.run_dir / "demo.json", summary)
    console.print(
        f"run: {result.run_dir}\nbefore/after report: {html_path} (data: {json_path})\n"
        f"training report: {result.run_dir / 'report.html'}\ntook {summary['seconds']:.0f} s. "
        + next_steps(runs_dir, result.run_dir, split.eval_path)
    )
    return summary


def next_steps(runs_dir: str, run_dir: Path, eval_path: Path) -> str:
    """What to try after the demo (the GGUF export checked on the held-out reviews)."""
    return (
        f"Next: tunelab runs ls {runs_dir} · tunelab export {run_dir} --gguf q4_k_m --out gguf/ "
        f"--verify-data {eval_path} (checked in llama.cpp on the held-out reviews) · "
        f"tunelab serve --adapter demo={run_dir}"
    )
