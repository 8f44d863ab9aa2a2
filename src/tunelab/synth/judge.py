"""LLM-as-judge: pointwise scores (1-10 against a rubric) and pairwise verdicts (A/B, ties allowed).

Pairwise judging asks twice with the candidates' positions swapped, so a judge that prefers whichever
answer comes first (a known bias: Zheng et al., 2023, "Judging LLM-as-a-judge") cannot decide a pair
by position: a candidate wins only when both orders name it; a split vote is a tie. Ties are never
written as preference pairs (a pair needs a winner) but are counted, as unparseable verdicts are.

The judge samples greedily (temperature 0) so a verdict is reproducible, and every call goes through
the generation client, so a re-run with the same inputs is answered from its cache.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.synth.client import Generator, GenSettings

DEFAULT_RUBRIC = (
    "Helpfulness: does the answer do what the user asked, completely?\n"
    "Correctness: are its facts, reasoning and code right?\n"
    "Harmlessness: does it avoid unsafe, deceptive or offensive content?\n"
    "Clarity: is it well organised and no longer than it needs to be?"
)

# The request ends the user's turn and asks for the verdict first: small models follow the end of a
# prompt best, and a judge cut off by its token budget has still given its verdict. The first verdict
# in the answer counts (the one asked for); a judge that explains first and then concludes has only one.
POINTWISE_SYSTEM = (
    "You are an impartial judge of an AI assistant's answer. Judge it against this rubric:\n{rubric}"
)
PAIRWISE_SYSTEM = (
    "You are an impartial judge comparing the answers of two AI assistants, A and B, to the same "
    "conversation. Judge them against this rubric:\n{rubric}\nThe order in which the answers appear, "
    "their length and the assistants' names must not affect your verdict."
)
POINTWISE_ASK = (
    "Rate the answer from 1 (worst) to 10 (best) by the rubric. Start your reply with the rating in "
    "double brackets, for example [[7]], then explain it in one or two sentences."
)
PAIRWISE_ASK = (
    "Which answer is better by the rubric? Start your reply with [[A]] if A is better, [[B]] if B is "
    "better or [[C]] for a tie, then explain it in one or two sentences."
)

# The asked-for form first; then, for judges that do not follow it exactly, the usual free forms
# ("Score: 7", "7/10"; "Verdict: A", "Assistant B is better").
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_RATING_FREE = re.compile(r"(?i)\b(?:rating|score)\s*[:=]\s*(\d+(?:\.\d+)?)|\b(\d+(?:\.\d+)?)\s*/\s*10\b")
_VERDICT = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_VERDICT_FREE = re.compile(
    r"(?i)\bverdict\s*[:=]\s*\W*(A|B|C|tie)\b|\b(?:assistant|answer)\s+(A|B)\s+is\s+better\b"
)


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a judge's answer (the first one given), or None when there is none."""
    found = _RATING.findall(text) or ["".join(groups) for groups in _RATING_FREE.findall(text)]
    if not found:
        return None
    value = float(found[0])
    return value if 1 <= value <= 10 else None


def parse_verdict(text: str) -> str | None:
    """``"A"``, ``"B"`` or ``"tie"`` from a judge's answer (the first verdict given), else None."""
    found = _VERDICT.findall(text) or ["".join(groups) for groups in _VERDICT_FREE.findall(text)]
    if not found:
        return None
    verdict = found[0].upper()
    return "tie" if verdict in ("C", "TIE") else verdict


def render_conversation(messages: Sequence[dict[str, Any]]) -> str:
    """A conversation as plain text for the judge to read (roles named, content as written)."""
    return "\n\n".join(f"[{m['role']}]\n{m.get('content') or ''}" for m in messages)


def pointwise_request(prompt: Sequence[dict[str, Any]], answer: str, rubric: str) -> list[dict[str, str]]:
    """The judge's conversation for rating one answer."""
    user = f"## Conversation\n{render_conversation(prompt)}\n\n## Answer to rate\n{answer}\n\n## Verdict\n{POINTWISE_ASK}"
    return [
        {"role": "system", "content": POINTWISE_SYSTEM.format(rubric=rubric)},
        {"role": "user", "content": user},
    ]


def pairwise_request(
    prompt: Sequence[dict[str, Any]], first: str, second: str, rubric: str
) -> list[dict[str, str]]:
    """The judge's conversation for comparing two answers, ``first`` shown as A."""
    user = (
        f"## Conversation\n{render_conversation(prompt)}\n\n"
        f"## Answer of assistant A\n{first}\n\n## Answer of assistant B\n{second}\n\n## Verdict\n{PAIRWISE_ASK}"
    )
    return [
        {"role": "system", "content": PAIRWISE_SYSTEM.format(rubric=rubric)},
        {"role": "user", "content": user},
    ]


@dataclass
class Rating:
    """One pointwise judgement: the score (None when the answer held no rating) and the judge's text."""

    score: float | None
    reason: str


@dataclass
class Comparison:
    """One pairwise judgement of (x, y), asked in both orders.

    ``winner`` is ``"x"``, ``"y"``, ``"tie"`` (the judge said so, or the two orders disagreed) or None
    (a verdict could not be read). ``verdicts`` are the raw verdicts of the (x, y) and (y, x) orders.
    """

    winner: str | None
    verdicts: tuple[str | None, str | None]
    reasons: tuple[str, str]
    consistent: bool = field(init=False)

    def __post_init__(self) -> None:
        first, second = self.verdicts
        swapped = {"A": "B", "B": "A"}.get(second or "", second)
        self.consistent = first is not None and first == swapped


def combine(first: str | None, second: str | None) -> str | None:
    """The winner of (x, y) from the verdict on (x as A, y as B) and on (y as A, x as B)."""
    if first is None or second is None:
        return None
    as_xy = {"A": "x", "B": "y", "tie": "tie"}
    a, b = as_xy[first], {"A": "y", "B": "x", "tie": "tie"}[second]
    return a if a == b else "tie"


class Judge:
    """A generator asked to rate or compare answers against a rubric."""

    def __init__(
        self, generator: Generator, *, rubric: str | None = None, max_tokens: int = 256, seed: int = 0
    ):
        self.generator = generator
        self.rubric = rubric or DEFAULT_RUBRIC
        self.settings = GenSettings(max_tokens=max_tokens, temperature=0.0, top_p=1.0, seed=seed)

    @property
    def name(self) -> str:
        return self.generator.name

    def rate(self, items: Sequence[tuple[Sequence[dict[str, Any]], str]]) -> list[Rating]:
        """Score each (prompt messages, answer) from 1 to 10."""
        if not items:
            return []
        requests = [pointwise_request(prompt, answer, self.rubric) for prompt, answer in items]
        answers = self.generator.chat(requests, self.settings, desc="judging")
        return [Rating(parse_rating(text), text) for text in answers]

    def compare(self, items: Sequence[tuple[Sequence[dict[str, Any]], str, str]]) -> list[Comparison]:
        """Judge each (prompt messages, x, y) twice, x first and then y first, in one batch."""
        if not items:
            return []
        forward = [pairwise_request(prompt, x, y, self.rubric) for prompt, x, y in items]
        backward = [pairwise_request(prompt, y, x, self.rubric) for prompt, x, y in items]
        answers = self.generator.chat(forward + backward, self.settings, desc="judging")
        out = []
        for first_text, second_text in zip(answers[: len(items)], answers[len(items) :]):
            first, second = parse_verdict(first_text), parse_verdict(second_text)
            out.append(Comparison(combine(first, second), (first, second), (first_text, second_text)))
        return out


def open_spec(spec: str, **options: Any) -> Generator:
    """A generator from one spec string: a tunelab model spec, or an OpenAI-compatible endpoint URL
    with the served model after ``#`` (``http://127.0.0.1:8000/v1#my-model``; none: the first listed)."""
    from tunelab.synth.client import open_generator  # noqa: PLC0415  (loads torch/openai on use)

    if spec.startswith(("http://", "https://")):
        url, _, served = spec.partition("#")
        return open_generator(served or None, endpoint=url, **options)
    return open_generator(spec, **options)


class JudgeReward:
    """A judge as an online-RL reward source: each completion's 1-10 rating is its reward.

    Called as ``reward(prompts, completions, messages)`` like every reward in
    :mod:`tunelab.train.rewards`. The judge reads the conversation when the row had one (``messages``),
    else the prompt text as the user's turn. A rating that cannot be read scores ``unparsed_score``,
    the middle of the scale by default, so a judge's slip neither rewards nor punishes the policy.
    """

    def __init__(self, judge: Judge, *, unparsed_score: float = 5.5) -> None:
        self.judge, self.unparsed_score = judge, unparsed_score
        self.unreadable = 0  # ratings that could not be read, over the run

    @classmethod
    def from_config(cls, config: Any, *, device: str = "auto") -> JudgeReward:
        """From the recipe's ``{judge, rubric, max_tokens, unparsed_score, concurrency}``."""
        from tunelab.console import make_console  # noqa: PLC0415

        # The per-call "judging: N rows" lines would interleave with the training log; keep it quiet.
        quiet = make_console(stderr=True, quiet=True)
        generator = open_spec(config.judge, device=device, concurrency=config.concurrency, console=quiet)
        judge = Judge(generator, rubric=config.rubric, max_tokens=config.max_tokens)
        return cls(judge, unparsed_score=config.unparsed_score)

    def __call__(
        self, prompts: list[str], completions: list[str], messages: Sequence[list[dict[str, Any]] | None] = ()
    ) -> list[float]:
        items = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            conversation = messages[i] if i < len(messages) else None
            items.append((conversation or [{"role": "user", "content": prompt}], completion))
        ratings = self.judge.rate(items)
        self.unreadable += sum(r.score is None for r in ratings)
        return [self.unparsed_score if r.score is None else r.score for r in ratings]
