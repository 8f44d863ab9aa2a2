"""`tunelab data judge` without the CLI: read prompts, sample candidates, judge them, build pairs.

Each input row becomes an :class:`Item`: its prompt (the conversation before the last assistant
turn) and its candidates. Preference rows bring two candidates and a human label (chosen over
rejected), which the judge is scored against; other rows bring a prompt only, and candidates are
sampled from one or more models, each candidate with a different seed. The judge's decision gives a
preference pair (best over worst candidate) or a reason why the item gives none (a tie, an
unreadable verdict, fewer than two distinct candidates).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import combinations
from typing import Any

from tunelab.data.canonical import read_canonical
from tunelab.synth.client import Generator, GenSettings
from tunelab.synth.judge import Judge

# Why an item gives no pair (the rejects file's ``reason``): the judge preferred neither candidate; no
# verdict or rating could be read from the judge's answers; fewer than two distinct, non-empty answers.
TIE = "tie"
UNREADABLE = "unreadable_verdict"
TOO_FEW = "too_few_candidates"


@dataclass
class Candidate:
    """One answer to judge: its assistant turns, who wrote it and with which sampling seed."""

    messages: list[dict[str, Any]]
    model: str
    seed: int | None = None

    @property
    def text(self) -> str:
        return "\n".join(m.get("content") or "" for m in self.messages)


@dataclass
class Item:
    """One prompt with its candidates; ``human`` is the index of the human-preferred one, if labelled."""

    row: int
    prompt: list[dict[str, Any]]
    candidates: list[Candidate] = field(default_factory=list)
    human: int | None = None
    tools: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    """The judge's decision on one item: a pair (chosen, rejected) or the reason there is none."""

    item: Item
    chosen: int | None = None
    rejected: int | None = None
    reason: str | None = None
    judge: dict[str, Any] = field(default_factory=dict)


def prompt_of(canonical: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation a row asks to be answered: everything before its last assistant turn."""
    if "messages" in canonical:
        messages = canonical["messages"]
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
        return messages[:last]
    if "prompt" in canonical:
        return canonical["prompt"]
    return [{"role": "user", "content": canonical["text"]}]


def read_items(path: str, fmt: str | None = None, columns: dict[str, str] | None = None) -> list[Item]:
    """Items from any data file tunelab reads; preference rows keep their pair as labelled candidates."""
    rows, _, _ = read_canonical(path, fmt or "auto", columns)
    items = []
    for row, c in rows:
        tools = {"tools": c["tools"]} if c.get("tools") else {}
        item = Item(row, prompt_of(c), tools=tools)
        if "chosen" in c:
            item.candidates = [
                Candidate(c["chosen"], "human:chosen"),
                Candidate(c["rejected"], "human:rejected"),
            ]
            item.human = 0
        if item.prompt:
            items.append(item)
    return items


def sample_candidates(items: list[Item], generators: list[Generator], n: int, settings: GenSettings) -> None:
    """Give every item without candidates ``n`` answers from each generator (seeds seed, seed+1, ...)."""
    todo = [item for item in items if not item.candidates]
    if not todo:
        return
    for generator in generators:
        for k in range(n):
            seeded = replace(settings, seed=settings.seed + k)
            conversations = [item.prompt for item in todo]
            answers = generator.chat(
                conversations, seeded, desc=f"sampling {generator.name} (seed {seeded.seed})"
            )
            for item, answer in zip(todo, answers):
                item.candidates.append(
                    Candidate([{"role": "assistant", "content": answer}], generator.name, seeded.seed)
                )
    for item in todo:
        item.candidates = distinct(item.candidates)


def distinct(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates with non-empty, pairwise different answers (the first of equal ones kept)."""
    seen, out = set(), []
    for candidate in candidates:
        key = " ".join(candidate.text.split())
        if key and key not in seen:
            seen.add(key)
            out.append(candidate)
    return out


def judge_pairwise(judge: Judge, items: list[Item]) -> list[Outcome]:
    """Compare every two candidates of an item (both orders); the most wins over the fewest is the pair."""
    jobs = [
        (i, a, b) for i, item in enumerate(items) for a, b in combinations(range(len(item.candidates)), 2)
    ]
    results = judge.compare(
        [(items[i].prompt, items[i].candidates[a].text, items[i].candidates[b].text) for i, a, b in jobs]
    )
    wins = [[0.0] * len(item.candidates) for item in items]
    verdicts: list[dict[tuple[int, int], Any]] = [{} for _ in items]
    for (i, a, b), result in zip(jobs, results):
        verdicts[i][(a, b)] = result
        if result.winner in ("x", "y"):
            wins[i][a if result.winner == "x" else b] += 1.0
        elif result.winner == "tie":
            wins[i][a] += 0.5
            wins[i][b] += 0.5
    return [_pairwise_outcome(item, wins[i], verdicts[i]) for i, item in enumerate(items)]


def _pairwise_outcome(item: Item, wins: list[float], verdicts: dict[tuple[int, int], Any]) -> Outcome:
    if len(item.candidates) < 2:
        return Outcome(item, reason=TOO_FEW)
    readable = [r for r in verdicts.values() if r.winner is not None]
    if not readable:
        return Outcome(item, reason=UNREADABLE, judge=_verdicts_info(verdicts))
    best = max(range(len(wins)), key=lambda k: wins[k])
    worst = min(range(len(wins)), key=lambda k: wins[k])
    info = {"mode": "pairwise", "wins": wins, **_verdicts_info(verdicts)}
    if wins[best] == wins[worst]:
        return Outcome(item, reason=TIE, judge=info)
    result = verdicts.get((best, worst)) or verdicts.get((worst, best))
    info["reasons"] = list(result.reasons)
    info["position_consistent"] = result.consistent
    return Outcome(item, best, worst, judge=info)


def _verdicts_info(verdicts: dict[tuple[int, int], Any]) -> dict[str, Any]:
    return {
        "verdicts": [
            {"pair": list(k), "orders": list(r.verdicts), "winner": r.winner} for k, r in verdicts.items()
        ]
    }


def judge_pointwise(judge: Judge, items: list[Item], min_margin: float = 1.0) -> list[Outcome]:
    """Rate every candidate 1-10; the best over the worst is the pair when they differ by ``min_margin``."""
    jobs = [(i, k) for i, item in enumerate(items) for k in range(len(item.candidates))]
    ratings = judge.rate([(items[i].prompt, items[i].candidates[k].text) for i, k in jobs])
    per_item: list[list[Any]] = [[None] * len(item.candidates) for item in items]
    for (i, k), rating in zip(jobs, ratings):
        per_item[i][k] = rating
    return [_pointwise_outcome(item, per_item[i], min_margin) for i, item in enumerate(items)]


def _pointwise_outcome(item: Item, ratings: list[Any], min_margin: float) -> Outcome:
    if len(item.candidates) < 2:
        return Outcome(item, reason=TOO_FEW)
    scores = [r.score for r in ratings]
    info = {"mode": "pointwise", "scores": scores}
    scored = [k for k, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return Outcome(item, reason=UNREADABLE, judge=info)
    best = max(scored, key=lambda k: scores[k])
    worst = min(scored, key=lambda k: scores[k])
    if scores[best] - scores[worst] < min_margin or best == worst:
        return Outcome(item, reason=TIE, judge=info)
    info["reasons"] = [ratings[best].reason, ratings[worst].reason]
    return Outcome(item, best, worst, judge=info)


def agreement(outcomes: list[Outcome]) -> dict[str, Any] | None:
    """How often the judge picked the human's chosen answer, over the items that carry a human label."""
    labelled = [o for o in outcomes if o.item.human is not None]
    if not labelled:
        return None
    counts = {"labelled": len(labelled), "agree": 0, "disagree": 0, "tie": 0, "unreadable": 0}
    for o in labelled:
        if o.chosen is not None:
            counts["agree" if o.chosen == o.item.human else "disagree"] += 1
        elif o.reason == TIE:
            counts["tie"] += 1
        elif o.reason == UNREADABLE:
            counts["unreadable"] += 1
    decided = counts["agree"] + counts["disagree"] + counts["tie"]
    counts["rate"] = counts["agree"] / decided if decided else None
    counts["rate_without_ties"] = (
        counts["agree"] / (counts["agree"] + counts["disagree"])
        if counts["agree"] + counts["disagree"]
        else None
    )
    return counts


def pair_row(outcome: Outcome, judge: Judge, settings: GenSettings) -> dict[str, Any]:
    """A preference row (DPO, KTO and reward objectives read it) with the judge's reasons and provenance."""
    item = outcome.item
    chosen, rejected = item.candidates[outcome.chosen], item.candidates[outcome.rejected]
    verdict = {"model": judge.name, "rubric": judge.rubric, **outcome.judge}
    if item.human is not None:
        verdict["agrees_with_human"] = outcome.chosen == item.human
    provenance = {
        "command": "judge",
        "source_row": item.row,
        "chosen": {"model": chosen.model, "seed": chosen.seed},
        "rejected": {"model": rejected.model, "seed": rejected.seed},
        "settings": settings.to_dict(),
    }
    return {
        "prompt": item.prompt,
        "chosen": chosen.messages,
        "rejected": rejected.messages,
        **item.tools,
        "judge": verdict,
        "provenance": provenance,
    }


def dropped_row(outcome: Outcome) -> dict[str, Any]:
    """What an item without a pair is written to the rejects file as (its reason beside it)."""
    item = outcome.item
    candidates = [{"messages": c.messages, "model": c.model, "seed": c.seed} for c in item.candidates]
    return {"prompt": item.prompt, "candidates": candidates, "judge": outcome.judge, "source_row": item.row}
