"""Issue 13, training parts: what `recipe check` and `train` refuse up front, and how a run fails.

Every test here stands for something observed: an AttributeError deep in training for a method ×
objective pair that cannot work, a data file reported without its field, a missing PPO field
reported as a missing `objective`, a run directory left behind by a run that never started.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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
    assert checked.exit_code == 2 and "method prefix_tuning cannot train objective reward" in checked.output
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
            marks.append(pytest.param(m, o, marks=pytest.mark.slow, id=f"{m}-{o}"))
    return marks


@pytest.mark.parametrize(("method", "objective"), _pairs())
def test_every_method_objective_pair_trains_a_step_or_is_refused_naming_both(
    tmp_path: Path, method: str, objective: str
) -> None:
    """The whole matrix on the tiny model: no pair may get past the recipe and then fail in training."""
    from tunelab.train.run import train

    raw = _pair_recipe(tmp_path, method, objective)
    try:
        recipe = parse_recipe(raw)
    except RecipeError as err:
        assert method in str(err) and objective in str(err), err
        return
    result = train(recipe)
    assert result.steps == 1 and (result.run_dir / "final" / "tunelab.json").is_file()


# -- 1: recipe values and paths print as written ------------------------------------------------


def test_recipe_check_prints_paths_and_values_verbatim(tmp_path: Path) -> None:
    folder = tmp_path / "[red]recipes"
    folder.mkdir()
    _write_jsonl(folder / "t.jsonl", [{"text": "x"}])
    base = {"model": {"name_or_path": "tiny:llama"}, "method": {"name": "lora"}}
    good = _write_recipe(folder / "good.yaml", {**base, "data": {"train": "t.jsonl"}})
    bad = _write_recipe(folder / "bad.yaml", {**base, "data": {"train": "[bold]gone[/].jsonl"}})
    result = runner.invoke(app, ["recipe", "check", str(good), str(bad)])
    assert result.exit_code == 2
    assert f"ok  {good}" in result.output
    assert "data.train: [bold]gone[/].jsonl: file not found" in result.output


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
    assert checked.exit_code == 2 and "data.train: does_not_exist.jsonl: file not found" in checked.output
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
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith("objective.reward: required field is missing; give a reward")
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
    from tunelab.train.run import train

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


# -- 3: a full disk while checkpointing: clear error, last checkpoint intact --------------------

TORCH_DISK_FULL = "[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed"


def _fail_second_checkpoint(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    """torch.save raises as on a full disk from the second checkpoint on (the first one is written)."""
    real = torch.save
    calls = {"checkpoints": set()}

    def save(obj, path, *args, **kwargs):
        calls["checkpoints"].add(Path(path).parent)
        if len(calls["checkpoints"]) >= 2:
            raise error
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.slow
@pytest.mark.parametrize(
    "error", [RuntimeError(TORCH_DISK_FULL), OSError(28, "No space left on device")], ids=["torch", "enospc"]
)
def test_disk_full_during_a_checkpoint_keeps_the_last_one_and_resumes(
    tiny_recipe, monkeypatch: pytest.MonkeyPatch, error: BaseException
) -> None:
    from tunelab.runs.rundir import RunDir
    from tunelab.train.checkpoint import DiskFullError
    from tunelab.train.run import resume, train

    recipe = tiny_recipe("lora", training__max_steps=4, training__save_every=2)
    run = RunDir(Path(recipe.output.dir) / recipe.output.name)
    _fail_second_checkpoint(monkeypatch, error)
    with pytest.raises(DiskFullError) as info:
        train(recipe)
    message = str(info.value)
    assert message.startswith(f"disk full: could not write checkpoint step-4 in {run.path} (")
    assert f"the last complete checkpoint, {run.checkpoint_dir(2)}, is intact" in message
    assert f"tunelab train --resume {run.path}" in message
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["step-2"]  # no torn step-4, no temp dir
    assert run.read_manifest()["status"] == "failed"
    monkeypatch.undo()  # space freed
    assert resume(run.path).steps == 4


def test_disk_full_from_the_cli_is_one_line_and_exit_2(
    tmp_path: Path, qa_rows: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": _write_jsonl(tmp_path / "t.jsonl", qa_rows), "max_length": 64},
        "method": {"name": "lora"},
        "training": {"max_steps": 4, "batch_size": 3, "save_every": 2},
        "output": {"dir": str(tmp_path / "runs"), "name": "full-disk"},
    }
    _fail_second_checkpoint(monkeypatch, RuntimeError(TORCH_DISK_FULL))
    result = runner.invoke(
        app, ["train", str(_write_recipe(tmp_path / "r.yaml", raw))], env={"COLUMNS": None}
    )
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr  # one line, never folded
    assert errors[0].startswith("error: disk full: could not write checkpoint step-4 in ")
    assert "is intact" in errors[0] and str(tmp_path / "runs" / "full-disk") in errors[0]
    assert "Traceback" not in result.output


def test_only_disk_full_errors_are_reported_as_disk_full() -> None:
    from tunelab.train.checkpoint import is_disk_full

    assert is_disk_full(RuntimeError(TORCH_DISK_FULL))
    assert is_disk_full(OSError(28, "No space left on device"))
    assert not is_disk_full(RuntimeError("CUDA out of memory"))
    assert not is_disk_full(OSError(13, "Permission denied"))


# -- 4: one process per run directory -----------------------------------------------------------


def test_a_second_process_on_a_locked_run_is_refused_naming_the_pid(tmp_path: Path) -> None:
    import os

    from tunelab.runs.rundir import RunDir, RunLockedError

    run = RunDir.create(tmp_path, "busy", lock=True)
    run.write_recipe({"seed": 0})
    try:
        for kwargs in ({"resume": True}, {"overwrite": True}):
            with pytest.raises(RunLockedError) as info:
                RunDir.create(tmp_path, "busy", lock=True, **kwargs)  # a second open file = a second holder
            assert info.value.pid == os.getpid()
            assert f"in use by another tunelab process (PID {os.getpid()})" in str(info.value)
        assert run.recipe_path.exists(), "--overwrite deleted a run that is training"
    finally:
        run.release()
    RunDir.create(tmp_path, "busy", lock=True, resume=True).release()  # free again once released


_HOLD = """
import sys, time
from tunelab.runs.rundir import RunDir
run = RunDir.create(sys.argv[1], "held", lock=True)
run.write_recipe({"seed": 0})
print("locked", flush=True)
time.sleep(600)
"""


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from tunelab.runs.rundir import LOCK_FILE, RunDir, RunLockedError

    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"PID {holder.pid}"):
            RunDir.create(tmp_path, "held", resume=True, lock=True)
        result = runner.invoke(app, ["train", "--resume", str(tmp_path / "held")])
        assert result.exit_code == 2 and f"(PID {holder.pid})" in result.output
        assert "Traceback" not in result.output
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run = RunDir.create(tmp_path, "held", resume=True, lock=True)  # the stale lock is taken over
    try:
        assert (run.path / LOCK_FILE).read_text().strip() == str(os.getpid())
    finally:
        run.release()


def test_train_holds_the_lock_while_it_runs_and_releases_it(tiny_recipe) -> None:
    from tunelab.runs.rundir import RunDir, RunLockedError
    from tunelab.train.run import train

    seen = []

    def probe(step: int, metrics: dict, last: bool) -> None:
        with pytest.raises(RunLockedError):
            RunDir.create(recipe.output.dir, recipe.output.name, resume=True, lock=True)
        seen.append(step)

    recipe = tiny_recipe("lora", training__max_steps=2, training__eval_every=1)
    result = train(recipe, on_eval=probe)
    assert seen == [1, 2]
    RunDir.create(result.run_dir.parent, result.run_dir.name, resume=True, lock=True).release()


# -- 5: a run refused before training leaves no directory ---------------------------------------


def test_a_run_failing_validation_leaves_no_directory_and_the_rerun_needs_no_overwrite(
    tiny_recipe, tmp_path: Path
) -> None:
    from tunelab.train.preflight import PreflightError
    from tunelab.train.run import train

    strict = tiny_recipe("lora", training__max_steps=1, data__strict=True)  # eval rows leak from train
    with pytest.raises(PreflightError):
        train(strict)
    run_dir = Path(strict.output.dir) / strict.output.name
    assert not run_dir.exists()
    assert [p.name for p in Path(strict.output.dir).iterdir()] == []  # no hidden leftovers either
    done = train(tiny_recipe("lora", training__max_steps=1))
    assert done.steps == 1
    # --overwrite with a run that fails its checks: the run it was to replace is still there, whole
    with pytest.raises(PreflightError):
        train(strict, overwrite=True)
    assert json.loads((done.run_dir / "manifest.json").read_text())["status"] == "completed"
    assert (done.run_dir / "final" / "tunelab.json").is_file()
    assert [p.name for p in Path(strict.output.dir).iterdir()] == [done.run_dir.name]


@pytest.mark.slow
def test_a_resumed_run_failing_setup_keeps_its_directory_and_says_failed(tiny_recipe) -> None:
    from tunelab.train.run import resume, train

    result = train(tiny_recipe("lora", training__max_steps=2, training__save_every=1))
    data = Path(tiny_recipe("lora").data.train)
    data.rename(data.with_suffix(".moved"))
    with pytest.raises(ValueError, match="file not found"):
        resume(result.run_dir)
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "file not found" in manifest["error"]


# -- 8: progress lines when stderr is not a terminal --------------------------------------------


def test_training_off_a_terminal_prints_progress_lines(tmp_path: Path, qa_rows: list[dict]) -> None:
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": _write_jsonl(tmp_path / "t.jsonl", qa_rows), "max_length": 64},
        "method": {"name": "lora"},
        "training": {"max_steps": 5, "batch_size": 3, "log_every": 2},
        "output": {"dir": str(tmp_path / "[bold]runs"), "name": "plain"},  # markup-like: printed as is
    }
    result = runner.invoke(app, ["train", str(_write_recipe(tmp_path / "r.yaml", raw))])
    assert result.exit_code == 0, result.output
    run = tmp_path / "[bold]runs" / "plain"
    assert f"run {run}: " in result.output and f"final model in {run / 'final'}" in result.output
    lines = [x for x in result.output.splitlines() if x.startswith("train step ")]
    assert [x.split()[2] for x in lines] == ["2/5", "4/5", "5/5"]  # every log_every, and the last step
    assert all(" loss " in x and " lr " in x and " tok/s " in x and " ETA " in x for x in lines), lines
    assert "━" not in result.output  # no bar redraws in a log file


@pytest.mark.slow
def test_online_training_off_a_terminal_prints_progress_lines(tmp_path: Path, qa_rows: list[dict]) -> None:
    raw = _pair_recipe(tmp_path, "full", "grpo")
    raw["training"] = {"max_steps": 2, "batch_size": 2}
    result = runner.invoke(app, ["train", str(_write_recipe(tmp_path / "g.yaml", raw))])
    assert result.exit_code == 0, result.output
    lines = [x for x in result.output.splitlines() if x.startswith("grpo step ")]
    assert [x.split()[2] for x in lines] == ["1/2", "2/2"]
    assert all(" reward " in x and " lr " in x and " ETA " in x for x in lines), lines


def test_progress_lines_at_least_every_30_seconds_and_at_the_last_step() -> None:
    import io

    from tunelab.console import make_console
    from tunelab.train.progress import StepProgress

    stream, now = io.StringIO(), [0.0]
    console = make_console(file=stream)
    with StepProgress(console, "train", total=5, every=100, clock=lambda: now[0]) as progress:
        for step, t in [(1, 10.0), (2, 31.0), (3, 40.0), (4, 50.0), (5, 55.0)]:
            now[0] = t
            progress.update(step, "loss 1.0")
    lines = stream.getvalue().splitlines()
    assert [x.split()[2] for x in lines] == ["2/5", "5/5"]
    assert lines[0] == "train step 2/5  loss 1.0  ETA 0:00:46"  # 15.5 s a step, 3 steps to go


# -- 10: a failed online run closes its trackers -------------------------------------------------


def test_a_ppo_run_failing_midway_finishes_its_trackers_and_the_manifest_says_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    from tunelab.train.run import train

    script = tmp_path / "flaky.py"
    script.write_text(
        "calls = []\n"
        "def reward(prompts, completions):\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3:\n"
        "        raise RuntimeError('reward server went away')\n"
        "    return [0.5 for _ in completions]\n"
    )
    raw = _pair_recipe(tmp_path, "full", "ppo")
    raw["objective"]["reward"] = f"{script}:reward"
    raw["training"] = {"max_steps": 4, "batch_size": 2, "report_to": ["mlflow"]}
    with pytest.raises(RuntimeError, match="reward server went away"):
        train(parse_recipe(raw))
    run_dir = tmp_path / "runs" / "full-ppo"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "reward server went away" in manifest["error"]
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file:{run_dir / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tunelab").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "reward_mean")] == [1, 2]


def test_rl_uses_the_engine_lifecycle_not_a_copy() -> None:
    source = (REPO / "src" / "tunelab" / "train" / "rl.py").read_text()
    assert "run_lifecycle(" in source and "set_status(" not in source
    assert "from tunelab.train.common import" in source and "_progress" not in source
