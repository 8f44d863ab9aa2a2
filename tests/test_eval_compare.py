"""Before/after evaluation: paired bootstrap CI, compare_models, forgetting, and the deployment gate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from tunelab.evaluate.compare import EvalPlan, compare_models, evaluate_models, paired_bootstrap_ci
from tunelab.evaluate.forgetting import load_general_texts, regression
from tunelab.evaluate.gate import GateError, check_gate, gate_values, with_limits
from tunelab.recipe import GateSection, RecipeError, parse_recipe

ANSWER = "zebra"
GENERAL_TEXT = """The capital of France is Paris, and the capital of Italy is Rome.

Water boils at one hundred degrees Celsius at sea level.

She walked to the market, bought some apples and bread, and came home before the rain.

Computers follow instructions written by programmers in languages such as Python.
"""


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def hard_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A LoRA run (lm_head saved with the adapter) trained hard to answer one thing to every prompt."""
    from tunelab.train.run import train

    tmp = tmp_path_factory.mktemp("hard")
    prompts = [
        "Say hi",
        "Count to three",
        "Name a colour",
        "Name an animal",
        "What is two plus two",
        "Say bye",
    ]
    data = _write_jsonl(tmp / "train.jsonl", [{"instruction": p, "output": ANSWER} for p in prompts])
    general = tmp / "general.txt"
    general.write_text(GENERAL_TEXT, encoding="utf-8")
    recipe = parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "lora", "modules_to_save": ["lm_head"]},
            "training": {
                "max_steps": 20,
                "batch_size": 6,
                "learning_rate": 1e-2,
                "warmup_steps": 0,
                "lr_scheduler": "constant",
            },
            "output": {"dir": str(tmp / "runs"), "name": "hard"},
        }
    )
    result = train(recipe)
    return {"run": str(result.run_dir), "data": str(data), "general": str(general), "tmp": str(tmp)}


# ---- paired bootstrap ------------------------------------------------------------------------


def test_bootstrap_of_identical_scores_is_exactly_zero():
    scores = np.random.default_rng(0).integers(0, 2, 300).astype(float)
    assert paired_bootstrap_ci(scores, scores, n_boot=500, seed=1) == (0.0, 0.0, 0.0)


def test_bootstrap_ci_contains_the_planted_delta_and_narrows_with_n():
    rng = np.random.default_rng(42)
    n = 4000
    base = (rng.random(n) < 0.6).astype(float)
    tuned = base.copy()
    flip = rng.choice(np.flatnonzero(base == 0), size=n // 10, replace=False)
    tuned[flip] = 1.0  # exactly +0.10 accuracy
    delta, lo, hi = paired_bootstrap_ci(base, tuned, n_boot=1000, seed=0)
    assert delta == pytest.approx(0.10)
    assert lo < 0.10 < hi
    assert lo > 0  # a real gain this large on 4000 examples is distinguishable from no change
    _, lo_small, hi_small = paired_bootstrap_ci(base[:100], tuned[:100], n_boot=1000, seed=0)
    assert (hi_small - lo_small) > 3 * (hi - lo)  # ~sqrt(40) wider with 40x fewer examples


def test_bootstrap_is_seeded_and_matches_a_plain_loop():
    rng = np.random.default_rng(3)
    base, tuned = rng.random(50), rng.random(50)
    first = paired_bootstrap_ci(base, tuned, n_boot=200, seed=7)
    assert first == paired_bootstrap_ci(base, tuned, n_boot=200, seed=7)
    draws = np.random.default_rng(7).integers(0, 50, size=(200, 50))
    means = [float(np.mean(tuned[row] - base[row])) for row in draws]
    assert first[1] == pytest.approx(np.quantile(means, 0.025))
    assert first[2] == pytest.approx(np.quantile(means, 0.975))


def test_bootstrap_rejects_unpaired_scores():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap_ci([1.0, 0.0], [1.0])


# ---- compare_models and forgetting ------------------------------------------------------------


def test_compare_models_reports_the_tuned_gain_with_ci_and_forgetting(hard_run):
    plan = EvalPlan(max_new_tokens=6, forgetting_data=hard_run["general"], n_boot=300)
    payload = compare_models("tiny:llama", hard_run["run"], hard_run["data"], plan)
    base, tuned = payload["models"]
    assert (base["role"], tuned["role"]) == ("base", "tuned")
    assert payload["main_metric"] == "exact_match"
    assert base["metrics"]["exact_match"] == 0.0 and tuned["metrics"]["exact_match"] == 1.0
    comp = payload["comparison"]
    assert comp["delta"] == pytest.approx(1.0) and comp["ci95"] == [1.0, 1.0] and comp["n"] == 6
    assert tuned["metrics"]["loss"] < base["metrics"]["loss"]
    forgetting = payload["forgetting"]
    assert forgetting["regression"] == pytest.approx(
        regression(forgetting["base_perplexity"], forgetting["tuned_perplexity"])
    )
    assert forgetting["regression"] > 0.10  # trained hard on one answer: worse on everything else
    gate = check_gate(with_limits(None, max_forgetting=0.10), *gate_values(payload), compared=True)
    assert not gate["passed"] and "forgetting" in gate["failures"][0]


def test_identical_models_have_zero_delta(tmp_path, qa_rows):
    data = _write_jsonl(tmp_path / "eval.jsonl", qa_rows)
    payload = compare_models("tiny:llama", "tiny:llama", str(data), EvalPlan(max_new_tokens=2, n_boot=100))
    assert payload["comparison"]["delta"] == 0.0 and payload["comparison"]["ci95"] == [0.0, 0.0]
    names = [m["name"] for m in payload["models"]]
    assert len(set(names)) == 2  # same spec twice is still told apart


def test_general_texts_from_txt_paragraphs_and_from_data_files(tmp_path, qa_rows):
    txt = tmp_path / "g.txt"
    txt.write_text(GENERAL_TEXT, encoding="utf-8")
    assert len(load_general_texts(str(txt))) == 4
    data = _write_jsonl(tmp_path / "d.jsonl", qa_rows)
    texts = load_general_texts(str(data), limit=2)
    assert texts == ["Say hi\nhi there", "Count to three\none two three"]


def test_default_general_texts_are_plot_summaries_not_reviews():
    from tunelab.assets import AssetMissingError
    from tunelab.evaluate.forgetting import default_general_texts

    try:
        texts = default_general_texts(5, seed=0)
    except AssetMissingError:
        pytest.skip("rotten-tomatoes asset not fetched")
    assert len(texts) == 5 and texts == default_general_texts(5, seed=0)
    assert all(len(t) > 100 for t in texts)  # plots are paragraphs; the reviews are one-line snippets


# ---- gate ---------------------------------------------------------------------------------------


def _payload(base: dict[str, float] | None, tuned: dict[str, float]) -> dict:
    models = [{"name": "b", "role": "base", "metrics": base}] if base else []
    models.append({"name": "t", "role": "tuned" if base else "model", "metrics": tuned})
    return {"models": models, "forgetting": {"regression": 0.05}}


def test_gate_names_each_failure_with_value_and_limit():
    gate = GateSection(min={"accuracy": 0.8}, max={"forgetting": 0.01}, min_delta={"accuracy": 0.0})
    values, deltas = gate_values(_payload({"accuracy": 0.75}, {"accuracy": 0.7}))
    result = check_gate(gate, values, deltas, compared=True)
    assert not result["passed"]
    assert result["failures"] == [
        "accuracy = 0.7000 is below the minimum 0.8000",
        "forgetting = 0.0500 is above the maximum 0.0100",
        "Δ accuracy (tuned − base) = -0.0500 is below the minimum change +0.0000",
    ]
    assert check_gate(GateSection(min={"accuracy": 0.5}), values, deltas, compared=True)["passed"]


def test_gate_errors_on_unknown_metrics_and_on_delta_without_baseline():
    values, deltas = gate_values(_payload(None, {"accuracy": 0.7}))
    with pytest.raises(GateError, match="unknown metric.*acurracy.*produced: accuracy, forgetting"):
        check_gate(GateSection(min={"acurracy": 0.5}), values, deltas, compared=False)
    with pytest.raises(GateError, match="--compare"):
        check_gate(GateSection(min_delta={"accuracy": 0.0}), values, deltas, compared=False)


def test_gate_section_is_strict():
    raw = {"model": {"name_or_path": "tiny:llama"}, "method": {"name": "lora"}, "data": {"train": "x"}}
    with pytest.raises(RecipeError, match="eval.gate.minimum: unknown key"):
        parse_recipe({**raw, "eval": {"gate": {"minimum": {"accuracy": 0.5}}}})
    recipe = parse_recipe({**raw, "eval": {"gate": {"min": {"exact_match": 0.5}}}})
    assert recipe.eval.gate.min == {"exact_match": 0.5}


def _gate_recipe(path: Path, gate: dict) -> Path:
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "method": {"name": "lora"},
        "data": {"train": "x.jsonl"},
        "eval": {"gate": gate},
    }
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_cli_gate_exit_codes(tmp_path, qa_rows):
    from tunelab.cli import app

    data = str(_write_jsonl(tmp_path / "eval.jsonl", qa_rows[:4]))
    runner = CliRunner()
    base = ["eval", "tiny:llama", "--data", data, "--max-new-tokens", "2", "--gate"]
    passing = _gate_recipe(tmp_path / "pass.yaml", {"max": {"exact_match": 0.5}})
    result = runner.invoke(app, [*base, str(passing)])
    assert result.exit_code == 0, result.output
    failing = _gate_recipe(tmp_path / "fail.yaml", {"min": {"exact_match": 0.5}})
    result = runner.invoke(app, [*base, str(failing)])
    assert result.exit_code == 3
    assert "exact_match = 0.0000 is below the minimum 0.5000" in result.output
    unknown = _gate_recipe(tmp_path / "unknown.yaml", {"min": {"exact_matsh": 0.5}})
    result = runner.invoke(app, [*base, str(unknown)])
    assert result.exit_code == 2
    assert "exact_matsh" in result.output and "exact_match" in result.output


def test_cli_max_forgetting_fails_a_run_against_its_own_base_and_writes_the_report(hard_run):
    from tunelab.cli import app

    args = ["eval", hard_run["run"], "--data", hard_run["data"], "--max-new-tokens", "2"]
    result = CliRunner().invoke(
        app,
        [*args, "--forgetting-data", hard_run["general"], "--forgetting-n", "3", "--max-forgetting", "0.1"],
    )
    assert result.exit_code == 3, result.output
    assert "forgetting" in result.output and "above the maximum 0.1000" in result.output
    report = json.loads((Path(hard_run["run"]) / "eval" / "report.json").read_text())
    assert report["kind"] == "eval" and report["forgetting"]["base"] == "tiny:llama"
    assert report["forgetting"]["n_texts"] == 3  # of the four paragraphs: --forgetting-n is honoured
    assert report["gate"]["passed"] is False


def test_single_model_forgetting_needs_a_base(tmp_path, qa_rows):
    data = str(_write_jsonl(tmp_path / "eval.jsonl", qa_rows[:2]))
    txt = tmp_path / "g.txt"
    txt.write_text(GENERAL_TEXT, encoding="utf-8")
    with pytest.raises(ValueError, match="needs a base"):
        evaluate_models([("model", "tiny:llama")], data, EvalPlan(max_new_tokens=1, forgetting_data=str(txt)))


# ---- runs of other objectives are scored by their own kind of metric ------------------------------

REPO = Path(__file__).resolve().parents[1]
KINDS = {
    "classify": ("tiny_cls_eval", "accuracy"),
    "reward": ("tiny_pref_eval", "reward_accuracy"),
    "dpo": ("tiny_pref_eval", "implicit_reward_accuracy"),
}


@pytest.mark.parametrize(
    "objective",
    ["classify", pytest.param("reward", marks=pytest.mark.slow), pytest.param("dpo", marks=pytest.mark.slow)],
)
def test_runs_are_evaluated_by_their_objective(objective, tmp_path):
    from tunelab.recipe import load_recipe
    from tunelab.train.run import train

    recipe = load_recipe(
        REPO / "recipes" / f"tiny-{objective}.yaml", overrides=[f"output.dir={tmp_path}", "training.epochs=1"]
    )
    run = str(train(recipe).run_dir)
    data_name, main = KINDS[objective]
    data = str(REPO / "recipes" / "data" / f"{data_name}.jsonl")
    payload = compare_models("tiny:llama", run, data, EvalPlan(n_boot=200))
    assert payload["main_metric"] == main
    base, tuned = (m["metrics"][main] for m in payload["models"])
    assert payload["comparison"]["delta"] == pytest.approx(tuned - base)
    assert tuned > base  # one epoch on the tiny task already separates the trained head from a random one
    if objective == "classify":
        from tunelab.evaluate.classify import evaluate_classifier
        from tunelab.evaluate.run import load_for_eval, load_task

        task = load_task(data, run)
        assert task.max_length == recipe.data.max_length == 32  # inputs cut as in training
        model, tok = load_for_eval(run)
        report, _ = evaluate_classifier(model, tok, task.texts, task.golds, max_length=32)
        assert tuned == pytest.approx(report.accuracy)
        assert set(payload["confusion_matrices"]) == {"tiny:llama", run}
