"""Rewards that can verify: functions that see the data rows, weighted sums logged term by term, the
built-in verifiers (math-verify, formats, length, code in a limited subprocess, reasoning-gym), the
`data gym` command, and GRPO runs on the tiny model whose rewards read the rows."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tunelab.objectives.grpo  # noqa: F401  (registers before the recipe schema is built)
from tunelab.recipe import RecipeError, load_recipe, parse_recipe
from tunelab.train.rewards import Rewards, load_reward
from tunelab.train.sandbox import Limits, run_python
from tunelab.train.verifiers import (
    answer_format,
    code_tests,
    completion_code,
    gym_score,
    length_penalty,
    math_answer,
    tagged_answer,
    think_format,
)

REPO = Path(__file__).resolve().parents[1]


def _module(tmp_path: Path, source: str) -> str:
    path = tmp_path / "my_reward.py"
    path.write_text(source)
    return str(path)


# -- how a reward function is called -----------------------------------------------------------------


def test_reward_functions_get_rows_the_way_their_signature_asks(tmp_path: Path) -> None:
    path = _module(
        tmp_path,
        "def two(prompts, completions):\n    return [len(c) for c in completions]\n"
        "def three(prompts, completions, rows):\n    return [float(r['answer'] in c) for c, r in zip(completions, rows)]\n"
        "def keyword(prompts, completions, *, rows, bonus=0.0):\n    return [len(rows) + bonus for _ in completions]\n"
        "def kwargs(prompts, completions, **kw):\n    return [float(r['answer'] == c) for c, r in zip(completions, kw['rows'])]\n"
        "def nothing():\n    return []\n",
    )
    rows = [{"answer": "4"}, {"answer": "7"}]
    prompts, completions = ["a", "b"], ["it is 4", "7"]
    assert load_reward(f"{path}:two")(prompts, completions, [None, None], rows) == [7.0, 1.0]
    assert load_reward(f"{path}:three")(prompts, completions, [None, None], rows) == [1.0, 1.0]
    assert load_reward(f"{path}:keyword", args={"bonus": 0.5})(prompts, completions, (), rows) == [2.5, 2.5]
    assert load_reward(f"{path}:kwargs")(prompts, completions, (), rows) == [0.0, 1.0]
    with pytest.raises(ValueError, match=r"must take \(prompts, completions\[, rows\]\)"):
        load_reward(f"{path}:nothing")
    with pytest.raises(ValueError, match="accept nope"):
        load_reward(f"{path}:two", args={"nope": 1})
    with pytest.raises(ValueError, match="no built-in reward 'maths'"):
        load_reward("builtin:maths")


def test_rewards_sum_with_weights_and_keep_each_term(tmp_path: Path) -> None:
    path = _module(
        tmp_path,
        "def exact(prompts, completions, rows):\n    return [float(c == r['answer']) for c, r in zip(completions, rows)]\n",
    )
    recipe = parse_recipe(
        {
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": "x.jsonl"},
            "method": {"name": "full"},
            "objective": {
                "name": "grpo",
                "rewards": [
                    {"fn": f"{path}:exact", "weight": 2.0},
                    {
                        "fn": "builtin:length_penalty",
                        "weight": 0.5,
                        "args": {"max_chars": 2},
                        "name": "short",
                    },
                    {"fn": "builtin:answer_format", "weight": -1.0},
                ],
            },
        }
    )
    rewards = Rewards.from_config(recipe.objective)
    total, parts = rewards(["p", "p"], ["4", "<answer>7</answer>"], [None, None], [{"answer": "4"}] * 2)
    assert parts == {"exact": [1.0, 0.0], "short": [0.0, -8.0], "answer_format": [0.0, 1.0]}
    assert total == [2.0, 0.5 * -8.0 - 1.0]
    assert rewards.several


def test_recipe_takes_reward_or_rewards_not_both() -> None:
    base = {"model": {"name_or_path": "tiny:llama"}, "data": {"train": "x.jsonl"}, "method": {"name": "full"}}
    with pytest.raises(RecipeError, match="not both"):
        parse_recipe(
            {**base, "objective": {"name": "grpo", "reward": "a.py:f", "rewards": [{"fn": "b.py:g"}]}}
        )
    with pytest.raises(RecipeError, match="reward"):
        parse_recipe({**base, "objective": {"name": "grpo"}})
    with pytest.raises(RecipeError, match="weight"):
        parse_recipe({**base, "objective": {"name": "grpo", "rewards": [{"fn": "b.py:g", "weight": "x"}]}})


def test_relative_reward_files_in_rewards_resolve_next_to_the_recipe(tmp_path: Path) -> None:
    (tmp_path / "r.py").write_text("def f(prompts, completions):\n    return [0.0] * len(completions)\n")
    (tmp_path / "x.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "recipe.yaml").write_text(
        "model: {name_or_path: 'tiny:llama'}\ndata: {train: x.jsonl}\nmethod: {name: full}\n"
        "objective: {name: grpo, rewards: [{fn: 'r.py:f'}, {fn: 'builtin:think_format'}]}\n"
    )
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert recipe.objective.rewards[0].fn == f"{(tmp_path / 'r.py').resolve()}:f"
    assert recipe.objective.rewards[1].fn == "builtin:think_format"


# -- built-in verifiers ---------------------------------------------------------------------------------


def test_math_answer_checks_with_math_verify() -> None:
    rows = [{"answer": "12"}] * 6 + [{"answer": "\\frac{1}{2}"}]
    completions = [
        "so the answer is 12.",
        "We get \\boxed{12}",
        "<think>3 then 13</think><answer>12</answer>",  # the tag wins over the numbers before it
        "The answer is 13",
        "",
        "<answer>twelve</answer>",
        "<answer>0.5</answer>",
    ]
    assert math_answer([""] * 7, completions, rows) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="no column 'answer'.*solution"):
        math_answer(["p"], ["1"], [{"solution": "1"}])
    assert math_answer(["p"], ["x = 3"], [{"gold": "3"}], column="gold") == [1.0]


def test_format_rewards() -> None:
    completions = [
        "<think>a</think><answer>4</answer>",
        " <think>\na\n</think>\n<answer>4</answer>\n",
        "<answer>4</answer>",
        "<answer></answer>",
        "<answer>1</answer><answer>2</answer>",
        "<think>a</think>4",
        "<think>a</think><think>b</think><answer>4</answer>",
    ]
    assert answer_format([], completions) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    assert think_format([], completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert tagged_answer("<answer> 1 </answer> then <answer>2</answer>") == "2"
    assert tagged_answer("none") is None


def test_length_penalty() -> None:
    assert length_penalty([], ["a" * 10, "a" * 15, "a" * 20, "a" * 40], max_chars=10) == [
        0.0,
        -0.5,
        -1.0,
        -3.0,
    ]
    with pytest.raises(ValueError, match="max_chars"):
        length_penalty([], ["a"], max_chars=0)


def test_code_tests_scores_the_share_of_passing_tests() -> None:
    rows = [{"tests": ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 1"]}]
    solution = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert code_tests(["p"], [solution], rows) == [pytest.approx(2 / 3)]
    assert code_tests(["p"], ["def add(a, b) return"], rows) == [0.0]  # a syntax error runs no test
    assert code_tests(["p"], ["def add(a, b):\n    return a + b"], [{"tests": "assert add(1, 1) == 2"}]) == [
        1.0
    ]
    assert completion_code("```\nx = 1\n```\ntext\n```py\ny = 2\n```") == "y = 2\n"


def test_sandbox_limits_cpu_wall_memory_environment_and_scratch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELAB_SECRET_PROBE", "leaked")
    quick = Limits(cpu_seconds=1, memory_mb=256, wall_seconds=20)
    started = time.monotonic()
    spin = run_python("while True:\n    pass", ["pass"], quick)
    assert not spin.ran and spin.passed == 0 and not spin.timed_out  # killed by RLIMIT_CPU, not the wall
    hog = run_python("x = bytearray(1024 * 1024 * 1024)", ["pass"], quick)
    assert not hog.ran and hog.passed == 0
    sleeper = run_python("import time\ntime.sleep(60)", ["pass"], Limits(cpu_seconds=5, wall_seconds=1))
    assert sleeper.timed_out and sleeper.passed == 0
    assert time.monotonic() - started < 20
    probe = (
        "import os, pathlib\n"
        "here = pathlib.Path.cwd()\n"
        "pathlib.Path('/tmp/tunelab_sandbox_probe').write_text(str(here))\n"
        "secret = os.environ.get('TUNELAB_SECRET_PROBE')\n"
    )
    env = run_python(probe, ["assert secret is None", "assert here.name.startswith('tunelab-sandbox-')"])
    assert env.ran and env.passed == 2
    scratch = Path(Path("/tmp/tunelab_sandbox_probe").read_text())
    assert not scratch.exists()  # the scratch directory is removed afterwards
    Path("/tmp/tunelab_sandbox_probe").unlink()


def test_sandbox_kills_what_the_code_leaves_running(tmp_path: Path) -> None:
    marker = tmp_path / "still-running"
    child = f"import time, pathlib; time.sleep(2); pathlib.Path({str(marker)!r}).write_text('x')"
    code = f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\n"
    assert run_python(code, ["pass"]).passed == 1
    time.sleep(3)
    assert not marker.exists()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network use in a test that must run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_gym_rows_score_with_reasoning_gyms_own_scorer(no_network: None) -> None:
    pytest.importorskip("reasoning_gym")
    from tunelab.data.gym import gym_rows

    rows = gym_rows("chain_sum", 4, seed=3)
    assert rows == gym_rows("chain_sum", 4, seed=3)  # same seed, same problems
    assert {"prompt", "system", "question", "answer", "metadata"} <= set(rows[0])
    assert rows[0]["metadata"]["source_dataset"] == "chain_sum"
    right = [f"<answer>{r['answer']}</answer>" for r in rows]
    wrong = [f"<answer>{int(r['answer']) + 1}</answer>" for r in rows]
    assert gym_score([""] * 4, right, rows) == [1.0] * 4
    assert gym_score([""] * 4, wrong, rows) == [0.0] * 4
    assert gym_score([""], [rows[0]["answer"]], rows[:1]) == [1.0]  # no tag: the whole completion
    assert gym_score([""], [rows[0]["answer"]], rows[:1], require_tags=True) == [0.0]
    assert math_answer([""] * 4, right, rows) == [1.0] * 4
    with pytest.raises(ValueError, match="source_dataset"):
        gym_score([""], ["1"], [{"metadata": {}}])


def test_data_gym_command(tmp_path: Path, no_network: None) -> None:
    pytest.importorskip("reasoning_gym")
    from tunelab.cli import app

    out = tmp_path / "gym.jsonl"
    runner = CliRunner()
    result = runner.invoke(
        app, ["data", "gym", "basic_arithmetic", "--n", "5", "--system", "none", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and "system" not in rows[0] and rows[0]["prompt"] == rows[0]["question"]
    again = runner.invoke(app, ["data", "gym", "basic_arithmetic", "--n", "5", "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    typo = runner.invoke(app, ["data", "gym", "basic_arithmetik", "-o", str(tmp_path / "x.jsonl")])
    assert typo.exit_code == 2 and "Did you mean 'basic_arithmetic'" in typo.output
    assert "Traceback" not in typo.output + again.output


# -- GRPO runs on the tiny model -------------------------------------------------------------------------


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_grpo_rewards_see_every_column_of_their_rows(tmp_path: Path) -> None:
    rows = [
        {"prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "tests": [f"t{i}"], "extra": {"i": i}}
        for i in range(4)
    ]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    seen = tmp_path / "seen.jsonl"
    path = _module(
        tmp_path,
        "import json\n"
        f"SEEN = {str(seen)!r}\n"
        "def spy(prompts, completions, rows):\n"
        "    with open(SEEN, 'a') as f:\n"
        "        for p, r in zip(prompts, rows):\n"
        "            f.write(json.dumps({'prompt': p, 'row': r}) + '\\n')\n"
        "    return [len(c) / 100 for c in completions]\n",
    )
    objective = {
        "name": "grpo",
        "num_generations": 2,
        "max_new_tokens": 6,
        "rewards": [
            {"fn": f"{path}:spy", "weight": 1.0},
            {"fn": "builtin:length_penalty", "weight": 0.5, "args": {"max_chars": 5}},
        ],
    }
    recipe = parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "full"},
            "objective": objective,
            "training": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-3},
            "output": {"dir": str(tmp_path / "runs"), "name": "spy"},
        }
    )
    from tunelab.train.run import train

    result = train(recipe)
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(calls) == 2 * 2 * 2  # steps × prompts × generations
    for call in calls:
        row = next(r for r in rows if r["prompt"] in call["prompt"])
        assert call["row"] == row  # every column, as written
    metrics = _metrics(result.run_dir)
    assert {"reward/spy", "reward/length_penalty"} <= set(metrics[-1])
    for m in metrics:
        assert m["reward_mean"] == pytest.approx(m["reward/spy"] + 0.5 * m["reward/length_penalty"], abs=1e-5)


def test_shipped_gym_recipe_trains_on_the_tiny_model(tmp_path: Path) -> None:
    """recipes/grpo_gym.yaml as shipped, on tiny:llama for two short steps: the gym rows reach the
    verifiable rewards and each reward is logged on its own."""
    pytest.importorskip("reasoning_gym")
    from tunelab.train.run import train

    recipe = load_recipe(
        REPO / "recipes" / "grpo_gym.yaml",
        overrides=[
            "model.name_or_path=tiny:llama",
            "training.max_steps=2",
            "objective.num_generations=2",
            "objective.max_new_tokens=8",
            "training.batch_size=2",
            f"output.dir={tmp_path}",
        ],
    )
    result = train(recipe)
    assert result.steps == 2
    metrics = _metrics(result.run_dir)
    assert {"reward/gym_score", "reward/answer_format"} <= set(metrics[-1])
    assert (result.run_dir / "final" / "tunelab.json").exists()


def test_verifier_modules_import_no_optional_dependency_at_import_time() -> None:
    """math-verify and reasoning-gym load only when their reward runs (tunelab works without [rl])."""
    code = (
        "import sys, tunelab.train.verifiers, tunelab.train.rewards, tunelab.data.gym\n"
        "assert 'math_verify' not in sys.modules and 'reasoning_gym' not in sys.modules\n"
    )
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
