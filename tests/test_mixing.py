"""Multi-task mixing: proportions follow weights or temperature, tags, determinism, per-task eval."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from tunelab.data.mixing import (
    TaskSpec,
    load_task,
    mix_tasks,
    tag_row,
    task_probabilities,
    write_mixture,
)
from tunelab.evaluate.tasks import evaluate_per_task


def rows(prefix: str, n: int) -> list[dict]:
    return [{"instruction": f"{prefix} question {i}", "output": f"{prefix} {i}"} for i in range(n)]


def shares(mixed: list[tuple[str, dict]]) -> dict[str, float]:
    counts = Counter(task for task, _ in mixed)
    return {task: c / len(mixed) for task, c in counts.items()}


def test_weights_set_the_proportions() -> None:
    tasks = [TaskSpec("a", rows("a", 10), 3.0), TaskSpec("b", rows("b", 500), 1.0)]
    mixed = mix_tasks(tasks, total=1000, seed=0)
    assert len(mixed) == 1000
    assert shares(mixed) == pytest.approx({"a": 0.75, "b": 0.25}, abs=0.002)
    # a small task is repeated in full passes: every row 75 times
    assert set(Counter(r["instruction"] for t, r in mixed if t == "a").values()) == {75}


@pytest.mark.parametrize(
    ("temperature", "expected_a"),
    [(1.0, 100 / 1000), (2.0, 10 / (10 + 900**0.5)), (1000.0, 0.5)],
)
def test_temperature_sampling_follows_sizes(temperature: float, expected_a: float) -> None:
    tasks = [TaskSpec("a", rows("a", 100)), TaskSpec("b", rows("b", 900))]
    assert task_probabilities(tasks, temperature)["a"] == pytest.approx(expected_a, rel=1e-2)
    mixed = mix_tasks(tasks, temperature=temperature, total=2000, seed=1)
    assert shares(mixed)["a"] == pytest.approx(expected_a, abs=0.01)


def test_higher_temperature_flattens_towards_uniform() -> None:
    tasks = [TaskSpec("small", rows("s", 20)), TaskSpec("big", rows("b", 2000))]
    small = [task_probabilities(tasks, t)["small"] for t in (1.0, 2.0, 5.0, 100.0)]
    assert small == sorted(small) and small[0] == pytest.approx(20 / 2020) and small[-1] < 0.5


def test_default_total_is_every_row_once_each_with_equal_weights() -> None:
    tasks = [TaskSpec("a", rows("a", 4), 1.0), TaskSpec("b", rows("b", 4), 1.0)]
    mixed = mix_tasks(tasks, seed=0)
    assert sorted(r["instruction"] for _, r in mixed) == sorted(
        r["instruction"] for r in rows("a", 4) + rows("b", 4)
    )


def test_tags_prefix_the_prompt_only() -> None:
    mixed = mix_tasks(
        [TaskSpec("qa", rows("q", 3)), TaskSpec("sum", rows("s", 3))], seed=0, tag_template="[{task}] "
    )
    for task, row in mixed:
        assert row["instruction"].startswith(f"[{task}] ") and not row["output"].startswith("[")
    chat = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
        ]
    }
    tagged = tag_row(chat, "[x] ")
    assert [m["content"] for m in tagged["messages"]] == ["be brief", "[x] hi", "yo"]
    assert chat["messages"][1]["content"] == "hi", "the input row is not modified"
    assert tag_row({"text": "abc"}, "[t] ") == {"text": "[t] abc"}


def test_mixing_is_deterministic() -> None:
    tasks = [TaskSpec("a", rows("a", 7), 2.0), TaskSpec("b", rows("b", 11))]
    assert mix_tasks(tasks, total=50, seed=5) == mix_tasks(tasks, total=50, seed=5)
    assert mix_tasks(tasks, total=50, seed=5) != mix_tasks(tasks, total=50, seed=6)


def test_bad_arguments_name_the_problem() -> None:
    with pytest.raises(ValueError, match="not both"):
        mix_tasks([TaskSpec("a", rows("a", 2), 2.0), TaskSpec("b", rows("b", 2))], temperature=2.0)
    with pytest.raises(ValueError, match="unique"):
        mix_tasks([TaskSpec("a", rows("a", 2)), TaskSpec("a", rows("b", 2))])
    with pytest.raises(ValueError, match="no rows"):
        mix_tasks([TaskSpec("a", [])])


def test_write_mixture_and_per_task_eval(tmp_path: Path) -> None:
    from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer
    from tunelab.objectives.sft import SftConfig, SftObjective
    from tunelab.recipe import DataSection
    from tunelab.train.loop import evaluate_loss

    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(name, 3)))
    tasks = [load_task(n, str(tmp_path / f"{n}.jsonl")) for n in ("a", "b")]
    assert "messages" in tasks[0].rows[0]
    data, task_file = write_mixture(
        mix_tasks(tasks, seed=0, tag_template="[{task}] "), tmp_path / "mix.jsonl"
    )
    assert len(data.read_text().splitlines()) == len(task_file.read_text().splitlines()) == 6
    tokenizer = build_tiny_tokenizer()
    objective = SftObjective(SftConfig(), tokenizer, DataSection(train=str(data), max_length=64))
    model = build_tiny_llama(tokenizer)
    metrics = evaluate_per_task(model, objective, tasks, loss=evaluate_loss, tag_template="[{task}] ")
    assert set(metrics) == {"a/eval_loss", "a/eval_perplexity", "b/eval_loss", "b/eval_perplexity"}

    def loss_of(rows: list[dict]) -> float:
        features = [objective.encode(i, r) for i, r in enumerate(rows)]
        return evaluate_loss(model, objective, [_untruncated(f) for f in features], 16, "cpu")["eval_loss"]

    for task in tasks:  # each task's own rows, tagged as in training, and nothing else
        tagged = loss_of([tag_row(r, f"[{task.name}] ") for r in task.rows])
        assert metrics[f"{task.name}/eval_loss"] == pytest.approx(tagged, rel=1e-6)
        assert metrics[f"{task.name}/eval_perplexity"] == pytest.approx(math.exp(tagged), rel=1e-6)
        assert tagged != pytest.approx(loss_of(task.rows), rel=1e-6)  # the tag is really in the prompt
    assert metrics["a/eval_loss"] != pytest.approx(metrics["b/eval_loss"], rel=1e-6)


def _untruncated(feature: dict) -> dict:
    feature.pop("truncated", None)  # encode's bookkeeping; collate takes tensors only
    return feature
