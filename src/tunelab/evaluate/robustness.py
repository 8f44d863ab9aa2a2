"""Robustness: the main metric again under seeded perturbations of the prompt.

A fine-tuned model that only works on prompts written exactly like its training data is brittle in
use. Each perturbation changes the *user's* text in one stated way (typos, casing, whitespace,
irrelevant sentences appended) and never touches the reference answer, so a drop in the metric is
the model's sensitivity to that change. Every perturbation is a pure function of (text, seed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from typing import Any

Perturbation = Callable[[str, random.Random], str]

TYPO_RATE = 0.15
MIN_TYPO_WORD = 4
DISTRACTOR_COUNT = 2

# Neutral filler with no bearing on any task's answer; appended to test that the model ignores it.
DISTRACTORS = (
    "The weather forecast for tomorrow mentions light winds in the afternoon.",
    "Some people prefer tea in the morning and coffee after lunch.",
    "The library on the corner closes early on Sundays.",
    "A train left the station a few minutes behind schedule.",
    "Many gardens have a small patch of herbs near the kitchen door.",
    "The meeting notes were filed in the blue folder on the shelf.",
    "Bicycles are a common sight in the old part of town.",
    "The museum added a new room for its collection of maps.",
)

_WORD = re.compile(r"[A-Za-z]+")


def add_typos(text: str, rng: random.Random, rate: float = TYPO_RATE) -> str:
    """In about ``rate`` of the words of 4+ letters, swap two adjacent inner letters or drop one."""

    def typo(match: re.Match[str]) -> str:
        word = match.group(0)
        if len(word) < MIN_TYPO_WORD or rng.random() >= rate:
            return word
        i = rng.randrange(1, len(word) - 2)  # inner letters only: the word stays recognisable
        if rng.random() < 0.5 and word[i] != word[i + 1]:
            return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
        return word[:i] + word[i + 1 :]

    return _WORD.sub(typo, text)


def change_case(text: str, rng: random.Random) -> str:
    """The whole text in upper or in lower case (which one depends on the seed)."""
    return text.upper() if rng.random() < 0.5 else text.lower()


def add_whitespace(text: str, rng: random.Random) -> str:
    """Runs of 1–3 extra spaces between some words, plus a leading and a trailing blank line."""
    words = text.split(" ")
    spaced = words[0]
    for word in words[1:]:
        spaced += " " * (1 + (rng.randint(1, 3) if rng.random() < 0.5 else 0)) + word
    return "\n" + spaced + "\n\n"


def append_distractors(text: str, rng: random.Random, count: int = DISTRACTOR_COUNT) -> str:
    """``count`` irrelevant sentences, drawn and shuffled by the seed, appended after the text."""
    chosen = rng.sample(DISTRACTORS, count)
    return text + "\n\n" + " ".join(chosen)


PERTURBATIONS: dict[str, Perturbation] = {
    "typos": add_typos,
    "casing": change_case,
    "whitespace": add_whitespace,
    "distractors": append_distractors,
}


def perturb_text(text: str, name: str, seed: int, index: int = 0) -> str:
    """One perturbation of one text; ``index`` varies the draw per example while staying reproducible."""
    try:
        fn = PERTURBATIONS[name]
    except KeyError:
        raise ValueError(f"unknown perturbation {name!r}; known: {', '.join(PERTURBATIONS)}") from None
    return fn(text, random.Random(f"{name}:{seed}:{index}"))


def perturb_conversation(
    conv: list[dict[str, str]], name: str, seed: int, index: int
) -> list[dict[str, str]]:
    """The conversation with its last user turn perturbed; the answer and other turns untouched."""
    last_user = max(i for i, m in enumerate(conv) if m["role"] == "user")
    out = [dict(m) for m in conv]
    out[last_user]["content"] = perturb_text(conv[last_user]["content"], name, seed, index)
    return out


def perturb_conversations(
    conversations: list[list[dict[str, str]]], name: str, seed: int
) -> list[list[dict[str, str]]]:
    return [perturb_conversation(c, name, seed, i) for i, c in enumerate(conversations)]


def robustness_report(
    clean: dict[str, float], perturbed: dict[str, dict[str, float]], metric: str, seed: int
) -> dict[str, Any]:
    """``clean``: model → metric; ``perturbed``: perturbation → model → metric. Drop = clean − perturbed."""
    return {
        "metric": metric,
        "seed": seed,
        "clean": clean,
        "perturbations": {
            name: {model: {"value": value, "drop": clean[model] - value} for model, value in by_model.items()}
            for name, by_model in perturbed.items()
        },
    }
