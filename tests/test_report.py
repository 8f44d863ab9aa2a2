"""Run and eval reports: every number on the page comes from report.json, the page is self-contained
and renders in a real browser, and the engine writes the report at the end of a run without ever
failing the run for it."""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from rich.console import Console

from tunelab.runs import report as report_module
from tunelab.runs.report import write_eval_report, write_run_report
from tunelab.runs.summary import fmt

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A number as it stands in text: not glued to a word or another number ("ci95", "v2.1" are not numbers).
NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![\w.])")


def visible_text(page: str) -> str:
    """What a reader sees: no CSS, no tags (so no attributes, no base64 images), entities decoded."""
    page = re.sub(r"<(style|script)\b.*?</\1>", " ", page, flags=re.S | re.I)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def numbers_in(text: str) -> list[str]:
    return NUMBER.findall(text)


def allowed_numbers(report: Any) -> set[str]:
    """Every number the page may print: each JSON number through fmt(), plus numbers written inside
    JSON strings and keys (a path, a timestamp, a failure message are printed verbatim)."""
    allowed: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                allowed.update(numbers_in(str(key)))
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str):
            allowed.update(numbers_in(node))
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            allowed.add(fmt(node))

    walk(report)
    return allowed


def assert_numbers_come_from_json(page: str, report: dict) -> str:
    text = visible_text(page)
    allowed = allowed_numbers(report)
    strays = [n for n in numbers_in(text) if n not in allowed]
    assert not strays, f"numbers on the page that are not in report.json: {strays}"
    return text


def assert_self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page.lower()
    images = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)


@pytest.fixture
def synthetic_run(tmp_path: Path) -> Path:
    """A finished run directory written by hand: the report must need nothing but these files."""
    run = tmp_path / "runs" / "lr-sweep-3"
    run.mkdir(parents=True)
    train = [
        {"step": s, "loss": 3.0 / s + 0.123456, "lr": 1e-3 * (1 - s / 10), "grad_norm": 0.5 + s / 7}
        for s in range(1, 9)
    ]
    evals = [{"step": s, "eval_loss": 2.5 / s + 0.2345678, "eval_perplexity": 10.0 / s} for s in (4, 8)]
    rows = train[:4] + evals[:1] + train[4:] + evals[1:]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "seed": 7,
        "model": {"name_or_path": "tiny:llama"},
        "method": {"name": "lora", "r": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj"]},
        "objective": {"name": "sft"},
        "training": {"learning_rate": 0.001, "max_steps": 8, "warmup_ratio": None},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    manifest = {
        "run_name": "lr-sweep-3",
        "status": "completed",
        "started_at": "2025-03-01T10:00:00+00:00",
        "ended_at": "2025-03-01T10:02:05+00:00",
        "seed": 7,
        "steps": 8,
        "final_eval": {k: v for k, v in evals[-1].items() if k != "step"},
        "stopped_early": False,
        "git": {"sha": "0123abc", "dirty": False},
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def eval_payload() -> dict:
    """A full eval payload as `tunelab eval` writes it (schema in runs/report.py's docs)."""
    return {
        "kind": "eval",
        "title": "sentiment before/after",
        "data": "data/rt_test.jsonl",
        "n": 300,
        "main_metric": "accuracy",
        "models": [
            {
                "name": "smollm2",
                "role": "base",
                "metrics": {"accuracy": 0.6133, "exact_match": 0.41, "loss": 2.7182},
            },
            {
                "name": "run-7",
                "role": "tuned",
                "metrics": {"accuracy": 0.8567, "exact_match": 0.79, "loss": 0.9123},
            },
        ],
        "comparison": {
            "metric": "accuracy",
            "base": 0.6133,
            "tuned": 0.8567,
            "delta": 0.2434,
            "ci95": [0.1912, 0.2951],
            "n": 300,
            "n_boot": 2000,
        },
        "confusion_matrices": {
            "run-7": {"labels": ["negative", "positive"], "matrix": [[131, 19], [24, 126]]},
        },
        "forgetting": {"general_loss": {"base": 2.31, "tuned": 2.47, "delta": 0.16}},
        "robustness": {"typos": {"accuracy": 0.8233}, "case": {"accuracy": 0.8501}},
        "probes": {"refusals": 3, "empty_answers": 0},
        "gate": {
            "passed": False,
            "failures": ["forgetting.general_loss.delta 0.16 > 0.1"],
            "thresholds": {"max_forgetting": 0.1, "min_accuracy": 0.8},
        },
    }


def test_every_number_in_the_run_report_comes_from_its_json(synthetic_run: Path) -> None:
    json_path, html_path = write_run_report(synthetic_run)
    report = json.loads(json_path.read_text())
    page = html_path.read_text()
    text = assert_numbers_come_from_json(page, report)
    assert report["run"]["duration_s"] == 125.0 and report["run"]["status"] == "completed"
    assert report["key_metric"] == {"name": "eval_loss", "value": 2.5 / 8 + 0.2345678}
    for value in (2.5 / 8 + 0.2345678, 3.0 / 8 + 0.123456, 125.0, 1e-3 * (1 - 8 / 10)):
        assert fmt(value) in numbers_in(text), value
    assert report["series"]["train"]["loss"] == [3.0 / s + 0.123456 for s in range(1, 9)]
    assert report["series"]["eval"]["step"] == [4, 8]
    assert_self_contained(page)
    assert page.count("<img") == 4  # loss (train vs eval), learning rate, grad_norm, eval_perplexity


def test_a_number_not_in_the_json_is_caught(synthetic_run: Path) -> None:
    """The check above is not vacuous: a page that prints a derived number fails it."""
    json_path, html_path = write_run_report(synthetic_run)
    report = json.loads(json_path.read_text())
    tampered = html_path.read_text().replace("</h1>", "<p>speed 3.141</p></h1>")
    with pytest.raises(AssertionError, match="3.141"):
        assert_numbers_come_from_json(tampered, report)


def test_eval_report_shows_every_section_from_its_json(tmp_path: Path) -> None:
    json_path, html_path = write_eval_report(tmp_path / "eval", eval_payload())
    report = json.loads(json_path.read_text())
    assert report == eval_payload()
    page = html_path.read_text()
    text = assert_numbers_come_from_json(page, report)
    for heading in (
        "Metrics per model",
        "Before / after",
        "Base vs tuned",
        "Confusion matrix: run-7",
        "Forgetting",
        "Robustness",
        "Probes",
        "Gate",
    ):
        assert heading in text, heading
    numbers = numbers_in(text)
    for value in (0.6133, 0.8567, 0.2434, 0.1912, 0.2951, 2000, 131, 19, 24, 126, 0.8233):
        assert fmt(value) in numbers, value
    assert "excludes zero" in text and "failed" in text
    assert re.search(r"negative\s+131\s+19\s+positive\s+24\s+126", text)  # rows in matrix order
    assert_self_contained(page)
    assert page.count("<img") == 2  # before/after bars, the CI of the difference


def test_eval_payload_with_wrong_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'kind' must be 'eval'"):
        write_eval_report(tmp_path, {**eval_payload(), "kind": "run"})
    with pytest.raises(ValueError, match="'models'"):
        write_eval_report(tmp_path, {**eval_payload(), "models": "base"})
    assert not (tmp_path / "report.json").exists()


def _screenshot(page: Path, png: Path, profile: Path) -> np.ndarray:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,2000", page.resolve().as_uri(),
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, timeout=120)
    assert png.is_file(), f"chromium wrote no screenshot for {page}"
    artefacts = os.environ.get("TUNELAB_TEST_ARTIFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(artefacts) / png.name)
    from PIL import Image

    return np.asarray(Image.open(png).convert("L"), dtype=np.float32)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (`make chromium` installs it)")
def test_reports_render_in_headless_chromium(synthetic_run: Path, tmp_path: Path) -> None:
    _, run_html = write_run_report(synthetic_run)
    _, eval_html = write_eval_report(tmp_path / "eval", eval_payload())
    for page, name in ((run_html, "run_report.png"), (eval_html, "eval_report.png")):
        pixels = _screenshot(page, tmp_path / name, tmp_path / f"profile-{name}")
        assert pixels.shape == (2000, 1200)
        assert pixels.std() > 20, f"{name} looks blank (pixel std {pixels.std():.1f})"
        assert (pixels < 128).mean() > 0.01, f"{name} has almost no dark pixels: text and plots missing"


def test_engine_writes_the_report_when_a_run_completes(tiny_recipe) -> None:
    from tunelab.train.run import train

    result = train(tiny_recipe(training__eval_every=3))
    report = json.loads((result.run_dir / "report.json").read_text())
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert report["run"]["status"] == "completed" and report["run"]["method"] == "lora"
    assert report["final_eval"] == manifest["final_eval"] == result.final_eval
    assert report["series"]["train"]["loss"] == [r["loss"] for r in rows if "loss" in r]
    assert report["series"]["eval"]["step"] == [3, 6]
    page = (result.run_dir / "report.html").read_text()
    text = assert_numbers_come_from_json(page, report)
    assert fmt(result.final_eval["eval_loss"]) in numbers_in(text)


def test_a_failing_report_leaves_the_run_completed(tiny_recipe, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.train.run import train

    def broken(run_dir: Any) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "write_run_report", broken)
    log = io.StringIO()
    result = train(tiny_recipe(training__max_steps=2), console=Console(file=log, width=200))
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["status"] == "completed" and manifest["steps"] == 2
    assert (result.run_dir / "final" / "tunelab.json").is_file()
    assert not (result.run_dir / "report.html").exists()
    assert "could not write the report" in log.getvalue() and "disk full" in log.getvalue()


def test_online_run_writes_the_report(tmp_path: Path, qa_rows: list[dict]) -> None:
    import tunelab.objectives.grpo  # noqa: F401  (registers before the recipe schema is built)
    from tunelab.recipe import parse_recipe
    from tunelab.train.run import train

    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in qa_rows))
    recipe = parse_recipe(
        {
            "seed": 0,
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "full"},
            "objective": {
                "name": "grpo",
                "reward": f"{REPO / 'recipes' / 'rewards.py'}:letter_share",
                "num_generations": 2,
                "max_new_tokens": 4,
            },
            "training": {"max_steps": 2, "batch_size": 2, "learning_rate": 1e-2, "warmup_steps": 0},
            "output": {"dir": str(tmp_path / "runs"), "name": "grpo"},
        }
    )
    result = train(recipe)
    report = json.loads((result.run_dir / "report.json").read_text())
    assert report["run"]["objective"] == "grpo" and report["run"]["status"] == "completed"
    assert report["key_metric"] == {"name": "reward_mean", "value": result.final_eval["reward_mean"]}
    assert len(report["series"]["train"]["reward_mean"]) == 2
    assert (result.run_dir / "report.html").is_file()


def test_confusion_matrix_with_an_out_of_label_column_has_a_header_per_column(tmp_path: Path) -> None:
    payload = eval_payload()
    payload["confusion_matrices"] = {
        "run-7": {
            "labels": ["negative", "positive"],
            "columns": ["negative", "positive", "<other>"],
            "matrix": [[131, 17, 2], [24, 126, 0]],
        }
    }
    _, html_path = write_eval_report(tmp_path / "eval", payload)
    text = visible_text(html_path.read_text())
    assert re.search(r"gold \\ predicted\s+negative\s+positive\s+<other>\s+negative\s+131\s+17\s+2", text)
