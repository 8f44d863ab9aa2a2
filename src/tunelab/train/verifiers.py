"""Built-in rewards a program can check, named in a recipe as ``builtin:NAME``.

Each is a plain function ``f(prompts, completions, rows, **args) -> list[float]``: ``rows`` are the
data rows the prompts came from, every column included (``answer``, ``tests``, reasoning-gym's
``metadata``, ...); ``args`` come from the recipe's ``objective.rewards[i].args``.

- ``math_answer``: 1 when the completion's final answer equals the row's ``answer`` by
  ``math-verify`` (an ``<answer>`` tag if there is one, else a ``\\boxed{}`` or the last number);
- ``answer_format`` / ``think_format``: 1 when the completion wraps its answer in ``<answer>`` tags
  (after a ``<think>`` block, for ``think_format``);
- ``length_penalty``: 0 up to ``max_chars`` characters, then falling linearly to −1 at twice that;
- ``code_tests``: the share of the row's ``tests`` that pass when run against the completion's
  code in a subprocess with CPU, memory and wall-clock limits (:mod:`tunelab.train.sandbox`);
- ``gym_score``: reasoning-gym's own scorer for the row's task (rows from ``tunelab data gym``).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from typing import Any

from tunelab.train.sandbox import Limits, run_python

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_THINK_THEN_ANSWER = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.DOTALL)
_CODE_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


def tagged_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>...</answer>`` of ``completion``, stripped; None if none."""
    found = _ANSWER.findall(completion)
    return found[-1].strip() if found else None


def _column(row: dict[str, Any], column: str, reward: str) -> Any:
    if column not in row:
        have = ", ".join(sorted(row)) or "(none)"
        raise ValueError(f"reward {reward}: the data row has no column {column!r} (it has {have})")
    return row[column]


def math_answer(
    prompts: list[str], completions: list[str], rows: list[dict[str, Any]], *, column: str = "answer"
) -> list[float]:
    """1.0 when the completion's answer is mathematically equal to ``row[column]``, else 0.0.

    The answer is the last ``<answer>`` tag's content when there is one, otherwise the whole
    completion, from which ``math-verify`` extracts a ``\\boxed{}`` answer or the final number or
    expression. Equality is math-verify's (``1/2`` equals ``0.5`` and ``\\frac{1}{2}``).
    """
    from math_verify import parse, verify  # noqa: PLC0415  (optional dependency: tunelab[rl])

    # math-verify times out with signal.alarm, which only the main thread may use
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    scores = []
    for completion, row in zip(completions, rows, strict=True):
        gold = parse(str(_column(row, column, "math_answer")), parsing_timeout=timeout)
        answer = tagged_answer(completion)
        guess = parse(completion if answer is None else answer, parsing_timeout=timeout)
        ok = bool(gold) and bool(guess) and verify(gold, guess, timeout_seconds=timeout)
        scores.append(float(ok))
    return scores


def answer_format(
    prompts: list[str], completions: list[str], rows: list[dict[str, Any]] | None = None
) -> list[float]:
    """1.0 when the completion holds exactly one non-empty ``<answer>...</answer>``, else 0.0."""
    return [float(len(_ANSWER.findall(c)) == 1 and bool(tagged_answer(c))) for c in completions]


def think_format(
    prompts: list[str], completions: list[str], rows: list[dict[str, Any]] | None = None
) -> list[float]:
    """1.0 for exactly ``<think>...</think><answer>...</answer>`` (whitespace around allowed), else 0.0."""
    return [float(bool(_THINK_THEN_ANSWER.match(c)) and c.count("<think>") == 1) for c in completions]


def length_penalty(
    prompts: list[str],
    completions: list[str],
    rows: list[dict[str, Any]] | None = None,
    *,
    max_chars: int = 1000,
) -> list[float]:
    """0 up to ``max_chars`` characters, then falling linearly to −1 at ``2 × max_chars`` (and below).

    For a penalty on the completion's *tokens* near ``max_new_tokens`` use the objective's
    overlong setting, which sees token counts.
    """
    if max_chars < 1:
        raise ValueError(f"length_penalty: max_chars must be 1 or more, got {max_chars}")
    return [-max(0.0, (len(c) - max_chars) / max_chars) for c in completions]


def completion_code(completion: str) -> str:
    """The last fenced code block of ``completion`` (```python or bare ```), else the whole text."""
    blocks = _CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else completion


def code_tests(
    prompts: list[str],
    completions: list[str],
    rows: list[dict[str, Any]],
    *,
    column: str = "tests",
    cpu_seconds: float = 5.0,
    memory_mb: int = 512,
    wall_seconds: float = 10.0,
) -> list[float]:
    """Share of ``row[column]`` that passes against the completion's code (0.0 when it does not run).

    ``row[column]`` is one Python test (asserts) or a list of them; each runs after the code in
    one child process with the given CPU, memory and wall-clock limits. The limits bound
    resources; they are **not a security boundary**: run untrusted models' code in a container.
    """
    limits = Limits(cpu_seconds=cpu_seconds, memory_mb=memory_mb, wall_seconds=wall_seconds)
    scores = []
    for completion, row in zip(completions, rows, strict=True):
        tests = _column(row, column, "code_tests")
        tests = [tests] if isinstance(tests, str) else [str(t) for t in tests]
        if not tests:
            raise ValueError(f"reward code_tests: the row's {column!r} is empty")
        result = run_python(completion_code(completion), tests, limits)
        scores.append(result.passed / len(tests))
    return scores


def gym_score(
    prompts: list[str], completions: list[str], rows: list[dict[str, Any]], *, require_tags: bool = False
) -> list[float]:
    """reasoning-gym's scorer for the row's task (``metadata.source_dataset``), on the ``<answer>``
    tag's content, or on the whole stripped completion when there is no tag (0.0 with
    ``require_tags``). Rows come from ``tunelab data gym``: ``question``, ``answer``, ``metadata``."""
    from reasoning_gym import get_score_answer_fn  # noqa: PLC0415  (optional dependency: tunelab[rl])

    scores = []
    for completion, row in zip(completions, rows, strict=True):
        metadata = _column(row, "metadata", "gym_score")
        task = metadata.get("source_dataset") if isinstance(metadata, dict) else None
        if not task:
            raise ValueError(
                "reward gym_score: the row's metadata has no source_dataset (write rows with tunelab data gym)"
            )
        answer = tagged_answer(completion)
        if answer is None:
            answer = None if require_tags else completion.strip()
        entry = {"question": row.get("question", ""), "answer": row.get("answer"), "metadata": metadata}
        scores.append(0.0 if answer is None else float(get_score_answer_fn(task)(answer=answer, entry=entry)))
    return scores


BUILTIN_REWARDS: dict[str, Callable[..., list[float]]] = {
    f.__name__: f for f in (math_answer, answer_format, think_format, length_penalty, code_tests, gym_score)
}
