"""Issue 13, training parts: what `recipe check` and `train` refuse up front, and how a run fails.

Every test here stands for something observed: an AttributeError deep in training for a method ×
objective pair that cannot work, a data file reported without its field, a missing PPO field
reported as a missing `objective`, a run directory left behind by a run that never started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.methods import METHODS
from tunelab.objectives import OBJECTIVES
from tunelab.recipe import RecipeError, load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]
REWARD = f"{REPO / 'recipes' / 'rewards.py'}:letter_share"
runner = CliRunner()


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


# -- 2: method × objective pairs that cannot work are refused by the recipe ---------------------


def _pair_data(tmp_path: Path) -> dict[str, str]:
    """One small data file per kind of objective (instructions, preference pairs, labels)."""
    qa = [
        {"instruction": q, "output": a}
        for q, a in [("Say hi", "hi"), ("Count", "one two"), ("Colour", "blue")]
    ]
    pairs = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(4)]
    labels = [{"text": f"text {i}", "label": ["pos", "neg"][i % 2]} for i in range(4)]
    return {
        "sft": _write_jsonl(tmp_path / "qa.jsonl", qa),
        "pairs": _write_jsonl(tmp_path / "pairs.jsonl", pairs),
        "labels": _write_jsonl(tmp_path / "labels.jsonl", labels),
    }


_DATA_OF = {
    "classify": "labels",
    "dpo": "pairs",
    "simpo": "pairs",
    "orpo": "pairs",
    "kto": "pairs",
    "reward": "pairs",
}


def _pair_recipe(tmp_path: Path, method: str, objective: str) -> dict:
    data = _pair_data(tmp_path)
    section: dict = {"name": objective}
    if OBJECTIVES.get(objective).impl.online:
        section |= {"reward": REWARD, "max_new_tokens": 4}
        section |= {"num_generations": 2} if objective == "grpo" else {}
    return {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": data[_DATA_OF.get(objective, "sft")], "max_length": 64},
        "method": {"name": method},
        "objective": section,
        "training": {"max_steps": 1, "batch_size": 2},
        "output": {"dir": str(tmp_path / "runs"), "name": f"{method}-{objective}"},
    }


def test_virtual_token_methods_refuse_head_objectives_with_the_reason(tmp_path: Path) -> None:
    """Observed: prefix_tuning + reward and prompt_tuning + classify died with an AttributeError in train."""
    for method, objective in [
        ("prefix_tuning", "reward"),
        ("prompt_tuning", "classify"),
        ("adapter", "classify"),
    ]:
        path = _write_recipe(tmp_path / f"{method}.yaml", _pair_recipe(tmp_path, method, objective))
        with pytest.raises(RecipeError) as info:
            load_recipe(path)
        (problem,) = info.value.problems
        assert problem.startswith(f"method {method} cannot train objective {objective}: "), problem
        assert "lora" in problem.split("Use one of:")[1]  # and says what can


def test_recipe_check_and_train_refuse_an_impossible_pair_before_creating_anything(tmp_path: Path) -> None:
    path = _write_recipe(tmp_path / "r.yaml", _pair_recipe(tmp_path, "prefix_tuning", "reward"))
    checked = runner.invoke(app, ["recipe", "check", str(path)])
    assert checked.exit_code == 1 and "method prefix_tuning cannot train objective reward" in checked.output
    trained = runner.invoke(app, ["train", str(path)])
    assert trained.exit_code == 2 and "cannot train objective reward" in trained.output
    assert "Traceback" not in trained.output
    assert not (tmp_path / "runs").exists()


def test_compatibility_is_declared_by_the_method_not_listed_in_the_recipe() -> None:
    refused = {
        (m, o)
        for m in METHODS.names()
        for o in OBJECTIVES.names()
        if not METHODS.get(m).impl.trains(OBJECTIVES.get(o).impl.model_kind)
    }
    heads = {o for o in OBJECTIVES.names() if OBJECTIVES.get(o).impl.model_kind != "causal_lm"}
    assert heads == {"classify", "reward"}
    assert refused == {
        (m, o) for m in ("adapter", "prefix_tuning", "prompt_tuning", "p_tuning") for o in heads
    }
    source = (REPO / "src" / "tunelab" / "recipe.py").read_text()
    assert "prefix_tuning" not in source and "prompt_tuning" not in source


def _pairs() -> list:
    marks = []
    for m in METHODS.names():
        for o in OBJECTIVES.names():
            needs_gpu = [pytest.mark.gpu] if m == "qlora" else []
            marks.append(pytest.param(m, o, marks=[pytest.mark.slow, *needs_gpu], id=f"{m}-{o}"))
    return marks


@pytest.mark.parametrize(("method", "objective"), _pairs())
def test_every_method_objective_pair_trains_a_step_or_is_refused_naming_both(
    tmp_path: Path, method: str, objective: str
) -> None:
    """The whole matrix on the tiny model: no pair may get past the recipe and then fail in training."""
    from tunelab.train.engine import train

    raw = _pair_recipe(tmp_path, method, objective)
    try:
        recipe = parse_recipe(raw)
    except RecipeError as err:
        assert method in str(err) and objective in str(err), err
        return
    result = train(recipe)
    assert result.steps == 1 and (result.run_dir / "final" / "tunelab.json").is_file()


# -- 6: every data file field is checked, and named ---------------------------------------------


def test_missing_data_train_is_named_by_its_field(tmp_path: Path) -> None:
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": "does_not_exist.jsonl"},
        "method": {"name": "lora"},
    }
    path = _write_recipe(tmp_path / "r.yaml", raw)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == ["data.train: does_not_exist.jsonl: file not found"]
    checked = runner.invoke(app, ["recipe", "check", str(path)])
    assert checked.exit_code == 1 and "data.train: does_not_exist.jsonl: file not found" in checked.output
    assert "ok" not in checked.output.split()


def test_every_data_file_field_is_checked_and_hub_ids_are_not(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "here.jsonl", [{"text": "x"}])
    raw = {
        "model": {"name_or_path": "org/some-model"},  # a hub id, not a file: never checked
        "data": {
            "tasks": [
                {"name": "a", "train": "here.jsonl", "eval": "gone-a-eval.jsonl"},
                {"name": "b", "train": "someorg/some_dataset"},  # a hub dataset id
            ],
            "replay": {"path": "gone-replay.jsonl", "fraction": 0.1},
        },
        "method": {"name": "lora"},
        "training": {"ewc": {"previous_data": "gone-old.csv", "lambda": 1.0}},
    }
    path = _write_recipe(tmp_path / "r.yaml", raw)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        "data.tasks.0.eval: gone-a-eval.jsonl: file not found",
        "data.replay.path: gone-replay.jsonl: file not found",
        "training.ewc.previous_data: gone-old.csv: file not found",
    ]


def test_a_reward_script_that_does_not_exist_is_named(tmp_path: Path) -> None:
    _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x"}])
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": "p.jsonl"},
        "method": {"name": "lora"},
        "objective": {"name": "grpo", "reward": "nowhere.py:score"},
    }
    with pytest.raises(RecipeError) as info:
        load_recipe(_write_recipe(tmp_path / "r.yaml", raw))
    assert info.value.problems == ["objective.reward: nowhere.py: file not found"]


# -- 7: a field named like an objective is not dropped from the path ----------------------------


def test_ppo_without_reward_names_objective_reward() -> None:
    raw = {"model": {"name_or_path": "tiny:llama"}, "data": {"train": "x"}, "method": {"name": "lora"}}
    with pytest.raises(RecipeError) as info:
        parse_recipe({**raw, "objective": {"name": "ppo"}})
    assert info.value.problems == ["objective.reward: required field is missing"]
    with pytest.raises(RecipeError) as info:
        parse_recipe({**raw, "objective": {"name": "grpo", "rewrd": "f.py:g"}})
    assert "objective.rewrd: unknown key. Did you mean 'reward'?" in info.value.problems


# -- 9: tunelab's own calls use the current transformers / PEFT APIs ----------------------------


def _calls_from_tunelab(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """FutureWarnings whose deprecated API was called directly by a tunelab frame.

    transformers warns without a stacklevel, so a warning filter on module="tunelab" alone would
    never fire; the spy looks at who called the function that warned."""
    import sys
    import warnings

    found: list[str] = []
    real = warnings.warn

    def spy(message, category=None, stacklevel=1, source=None, **kwargs):
        kind = category or (type(message) if isinstance(message, Warning) else UserWarning)
        if issubclass(kind, FutureWarning):
            frame = sys._getframe(1)  # the deprecated function (or its deprecation wrapper)
            for caller in (frame.f_back, getattr(frame.f_back, "f_back", None)):
                if caller is not None and caller.f_globals.get("__name__", "").startswith("tunelab"):
                    found.append(f"{message} (called at {caller.f_code.co_filename}:{caller.f_lineno})")
                    break
        return real(message, category, stacklevel + 1, source, **kwargs)

    monkeypatch.setattr(warnings, "warn", spy)
    return found


@pytest.mark.slow
def test_train_and_eval_make_no_future_warning_from_tunelab_calls(
    tiny_recipe, tmp_path: Path, qa_rows: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    import warnings

    from tunelab.evaluate.compare import EvalPlan, evaluate_models
    from tunelab.train.engine import train

    found = _calls_from_tunelab(monkeypatch)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", category=FutureWarning, module="tunelab")
        run = train(tiny_recipe("lora", training__max_steps=1, training__gradient_checkpointing=True)).run_dir
        train(tiny_recipe("full", training__max_steps=1, training__gradient_checkpointing=True))
        data = _write_jsonl(tmp_path / "qa-eval.jsonl", qa_rows[:3])
        evaluate_models([("model", str(run))], data, EvalPlan(max_examples=3, speed=True))
    assert found == []


def test_the_spy_sees_a_deprecated_call_made_by_tunelab(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above would catch the observed call (gradient_checkpointing_enable from the engine)."""
    from tunelab.models.load import load_model

    found = _calls_from_tunelab(monkeypatch)
    model, _ = load_model("tiny:llama", device="cpu")
    exec(  # a frame that counts as tunelab's own code
        compile("model.gradient_checkpointing_enable()", "tunelab-probe", "exec"),
        {"__name__": "tunelab.probe", "model": model},
    )
    assert len(found) == 1 and "gradient_checkpointing_enable" in found[0]
