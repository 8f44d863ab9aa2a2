"""`tunelab sweep`: space validation, the search on a planted objective, resume, pruning, grid,
and one real end-to-end sweep of tiny training runs through the CLI."""

from __future__ import annotations

import csv
import json
import math

import optuna
import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.recipe import load_recipe
from tunelab.sweep.run import PruningReporter, SweepError, SweepSettings, run_sweep
from tunelab.sweep.space import SpaceError, parse_space, sweep_base, validate_space

LR_SPACE = {"training.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}}
quiet = Console(stderr=True, quiet=True)


def planted(recipe, on_eval):
    """A stand-in for training whose metric is lowest at learning rate 1e-3."""
    value = (math.log10(recipe.training.learning_rate) + 3) ** 2
    on_eval(1, {"eval_loss": value}, True)
    return {"eval_loss": value}


def sweep(recipe, space=LR_SPACE, train_fn=planted, **settings):
    settings.setdefault("trials", 4)
    return run_sweep(recipe, parse_space(space), SweepSettings(**settings), train_fn=train_fn, console=quiet)


def rows_of(result):
    return [(r["trial"], r["state"], r["params"], r["eval_loss"]) for r in result.report.rows]


def test_space_validation_reports_every_problem_at_once(tiny_recipe):
    base = sweep_base(tiny_recipe(training__warmup_steps=""))
    space = parse_space(
        {
            "training.learnig_rate": {"type": "float", "low": 1e-4, "high": 1e-2},
            "training.warmup_ratio": {"type": "float", "low": 0.0, "high": 1.5},
            "method.name": ["ia3", "prompt_tuning"],
            "method.r": {"type": "int", "low": 4, "high": 16},
        }
    )
    with pytest.raises(SpaceError) as err:
        validate_space(space, base)
    text = str(err.value)
    assert "3 problems: " in text and "\n" not in text
    assert "Did you mean 'learning_rate'?" in text
    assert "training.warmup_ratio=1.5: the recipe rejects it" in text
    assert "method.r: 'r' is not a field" in text and "['ia3', 'prompt_tuning']" in text


def test_distribution_shapes_are_checked(tiny_recipe):
    with pytest.raises(SpaceError) as err:
        parse_space(
            {
                "a.b": {"type": "float", "low": 0.0, "high": 1.0, "log": True},
                "c.d": {"type": "int", "low": 5, "high": 1},
                "e.f": {"type": "normal"},
                "g.h": {"type": "categorical", "choises": [1]},
            }
        )
    text = str(err.value)
    assert "a.b: log: true needs low > 0" in text
    assert "c.d: low (5) must be below high (1)" in text
    assert "e.f: type must be float, int or categorical" in text
    assert "g.h.choises: unknown key. Did you mean 'choices'?" in text


def test_tpe_finds_the_planted_best_learning_rate(tiny_recipe):
    result = sweep(tiny_recipe(), trials=12, name="planted")
    values = [r["eval_loss"] for r in result.report.rows]
    best = result.report.best
    assert best["eval_loss"] == min(values)
    assert abs(math.log10(best["params"]["training.learning_rate"]) + 3) < 0.3  # within 2x of 1e-3
    assert result.report.rows[-1]["best_so_far"] == best["eval_loss"]
    sweep_dir = result.sweep_dir
    with open(sweep_dir / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in table] == list(range(12))
    assert float(table[best["trial"]]["eval_loss"]) == pytest.approx(best["eval_loss"])
    saved = json.loads((sweep_dir / "results.json").read_text())
    assert saved["best"]["trial"] == best["trial"] and saved["importances"] == {"training.learning_rate": 1.0}
    assert (sweep_dir / "sweep.png").stat().st_size > 1000
    best_recipe = load_recipe(sweep_dir / "best_recipe.yaml")
    assert best_recipe.training.learning_rate == best["params"]["training.learning_rate"]
    assert best_recipe.output.name == "planted-best"


def test_conditional_fields_are_sampled_only_for_methods_that_have_them(tiny_recipe):
    seen = []

    def record(recipe, on_eval):
        seen.append((recipe.method.name, getattr(recipe.method, "r", None)))
        return {"eval_loss": 1.0 + len(seen) / 10}

    space = {"method.name": ["lora", "ia3"], "method.r": {"type": "int", "low": 2, "high": 32, "step": 2}}
    result = sweep(tiny_recipe(), space, record, trials=8, sampler="random")
    assert {name for name, _ in seen} == {"lora", "ia3"}
    for (name, r), row in zip(seen, result.report.rows):
        if name == "ia3":
            assert r is None and "method.r" not in row["params"]
        else:
            assert r == row["params"]["method.r"]


def test_rerun_continues_and_proposes_what_an_uninterrupted_sweep_would(tiny_recipe):
    first = sweep(tiny_recipe(), trials=2, name="a")
    continued = sweep(tiny_recipe(), trials=4, name="a")
    straight = sweep(tiny_recipe(), trials=4, name="b")
    assert continued.ran == 2 and len(continued.report.rows) == 4
    assert rows_of(continued)[:2] == rows_of(first)
    assert rows_of(continued) == rows_of(straight)


@pytest.mark.parametrize("sampler", ["tpe", "grid"])
def test_a_cut_off_trial_does_not_count_and_is_run_again(tiny_recipe, sampler):
    calls = []

    def interrupted_third(recipe, on_eval):
        calls.append(recipe.training.learning_rate)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return planted(recipe, on_eval)

    space = {"training.learning_rate": [1e-4, 1e-3, 1e-2, 1e-1]} if sampler == "grid" else LR_SPACE
    with pytest.raises(KeyboardInterrupt):
        sweep(tiny_recipe(), space, interrupted_third, trials=3, sampler=sampler)
    result = sweep(tiny_recipe(), space, interrupted_third, trials=3, sampler=sampler)
    states = [r["state"] for r in result.report.rows]
    assert states == ["complete", "complete", "interrupted", "complete"]
    assert calls[3] == calls[2]  # the cut-off trial's values are tried again
    if sampler == "grid":
        assert len(set(calls)) == 3


def test_a_killed_sweep_is_continued(tiny_recipe, tmp_path):
    from tunelab.runs.manifest import build_manifest
    from tunelab.runs.rundir import RunDir

    first = sweep(tiny_recipe(), trials=2, name="killed")
    study = optuna.load_study(study_name="killed", storage=f"sqlite:///{first.sweep_dir / 'study.db'}")
    running = study.ask()  # what a SIGKILL mid-trial leaves: a RUNNING trial and a running run
    run = RunDir.create(first.sweep_dir, "trial-002")
    run.write_manifest(build_manifest(recipe={}, data_files=[], seed=0, run_name=run.name))
    run.set_status("running")
    running.set_user_attr("run_dir", str(run.path))
    result = sweep(tiny_recipe(), trials=3, name="killed")
    assert [r["state"] for r in result.report.rows] == ["complete", "complete", "interrupted", "complete"]
    assert result.notes == ["trial 2 was cut off; it does not count and its values are tried again"]
    assert run.read_manifest()["status"] == "interrupted"


def test_training_errors_fail_the_trial_not_the_sweep(tiny_recipe):
    def diverges_on_large_lr(recipe, on_eval):
        if recipe.training.learning_rate > 1e-3:
            raise RuntimeError("loss is nan")
        return planted(recipe, on_eval)

    result = sweep(tiny_recipe(), trials=6, train_fn=diverges_on_large_lr, sampler="random")
    failed = [r for r in result.report.rows if r["state"] == "failed"]
    assert failed and all(r["params"]["training.learning_rate"] > 1e-3 for r in failed)
    assert all("RuntimeError: loss is nan" in r["error"] for r in failed)
    assert result.report.best["params"]["training.learning_rate"] <= 1e-3


def test_median_pruner_stops_a_trial_whose_curve_is_worse(tiny_recipe):
    reported = []

    def curves(recipe, on_eval):
        trial = len(reported)
        reported.append([])
        level = 5.0 if trial == 3 else 1.0  # trial 3 is far worse than the three before it
        for step in range(1, 6):
            value = level - 0.1 * step
            reported[-1].append(step)
            on_eval(step, {"eval_loss": value}, step == 5)
        return {"eval_loss": value}

    result = sweep(tiny_recipe(), trials=5, train_fn=curves)
    states = [r["state"] for r in result.report.rows]
    assert states == ["complete", "complete", "complete", "pruned", "complete"]
    assert reported[3] == [1]  # stopped at its first evaluation
    pruned = result.report.rows[3]
    assert pruned["at_step"] == 1 and pruned["eval_loss"] == pytest.approx(4.9)


def test_pruning_stops_real_training_and_marks_the_run(tiny_recipe):
    from tunelab.runs.rundir import RunDir
    from tunelab.train.run import train

    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # prunes any loss
    reporter = PruningReporter(study.ask(), "eval_loss")
    recipe = tiny_recipe(training__eval_every=2)
    with pytest.raises(optuna.TrialPruned):
        train(recipe, console=quiet, on_eval=reporter)
    run = RunDir(f"{recipe.output.dir}/{recipe.output.name}")
    reporter.mark_run_pruned(run.path)
    manifest = run.read_manifest()
    assert manifest["status"] == "interrupted" and manifest["pruned"] is True
    assert manifest["pruned_at_step"] == 2
    assert not run.final_dir.exists()


def test_engine_calls_on_eval_after_each_evaluation(tiny_recipe):
    from tunelab.train.run import train

    calls = []
    result = train(tiny_recipe(training__eval_every=2), console=quiet, on_eval=lambda *a: calls.append(a))
    assert [(step, last) for step, _, last in calls] == [(2, False), (4, False), (6, True)]
    assert calls[-1][1] == result.final_eval


def test_grid_runs_each_combination_once(tiny_recipe):
    space = {
        "training.learning_rate": [1e-4, 1e-3, 1e-2],
        "method.r": {"type": "int", "low": 4, "high": 8, "step": 4},
    }
    result = sweep(tiny_recipe(), space, trials=10, sampler="grid")
    combos = [tuple(sorted(r["params"].items())) for r in result.report.rows]
    assert len(combos) == 6 and len(set(combos)) == 6
    with pytest.raises(SpaceError, match="--sampler grid needs a finite set"):
        sweep(tiny_recipe(), trials=2, sampler="grid", name="g2")


def test_sweep_refuses_what_it_cannot_do(tiny_recipe):
    with pytest.raises(SweepError, match="different metric"):
        sweep(tiny_recipe(), trials=1, name="x")
        sweep(tiny_recipe(), trials=2, name="x", metric="eval_perplexity")
    with pytest.raises(SweepError, match="has none: set data.eval"):
        sweep(tiny_recipe(data__eval=""), trials=1)
    with pytest.raises(SweepError, match="Computed: eval_loss"):
        sweep(tiny_recipe(), trials=1, metric="eval_acc", direction="maximize", name="y")
    with pytest.raises(SweepError, match="--direction: cannot tell"):
        sweep(tiny_recipe(), trials=1, metric="eval_score")


def test_importances_need_two_completed_trials(tiny_recipe):
    result = sweep(tiny_recipe(), trials=1)
    assert result.report.importances == {}
    assert "at least 2 completed trials (have 1)" in result.report.importance_note


def write_tiny_recipe(tmp_path, qa_rows):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    recipe = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": "data.jsonl", "eval": "data.jsonl", "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "training": {"max_steps": 4, "batch_size": 3, "eval_every": 2, "warmup_steps": 0},
        "output": {"dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    space = tmp_path / "space.yaml"
    space.write_text("training.learning_rate: {type: float, low: 1.0e-4, high: 3.0e-2, log: true}\n")
    return path, space


def test_cli_sweep_end_to_end_with_tiny_training_and_resume(tmp_path, qa_rows):
    recipe, space = write_tiny_recipe(tmp_path, qa_rows)
    args = ["sweep", str(recipe), "--space", str(space), "--pruner", "none", "--name", "s"]
    first = CliRunner().invoke(app, [*args, "--trials", "2"])
    assert first.exit_code == 0, first.output
    sweep_dir = tmp_path / "runs" / "s"
    before = json.loads((sweep_dir / "results.json").read_text())["trials"]
    second = CliRunner().invoke(app, [*args, "--trials", "3"])
    assert second.exit_code == 0, second.output
    assert "continuing sweep" in second.output
    results = json.loads((sweep_dir / "results.json").read_text())
    trials = results["trials"]
    assert len(trials) == 3 and trials[:2] == before
    for t in trials:
        run = sweep_dir / f"trial-{t['trial']:03d}"
        trial_recipe = load_recipe(run / "recipe.yaml")
        manifest = json.loads((run / "manifest.json").read_text())
        assert trial_recipe.training.learning_rate == t["params"]["training.learning_rate"]
        assert manifest["status"] == "completed" and (run / "final").is_dir()
        assert manifest["final_eval"]["eval_loss"] == pytest.approx(t["eval_loss"])
    best = results["best"]
    assert best["eval_loss"] == min(t["eval_loss"] for t in trials)
    best_recipe = load_recipe(sweep_dir / "best_recipe.yaml")
    assert best_recipe.training.learning_rate == best["params"]["training.learning_rate"]
    assert best_recipe.output.name == "s-best" and best_recipe.method.r == 4
    assert (sweep_dir / "study.db").is_file() and (sweep_dir / "sweep.png").is_file()
    resumed = CliRunner().invoke(app, ["sweep", "--resume", str(sweep_dir), "--trials", "3", "--seed", "1"])
    assert resumed.exit_code == 2 and "pass only --trials (got --seed)" in resumed.output
