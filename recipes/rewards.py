"""Programmatic rewards for the example RL recipes (`objective.reward: rewards.py:FUNCTION`).

A reward function takes the prompts and the sampled completions and returns one float per
completion. These are deliberately simple, dense signals a 2-layer random model can learn within
seconds, so the examples show the reward rising; replace them with a task check or a reward model.
"""

from __future__ import annotations

TARGET_LETTER = "e"


def letter_share(prompts: list[str], completions: list[str]) -> list[float]:
    """Share of the completion's characters that are the letter ``e`` (0 for an empty completion)."""
    return [text.count(TARGET_LETTER) / len(text) if text else 0.0 for text in completions]


def mentions_colour(prompts: list[str], completions: list[str]) -> list[float]:
    """1 when the completion names the colour the prompt asks about ("... the red bee?" → "red")."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        words = prompt.rstrip("?").split()
        colour = words[-2] if len(words) >= 2 else ""
        scores.append(float(bool(colour) and colour.lower() in completion.lower()))
    return scores
