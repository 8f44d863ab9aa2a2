"""Forgetting: did fine-tuning make the model worse at ordinary text?

Perplexity of the base and the tuned model on the same general text; the regression is
``tuned_ppl / base_ppl − 1`` (0.10 = the tuned model is 10% more perplexed). For an adapter run the
base is the bare base model, so the number is what the adapter costs on text it was not trained on.

Without a file, the general text is the plot summaries shipped inside the Rotten Tomatoes corpus
asset: descriptive English prose, not the sentiment-labelled reviews the demo trains on, and
available offline like every other tunelab asset.
"""

from __future__ import annotations

import bz2
import csv
import io
import random
from pathlib import Path
from typing import Any

DEFAULT_N = 200
DEFAULT_SOURCE = "rotten-tomatoes plot summaries"


def default_general_texts(n: int = DEFAULT_N, seed: int = 0) -> list[str]:
    """``n`` plot descriptions (category ``plot``), in an order fixed by ``seed``."""
    from tunelab.assets import asset_path  # noqa: PLC0415

    with io.TextIOWrapper(bz2.open(asset_path("rotten-tomatoes")), encoding="utf-8") as handle:
        plots = sorted(
            {
                (row.get("text") or "").strip()
                for row in csv.DictReader(handle)
                if row.get("category") == "plot"
            }
            - {""}
        )
    random.Random(seed).shuffle(plots)
    return plots[:n]


def load_general_texts(path: str, limit: int | None = None) -> list[str]:
    """Texts from a ``.txt`` file (paragraphs split at blank lines) or any data file tunelab reads
    (every row's whole text: plain text, instruction, chat, preference or classification)."""
    file = Path(path)
    if file.suffix.lower() == ".txt":
        if not file.is_file():
            raise FileNotFoundError(f"--forgetting-data {path}: no such file")
        raw = file.read_text(encoding="utf-8")
        texts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    else:
        from tunelab.data.canonical import read_canonical  # noqa: PLC0415
        from tunelab.data.formats import canonical_text  # noqa: PLC0415

        rows, _, _ = read_canonical(path)
        texts = [canonical_text(example).strip() for _, example in rows]
        texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"--forgetting-data {path}: no text in it")
    return texts[:limit] if limit else texts


def regression(base_ppl: float, tuned_ppl: float) -> float:
    """Relative increase in perplexity; negative when the tuned model models the text better."""
    return tuned_ppl / base_ppl - 1


def forgetting_report(
    base_ppl: float, tuned_ppl: float, *, n_texts: int, n_tokens: int, source: str, base: str, tuned: str
) -> dict[str, Any]:
    value = regression(base_ppl, tuned_ppl)
    return {
        "source": source,
        "n_texts": n_texts,
        "n_tokens": n_tokens,
        "base": base,
        "tuned": tuned,
        "base_perplexity": base_ppl,
        "tuned_perplexity": tuned_ppl,
        "regression": value,
        "regression_pct": 100 * value,
    }
