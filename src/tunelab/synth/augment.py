"""Augmentation of the input side of rows; the output (answer, label) is never touched.

Model operations, through the generation client: ``paraphrase`` (the input reworded) and
``backtranslate`` (the input translated into a pivot language and back). Operations that need no
model, after EDA (Wei and Zou, 2019), with ``alpha`` the share of words changed: ``swap`` (swap two
words, ``alpha * words`` times), ``delete`` (drop each word with probability ``alpha``) and
``insert`` (insert a word taken from the same text, ``alpha * words`` times; EDA inserts synonyms,
which would need a thesaurus per language).

The input side is the ``input`` field of an instruction row (the ``instruction`` when it has no
input), a classification row's ``text``, a prompt/completion row's ``prompt`` and a chat row's last
user message. Every augmented row carries its provenance; a variant identical to its source or empty
is dropped (``unchanged``, ``empty``).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field, replace
from typing import Any

from tunelab.data.formats import FormatError, detect_file_format
from tunelab.data.loaders import DataError
from tunelab.synth.client import Generator, GenSettings

MODEL_OPS = ("paraphrase", "backtranslate")
EDA_OPS = ("swap", "delete", "insert")
OPS = MODEL_OPS + EDA_OPS
_USER = {"user", "human"}


@dataclass(frozen=True)
class AugmentConfig:
    ops: tuple[str, ...] = EDA_OPS
    variants: int = 1  # new rows per source row and operation
    alpha: float = 0.1
    pivot: str = "French"
    language: str = "English"
    seed: int = 0
    keep_original: bool = True
    settings: GenSettings = field(default_factory=lambda: GenSettings(max_tokens=256, temperature=0.7))


def check_ops(ops: list[str]) -> tuple[str, ...]:
    unknown = [op for op in ops if op not in OPS]
    if unknown or not ops:
        raise ValueError(
            f"--ops takes a comma-separated list of {', '.join(OPS)}; got {','.join(ops) or '(none)'}"
        )
    return tuple(dict.fromkeys(ops))


@dataclass
class InputSide:
    """Where a row's input text lives: ``path`` of keys/indices into the record."""

    name: str
    path: tuple[Any, ...]

    def get(self, record: dict) -> str:
        value: Any = record
        for key in self.path:
            value = value[key]
        return value

    def with_text(self, record: dict, text: str) -> dict:
        new = copy.deepcopy(record)
        target: Any = new
        for key in self.path[:-1]:
            target = target[key]
        target[self.path[-1]] = text
        return new


def _chat_side(record: dict) -> InputSide | None:
    key = "messages" if "messages" in record else "conversations"
    messages = record.get(key)
    if not isinstance(messages, list):
        return None
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if not isinstance(m, dict):
            continue
        role, text_key = ("role", "content") if "role" in m else ("from", "value")
        if str(m.get(role, "")).lower() in _USER and isinstance(m.get(text_key), str):
            return InputSide(f"{key}[{i}].{text_key}", (key, i, text_key))
    return None


def input_side(record: dict, fmt: str) -> InputSide | None:
    """The input field of a row in format ``fmt``; None when this row has none to augment."""
    if fmt == "instruction":
        has_input = isinstance(record.get("input"), str) and record["input"].strip()
        name = "input" if has_input else "instruction"
        return InputSide(name, (name,)) if isinstance(record.get(name), str) else None
    if fmt == "classification":
        return InputSide("text", ("text",)) if isinstance(record.get("text"), str) else None
    if fmt == "prompt_completion":
        return InputSide("prompt", ("prompt",)) if isinstance(record.get("prompt"), str) else None
    if fmt == "chat":
        return _chat_side(record)
    return None


def detect_rows_format(path: str, rows: list[tuple[int, dict]]) -> str:
    try:
        fmt = detect_file_format(path, rows[0][0], rows[0][1])
    except FormatError as err:
        raise DataError(path, rows[0][0], "", str(err)) from None
    if fmt not in ("instruction", "classification", "prompt_completion", "chat"):
        raise DataError(
            path, rows[0][0], "", f"rows are {fmt} data; augment works on instruction, chat, "
            "prompt_completion and classification rows, whose input side it rewrites",
        )  # fmt: skip
    return fmt


def eda(text: str, op: str, alpha: float, rng: random.Random) -> str:
    """One EDA operation on the words of ``text`` (words rejoined with single spaces)."""
    words = text.split()
    if len(words) < 2:
        return text
    count = max(1, round(alpha * len(words)))
    if op == "swap":
        for _ in range(count):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
    elif op == "delete":
        kept = [w for w in words if rng.random() >= alpha]
        if len(kept) == len(words):
            del kept[rng.randrange(len(kept))]
        words = kept or [rng.choice(words)]
    elif op == "insert":
        for _ in range(count):
            words.insert(rng.randrange(len(words) + 1), rng.choice(words))
    return " ".join(words)


def paraphrase_prompt(text: str) -> list[dict[str, str]]:
    request = (
        "Rewrite the following text so that it says the same thing in different words. Keep every fact, "
        f"name and number, and keep its language. Reply with the rewritten text only.\n\nText:\n{text}"
    )
    return [{"role": "user", "content": request}]


def translate_prompt(text: str, language: str) -> list[dict[str, str]]:
    request = (
        f"Translate the following text into {language}. Reply with the translation only.\n\nText:\n{text}"
    )
    return [{"role": "user", "content": request}]


@dataclass
class Variant:
    """One augmented input for the row at ``index``: its text and what made it."""

    index: int
    text: str
    provenance: dict[str, Any]


class Augmenter:
    def __init__(self, config: AugmentConfig, generator: Generator | None) -> None:
        self.config, self.gen = config, generator

    def eda_variants(self, items: list[tuple[int, int, str]]) -> list[Variant]:
        """``items``: (index, source row number, input text)."""
        out = []
        for op in (o for o in self.config.ops if o in EDA_OPS):
            for v in range(self.config.variants):
                for index, row, text in items:
                    rng = random.Random(f"{self.config.seed}:{row}:{op}:{v}")  # str seeds hash stably
                    prov = {"op": op, "alpha": self.config.alpha, "variant": v, "seed": self.config.seed}
                    out.append(Variant(index, eda(text, op, self.config.alpha, rng), prov))
        return out

    def _settings(self, v: int) -> GenSettings:
        return replace(self.config.settings, seed=self.config.seed + v)

    def model_variants(self, items: list[tuple[int, int, str]]) -> list[Variant]:
        out: list[Variant] = []
        if self.gen is None:
            return out
        texts = [text for _, _, text in items]
        for v in range(self.config.variants):
            settings = self._settings(v)
            base = {"model": self.gen.name, "settings": settings.to_dict(), "variant": v}
            if "paraphrase" in self.config.ops:
                answers = self.gen.chat([paraphrase_prompt(t) for t in texts], settings, desc="paraphrase")
                out += [
                    Variant(i, a, {"op": "paraphrase", **base})
                    for (i, _, _), a in zip(items, answers, strict=True)
                ]
            if "backtranslate" in self.config.ops:
                out += self._backtranslate(items, settings, base)
        return out

    def _backtranslate(
        self, items: list[tuple[int, int, str]], settings: GenSettings, base: dict
    ) -> list[Variant]:
        pivot, language = self.config.pivot, self.config.language
        there = self.gen.chat(  # type: ignore[union-attr]
            [translate_prompt(t, pivot) for _, _, t in items], settings, desc=f"translate to {pivot}"
        )
        back = self.gen.chat(  # type: ignore[union-attr]
            [translate_prompt(t, language) for t in there], settings, desc=f"translate to {language}"
        )
        prov = {"op": "backtranslate", "pivot": pivot, "language": language, **base}
        return [
            Variant(i, b, {**prov, "pivot_text": t})
            for (i, _, _), t, b in zip(items, there, back, strict=True)
        ]


def leaking_rows(rows: list[tuple[int, dict]], eval_path: str | None) -> set[int]:
    """Positions of source rows that leak into the eval file (the audit's exact/prompt/near test):
    their variants would be eval data reworded, so none are made."""
    if not eval_path:
        return set()
    from tunelab.synth.finish import audit_drops  # noqa: PLC0415

    drops = audit_drops([rec for _, rec in rows], eval_path=eval_path)
    return {i for i, d in drops.items() if d["reason"] == "eval_leak"}


def augment_rows(
    rows: list[tuple[int, dict]],
    fmt: str,
    config: AugmentConfig,
    generator: Generator | None,
    *,
    skip: set[int] | None = None,
) -> tuple[list[dict], list[dict]]:
    """(rows to write: originals if kept, each followed by its variants; rows dropped with reasons).
    Rows at the positions in ``skip`` get no variants (the closing audit drops the rows themselves)."""
    skip = skip or set()
    sides = [None if i in skip else input_side(rec, fmt) for i, (_, rec) in enumerate(rows)]
    items = [
        (i, row, side.get(rec)) for i, ((row, rec), side) in enumerate(zip(rows, sides, strict=True)) if side
    ]
    augmenter = Augmenter(config, generator)
    variants = augmenter.eda_variants(items) + augmenter.model_variants(items)
    by_row: dict[int, list[dict]] = {}
    dropped = [
        {"reason": "source_leaks_eval" if i in skip else "no_input_side", "source_row": rows[i][0]}
        for i, s in enumerate(sides)
        if s is None
    ]
    for var in variants:
        (row, rec), side = rows[var.index], sides[var.index]
        assert side is not None  # only rows with an input side have variants
        new = _augmented(rec, side, var, row)
        reason = _variant_problem(var.text, side.get(rec))
        if reason:
            dropped.append({"reason": reason, "source_row": row, "row": new})
        else:
            by_row.setdefault(var.index, []).append(new)
    return _interleave(rows, by_row, config.keep_original), dropped


def _augmented(record: dict, side: InputSide, var: Variant, row: int) -> dict:
    new = side.with_text(record, var.text)
    prov = {"method": "augment", **var.provenance, "source_row": row, "field": side.name}
    if "provenance" in record:
        prov["source_provenance"] = record["provenance"]
    new["provenance"] = prov
    return new


def _variant_problem(text: str, original: str) -> str | None:
    if not text.strip():
        return "empty"
    if " ".join(text.split()) == " ".join(original.split()):
        return "unchanged"
    return None


def _interleave(
    rows: list[tuple[int, dict]], by_row: dict[int, list[dict]], keep_original: bool
) -> list[dict]:
    out: list[dict] = []
    for i, (_, rec) in enumerate(rows):
        if keep_original:
            out.append(rec)
        out += by_row.get(i, [])
    return out
