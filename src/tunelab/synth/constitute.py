"""Constitutional AI's supervised stage (Bai et al., 2022): sample, critique against a principle, revise.

For each prompt the model answers; then, for each of ``rounds`` rounds, a principle is drawn from the
constitution (seeded by the prompt's row and the round, so a re-run draws the same ones), the model is
asked to critique its current answer against the principle's critique request, and then to rewrite
it by the revision request. The final revision is the SFT target (prompt -> revision) and the
preferred side of a preference pair whose other side is the original answer. The RL stage is then
``tunelab train`` with a DPO objective on the pairs, or PPO/GRPO with a judge reward.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tunelab.data.loaders import DataError
from tunelab.synth.client import Generator, GenSettings
from tunelab.synth.preferences import Item

DEFAULT_CONSTITUTION = "constitution.yaml"
UNCHANGED = "unchanged_revision"  # the final revision is the original answer: no pair to learn from
EMPTY = "empty_output"  # the model gave no answer (and so no revision)
# Small models often echo the request's label ("Revision: ...") before the text.
_LABEL = re.compile(r"^\s*(?:revision|rewritten response|revised response|critique)\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True)
class Principle:
    """One constitution entry: what to criticise and how to revise."""

    name: str
    critique: str
    revision: str


@dataclass
class Trace:
    """One prompt's way through the rounds: the original answer and each round's critique and revision."""

    item: Item
    original: str
    rounds: list[dict[str, str]] = field(default_factory=list)

    @property
    def final(self) -> str:
        return self.rounds[-1]["revision"] if self.rounds else self.original


def load_constitution(path: str | Path | None = None) -> list[Principle]:
    """The principles in a constitution YAML file (a list of {critique, revision, name?}); None: tunelab's."""
    if path is None:
        source = "tunelab's default constitution"
        text = resources.files("tunelab.synth").joinpath("resources", DEFAULT_CONSTITUTION).read_text("utf-8")
    else:
        source, text = str(path), Path(path).read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DataError(source, 0, "", f"is not valid YAML ({' '.join(str(err).split())})") from err
    if isinstance(raw, dict) and "principles" in raw:
        raw = raw["principles"]
    if not isinstance(raw, list) or not raw:
        raise DataError(
            source, 0, "", "must be a non-empty YAML list of {critique: ..., revision: ...} entries"
        )
    return [_principle(source, i, entry) for i, entry in enumerate(raw)]


def _principle(source: str, index: int, entry: Any) -> Principle:
    if not isinstance(entry, dict):
        raise DataError(source, index + 1, "", "each entry must be a mapping with 'critique' and 'revision'")
    for key in ("critique", "revision"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise DataError(source, index + 1, key, f"is missing or empty; give the {key} request as text")
    return Principle(
        str(entry.get("name") or f"principle-{index + 1}"),
        entry["critique"].strip(),
        entry["revision"].strip(),
    )


def draw(principles: list[Principle], seed: int, row: int, round_index: int) -> Principle:
    """The principle for one prompt and round: random, but the same on every run with the same seed."""
    return random.Random(f"{seed}:{row}:{round_index}").choice(principles)


def clean_revision(text: str) -> str:
    return _LABEL.sub("", text, count=1).strip()


def critique_conversation(item: Item, answer: str, principle: Principle) -> list[dict[str, Any]]:
    return [
        *item.prompt,
        {"role": "assistant", "content": answer},
        {"role": "user", "content": principle.critique},
    ]


def constitute(
    generator: Generator,
    items: list[Item],
    principles: list[Principle],
    *,
    rounds: int = 1,
    settings: GenSettings | None = None,
) -> list[Trace]:
    """Answer every prompt, then critique and revise each answer ``rounds`` times (batched per step)."""
    settings = settings or GenSettings()
    answers = generator.chat([item.prompt for item in items], settings, desc="answering")
    traces = [Trace(item, answer) for item, answer in zip(items, answers)]
    for r in range(rounds):
        # A step's own seed: the critique and revision of round r sample independently of the answer.
        step = replace(settings, seed=settings.seed + 1 + 2 * r)
        chosen = [draw(principles, settings.seed, t.item.row, r) for t in traces]
        asks = [critique_conversation(t.item, t.final, p) for t, p in zip(traces, chosen)]
        critiques = generator.chat(asks, step, desc=f"critiquing (round {r + 1})")
        revise = [
            [*ask, {"role": "assistant", "content": critique}, {"role": "user", "content": p.revision}]
            for ask, critique, p in zip(asks, critiques, chosen)
        ]
        revisions = generator.chat(
            revise, replace(step, seed=step.seed + 1), desc=f"revising (round {r + 1})"
        )
        for trace, p, critique, revision in zip(traces, chosen, critiques, revisions):
            # An empty revision keeps the answer it was asked to revise: the round changed nothing.
            text = clean_revision(revision) or trace.final
            trace.rounds.append({"principle": p.name, "critique": critique, "revision": text})
    return traces


def provenance(trace: Trace, model: str, settings: GenSettings, constitution: str) -> dict[str, Any]:
    return {
        "command": "constitute",
        "source_row": trace.item.row,
        "model": model,
        "settings": settings.to_dict(),
        "constitution": constitution,
        "original": trace.original,
        "rounds": trace.rounds,
    }


def outputs(
    traces: list[Trace], model: str, settings: GenSettings, constitution: str
) -> tuple[list[dict], list[tuple[dict, str]], list[dict], list[tuple[dict, str]]]:
    """SFT rows and preference pairs, each with the rows they drop and why: (sft, sft_dropped, pairs, pairs_dropped)."""
    sft, sft_dropped, pairs, pairs_dropped = [], [], [], []
    for trace in traces:
        meta = provenance(trace, model, settings, constitution)
        final = trace.final.strip()
        tools = trace.item.tools
        sft_row = {
            "messages": [*trace.item.prompt, {"role": "assistant", "content": final}],
            **tools,
            "provenance": meta,
        }
        pair = {
            "prompt": trace.item.prompt,
            "chosen": [{"role": "assistant", "content": final}],
            "rejected": [{"role": "assistant", "content": trace.original.strip()}],
            **tools,
            "provenance": meta,
        }
        if not final:  # an empty revision falls back to the answer, so the answer was empty too
            sft_dropped.append((sft_row, EMPTY))
            pairs_dropped.append((pair, EMPTY))
            continue
        sft.append(sft_row)
        if not trace.original.strip():
            pairs_dropped.append((pair, EMPTY))
        elif " ".join(final.split()) == " ".join(trace.original.split()):
            pairs_dropped.append((pair, UNCHANGED))
        else:
            pairs.append(pair)
    return sft, sft_dropped, pairs, pairs_dropped
