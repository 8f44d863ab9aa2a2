"""Self-Instruct (Wang et al., 2023): grow a set of tasks from a few seed tasks with a model.

Each round asks the model for new instructions after a few examples sampled from the pool (seed tasks
and instructions kept so far). A candidate instruction is kept only if it passes, in order:

- ``length``: between ``min_words`` and ``max_words`` words;
- ``blocklist``: none of the blocklisted words (tasks a text model cannot do: images, files, ...);
- ``rouge_similar``: ROUGE-L F1 below ``rouge_threshold`` against every instruction in the pool;
- ``near_duplicate_instruction``: not a MinHash near-duplicate of a pool instruction.

The model then decides whether each kept instruction is a classification task (few-shot, yes/no),
and writes one instance: input first then output, or, for classification, output (the class
label) first and then an input for it, so labels are not all the easy one. Outputs longer than
``max_output_words`` are dropped (``output_too_long``). Every row records its provenance.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data import neardup
from tunelab.data.loaders import DataError, iter_records
from tunelab.synth.client import Generator, GenSettings

# Self-Instruct's own filter: tasks a language model cannot carry out in text.
DEFAULT_BLOCKLIST = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip
_NUMBERED = re.compile(r"^\s*(?:(?:task|instruction)\s*)?\d+\s*[.):-]\s*", re.IGNORECASE)
_LABELLED = re.compile(r"^\s*(?:task|instruction)\s*:\s*", re.IGNORECASE)


@dataclass(frozen=True)
class SynthConfig:
    n: int = 100
    examples: int = 3  # pool examples shown per prompt
    generated_examples: int = 1  # ... of which at most this many are machine-made (the rest seeds)
    prompts_per_round: int = 8
    max_rounds: int = 20
    rouge_threshold: float = 0.7
    near_threshold: float = 0.8
    min_words: int = 3
    max_words: int = 150
    max_output_words: int = 300
    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST
    seed: int = 0
    settings: GenSettings = field(default_factory=lambda: GenSettings(max_tokens=256, temperature=0.7))


@dataclass
class SeedTask:
    instruction: str
    input: str
    output: str
    is_classification: bool | None
    row: int


def _seed_task(path: str, row: int, rec: dict) -> SeedTask:
    """A flat row (instruction, input, output) or Self-Instruct's (instruction, instances[...])."""
    instruction = rec.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise DataError(
            path, row, str(rec)[:80], "field 'instruction' is missing or empty; every seed task needs one"
        )
    instances = rec.get("instances")
    first = (
        instances[0] if isinstance(instances, list) and instances and isinstance(instances[0], dict) else rec
    )
    flag = rec.get("is_classification")
    return SeedTask(
        instruction.strip(),
        str(first.get("input") or "").strip(),
        str(first.get("output") or "").strip(),
        flag if isinstance(flag, bool) else None,
        row,
    )


def read_seeds(path: str | Path) -> list[SeedTask]:
    seeds = [_seed_task(str(path), row, rec) for row, rec in iter_records(path)]
    if not seeds:
        raise DataError(path, 0, "", "has no seed tasks; give at least one row with an 'instruction'")
    return seeds


def instruction_prompt(examples: list[str]) -> list[dict[str, str]]:
    listed = "\n".join(f"{i}. {text}" for i, text in enumerate(examples, 1))
    request = (
        "Here are some tasks a person might ask an AI assistant to do:\n"
        f"{listed}\n\n"
        "Write new tasks of the same kind, as varied as you can: different verbs, topics and formats. "
        f"One task per line, numbered from {len(examples) + 1}. Only tasks that can be done in text."
    )
    return [{"role": "user", "content": request}]


def parse_instructions(answer: str) -> list[str]:
    """One candidate per non-empty line, numbering and ``Task:`` labels removed; a line ending in a
    colon is a heading ("Here are some new tasks:"), not a task."""
    out = []
    for line in answer.splitlines():
        text = _LABELLED.sub("", _NUMBERED.sub("", line)).strip().strip('"').strip()
        if text and not text.endswith(":"):
            out.append(text)
    return out


class InstructionFilter:
    """The pool of instructions so far and the checks a new one must pass to join it."""

    def __init__(self, pool: Iterable[str], config: SynthConfig) -> None:
        from rouge_score import rouge_scorer  # noqa: PLC0415

        self.config = config
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
        self.pool: list[str] = []
        self.sigs = np.empty((0, neardup.NUM_PERM), dtype=np.uint32)
        self.blocked = [
            (w, re.compile(rf"\b{re.escape(w.lower())}\b")) for w in config.blocklist if w.strip()
        ]
        for text in pool:
            self.add(text)

    def add(self, text: str) -> None:
        self.pool.append(text)
        self.sigs = np.concatenate([self.sigs, neardup.minhash([text])])

    def reason(self, text: str) -> dict[str, Any] | None:
        """Why ``text`` may not join the pool (a reject entry), or None when it may."""
        words = len(text.split())
        if not self.config.min_words <= words <= self.config.max_words:
            return {"reason": "length", "words": words}
        lowered = text.lower()
        hit = next((word for word, pattern in self.blocked if pattern.search(lowered)), None)
        if hit:
            return {"reason": "blocklist", "word": hit}
        best, score = self._closest(text)
        if score >= self.config.rouge_threshold:
            return {"reason": "rouge_similar", "rouge_l": round(score, 3), "similar_to": best}
        return self._near(text)

    def _closest(self, text: str) -> tuple[str, float]:
        best, score = "", 0.0
        for other in self.pool:
            value = self.scorer.score(other, text)["rougeL"].fmeasure
            if value > score:
                best, score = other, value
        return best, score

    def _near(self, text: str) -> dict[str, Any] | None:
        if not len(self.pool):
            return None
        _, j, sim = neardup.cross_duplicates(neardup.minhash([text]), self.sigs, self.config.near_threshold)
        if not len(j):
            return None
        k = int(np.argmax(sim))
        return {
            "reason": "near_duplicate_instruction",
            "similarity": round(float(sim[k]), 3),
            "similar_to": self.pool[j[k]],
        }


CLASSIFY_EXAMPLES = (
    ("Classify the sentiment of this review as positive or negative.", True),
    ("Write a short poem about autumn.", False),
    ("Is this e-mail spam? Answer yes or no.", True),
    ("Explain how a rainbow forms.", False),
)
NO_INPUT = {"", "<none>", "none", "n/a", "<noinput>", "no input"}
_INSTANCE = re.compile(r"input\s*:\s*(.*?)\s*output\s*:\s*(.*)", re.IGNORECASE | re.DOTALL)
_LABEL_FIRST = re.compile(r"class\s*label\s*:\s*(.*?)\s*input\s*:\s*(.*)", re.IGNORECASE | re.DOTALL)


def classify_prompt(seeds: list[SeedTask], instruction: str) -> list[dict[str, str]]:
    """Few-shot yes/no: is this a classification task (a small closed set of answers)?"""
    shots = [(s.instruction, s.is_classification) for s in seeds if s.is_classification is not None][:6]
    shots = shots or list(CLASSIFY_EXAMPLES)
    lines = [f"Task: {task}\nClassification: {'Yes' if flag else 'No'}" for task, flag in shots]
    request = (
        "Is each task a classification task, one whose answer is one of a small fixed set of labels? "
        "Answer Yes or No.\n\n" + "\n\n".join(lines) + f"\n\nTask: {instruction}\nClassification:"
    )
    return [{"role": "user", "content": request}]


def instance_prompt(instruction: str, classification: bool) -> list[dict[str, str]]:
    if classification:
        request = (
            f"Task: {instruction}\n\nThis is a classification task. First name one of its class labels "
            "after 'Class label:', then write an input that belongs to that class after 'Input:'."
        )
    else:
        request = (
            f"Task: {instruction}\n\nWrite one example of this task. If it needs an input (a text to work "
            "on, a question, some data), give it after 'Input:', else write 'Input: <none>'. Then give the "
            "correct answer after 'Output:'."
        )
    return [{"role": "user", "content": request}]


def parse_instance(answer: str, classification: bool) -> tuple[str, str]:
    """(input, output) from an instance answer; a reply without the markers is all output (or, for
    classification, a label on the first line and the input after it)."""
    if classification:
        found = _LABEL_FIRST.search(answer)
        label, text = found.groups() if found else (answer.strip().partition("\n")[::2])
        label = label.strip().splitlines()[0].strip() if label.strip() else ""
        return _no_input(text), label
    found = _INSTANCE.search(answer)
    if not found:
        return "", answer.strip()
    return _no_input(found.group(1)), found.group(2).strip()


def _no_input(text: str) -> str:
    text = text.strip()
    return "" if text.lower() in NO_INPUT else text


@dataclass
class Proposal:
    instruction: str
    examples: list[dict[str, Any]]
    settings: GenSettings
    round: int


class SelfInstruct:
    """The Self-Instruct loop: rounds of new instructions, filtered, each given one instance, until
    ``config.n`` rows would survive the closing audit (or ``config.max_rounds`` rounds have run)."""

    def __init__(
        self,
        generator: Generator,
        seeds: list[SeedTask],
        config: SynthConfig,
        *,
        eval_path: str | None = None,
    ) -> None:
        self.gen, self.seeds, self.config, self.eval_path = generator, seeds, config, eval_path
        self.rng = random.Random(config.seed)
        self.filter = InstructionFilter([s.instruction for s in seeds], config)
        self.generated: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self.dropped: list[dict[str, Any]] = []
        self.rounds = 0

    def run(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(candidate rows in order, rows the filters dropped with their reasons)."""
        for round_ in range(self.config.max_rounds):
            missing = self.config.n - self.clean_rows()
            if missing <= 0:
                break
            self.rounds = round_ + 1
            proposals = self.propose(round_, missing)
            if proposals:
                self.rows += self.instances(proposals)
        return self.rows, self.dropped

    def clean_rows(self) -> int:
        """Rows so far that the closing audit would keep."""
        from tunelab.synth.finish import audit_drops  # noqa: PLC0415

        if not self.rows:
            return 0
        drops = audit_drops(self.rows, eval_path=self.eval_path, near_threshold=self.config.near_threshold)
        return len(self.rows) - len(drops)

    def _examples(self) -> tuple[list[str], list[dict[str, Any]]]:
        """Pool examples for one prompt (mostly seeds, some machine-made) and their provenance."""
        k_gen = min(self.config.generated_examples, len(self.generated), self.config.examples)
        k_seed = min(self.config.examples - k_gen, len(self.seeds))
        chosen: list[tuple[str, dict[str, Any]]] = [
            (s.instruction, {"seed_row": s.row}) for s in self.rng.sample(self.seeds, k_seed)
        ]
        chosen += [(text, {"generated": text}) for text in self.rng.sample(self.generated, k_gen)]
        self.rng.shuffle(chosen)
        return [text for text, _ in chosen], [ref for _, ref in chosen]

    def propose(self, round_: int, wanted: int) -> list[Proposal]:
        """One round of instruction prompts; the candidates that pass the filters (at most ``wanted``)."""
        sampled = [self._examples() for _ in range(self.config.prompts_per_round)]
        # One seed per round: a later round asks again with other samples, not for the same answers.
        settings = replace(self.config.settings, seed=self.config.seed * 1000 + round_)
        answers = self.gen.chat(
            [instruction_prompt(texts) for texts, _ in sampled],
            settings,
            desc=f"instructions, round {round_ + 1}",
        )
        proposals: list[Proposal] = []
        for answer, (_, refs) in zip(answers, sampled, strict=True):
            for text in parse_instructions(answer):
                if len(proposals) >= wanted:
                    return proposals
                why = self.filter.reason(text)
                if why:
                    self.dropped.append({**why, "instruction": text})
                    continue
                self.filter.add(text)
                self.generated.append(text)
                proposals.append(Proposal(text, refs, settings, round_ + 1))
        return proposals

    def classify(self, instructions: list[str]) -> list[bool]:
        convs = [classify_prompt(self.seeds, text) for text in instructions]
        answers = self.gen.chat(
            convs, GenSettings(max_tokens=4, temperature=0.0), desc="classification check"
        )
        return [a.strip().lower().startswith("yes") for a in answers]

    def instances(self, proposals: list[Proposal]) -> list[dict[str, Any]]:
        """One instance per instruction (output first for classification); over-long outputs dropped."""
        flags = self.classify([p.instruction for p in proposals])
        convs = [instance_prompt(p.instruction, flag) for p, flag in zip(proposals, flags, strict=True)]
        settings = self.config.settings
        answers = self.gen.chat(convs, settings, desc="instances")
        rows = []
        for p, flag, answer in zip(proposals, flags, answers, strict=True):
            text, output = parse_instance(answer, flag)
            row = {"instruction": p.instruction, "input": text, "output": output}
            row["provenance"] = self.provenance(p, flag)
            words = len(output.split())
            if words > self.config.max_output_words:
                self.dropped.append({"reason": "output_too_long", "words": words, "row": row})
                continue
            rows.append(row)
        return rows

    def provenance(self, p: Proposal, classification: bool) -> dict[str, Any]:
        return {
            "method": "self-instruct",
            "model": self.gen.name,
            "round": p.round,
            "examples": p.examples,
            "classification": classification,
            "instruction_settings": p.settings.to_dict(),
            "instance_settings": self.config.settings.to_dict(),
        }
