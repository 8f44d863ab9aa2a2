"""The whole lifecycle in a real headless Chromium, and the Chat and Export forms by keyboard alone.

Data file -> audit finding -> mask preview -> recipe for tiny:llama built in the form (an invalid
value shows the recipe error inline, then is fixed) -> training started, its loss chart gaining
points while it runs -> the finished run -> a before/after eval -> chat with base and tuned side by
side -> export with the parity gate's table. Every step asserts on what the page shows. With
TUNELAB_STUDIO_SHOTS=DIR the chat and export pages' 1280x800 screenshots are written to DIR.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import test_studio_browser as browser_tests
from test_studio_browser import expect, focus_by_tab, serious_violations, settled, shot

# The browser tests' fixtures, re-exported so pytest finds them here: the served studio (a fresh one
# for this module), the browser, a 1280x800 page.
served, studio, browser, page = (
    browser_tests.served,
    browser_tests.studio,
    browser_tests.browser,
    browser_tests.page,
)
pytestmark = browser_tests.pytestmark  # skipped, saying why, where Chromium is missing

DATA = Path(__file__).parents[1] / "recipes" / "data"


def _points(page) -> int:
    return int(page.inner_text("#points").split()[0])


def _lifecycle_data(folder: Path) -> Path:
    """The tiny training set with its first row repeated: the audit has an exact duplicate to show."""
    rows = (DATA / "tiny_train.jsonl").read_text(encoding="utf-8").splitlines()
    path = folder / "pets.jsonl"
    path.write_text("\n".join([*rows, rows[0]]) + "\n", encoding="utf-8")
    return path


def _data_step(page, studio: str, data: Path) -> None:
    page.goto(studio + "/data")
    page.fill("#path", str(data))
    page.press("#path", "Enter")
    expect(page.locator("#findings")).to_contain_text("exact duplicates")
    settled(page)
    page.click("#preview-button")
    page.locator("article.example").first.wait_for()
    assert "with loss" in page.locator("article.example h3").first.inner_text()
    assert page.locator("article.example").first.locator("span.tok.loss").count() > 0


def _recipe_step(page, studio: str, data: Path) -> None:
    page.goto(studio + "/recipe")
    for field, value in (
        ("#f-model-name_or_path", "tiny:llama"),
        ("#f-data-train", str(data)),
        ("#f-data-eval", str(DATA / "tiny_eval.jsonl")),
        ("#f-data-max_length", "64"),
        ("#f-method-r", "4"),
        ("#f-training-max_steps", "60"),
        ("#f-training-batch_size", "4"),
        ("#f-output-name", "life"),
        ("#f-training-learning_rate", "-1"),
    ):
        page.fill(field, value)
    expect(page.locator("#problems")).to_contain_text("bad studio form: training.learning_rate")
    page.fill("#f-training-learning_rate", "0.005")
    expect(page.locator("#recipe-ok")).to_be_visible()
    expect(page.locator("#yaml")).to_contain_text("learning_rate: 0.005")
    settled(page)
    page.click("#save-button")
    page.locator("#saved-path").wait_for()


def _train_step(page, studio: str) -> None:
    page.goto(studio + "/train")  # the recipe just saved is the form's default
    assert page.input_value("#recipe-path").endswith("life.yaml")
    page.click("#start-button")
    page.wait_for_url("**/train/life")
    page.wait_for_function("parseInt(document.querySelector('#points').textContent) >= 1")
    first = _points(page)
    # the chart gains points while the run is running
    page.wait_for_function(f"parseInt(document.querySelector('#points').textContent) > {first}")
    expect(page.locator("#status-word")).to_have_text("completed", timeout=600_000)
    page.wait_for_function("parseInt(document.querySelector('#points').textContent) === 60")


def _eval_step(page, studio: str) -> None:
    page.goto(studio + "/train/life")  # open the finished run
    assert page.inner_text("#status-word") == "completed"
    settled(page)
    page.locator("#eval-button").click()
    expect(page.locator("#eval-table")).to_contain_text("(base)", timeout=600_000)
    expect(page.locator("#eval-table")).to_contain_text("(tuned)")
    expect(page.locator("#export-link")).to_be_visible()  # the run page's Export button


def _chat_step(page, studio: str) -> None:
    page.goto(studio + "/chat")
    assert page.input_value("#model-a") == "base:life" and page.input_value("#model-b") == "run:life"
    page.fill("#prompt", "What colour is the black pig?")
    page.fill("#max_tokens", "12")
    page.click("#send-button")
    for side in ("a", "b"):
        page.locator(f"#answer-{side}-footer .answer-meta").wait_for()
        assert page.inner_text(f"#answer-{side}-text").strip()  # both columns got text
        expect(page.locator(f"#answer-{side}-footer")).to_contain_text("max_tokens 12")
    expect(page.locator("#answer-b-footer .answer-meta")).to_contain_text("life")
    settled(page)
    page.click("#answer-a-footer .thumb-up")
    expect(page.locator("#answer-a-footer")).to_contain_text("recorded: thumbs up")
    shot(page, "chat", at="#prompt")  # the prompt, the settings and both answers
    assert serious_violations(page) == []


def _export_step(page, studio: str, runs: Path) -> None:
    page.goto(studio + "/export?run=life")
    page.select_option("#export-kind", "adapter")
    page.click("#export-button")
    expect(page.locator("#gate-table")).to_contain_text("token_agreement", timeout=600_000)
    expect(page.locator("#export-result")).to_contain_text("Parity gate passed.")
    assert (runs / "exports" / "life-adapter" / "adapter_config.json").is_file()
    shot(page, "export")
    assert serious_violations(page) == []


@pytest.mark.slow
def test_the_whole_lifecycle_in_the_browser(studio, served, page, tmp_path):
    data = _lifecycle_data(tmp_path)
    _data_step(page, studio, data)
    _recipe_step(page, studio, data)
    _train_step(page, studio)
    _eval_step(page, studio)
    _chat_step(page, studio)
    _export_step(page, studio, served[1])


def test_chat_form_by_keyboard_alone(studio, served, page):
    page.goto(studio + "/chat")
    focus_by_tab(page, "model-a-path")
    page.keyboard.type("tiny:llama")
    focus_by_tab(page, "model-b-path")
    page.keyboard.type("tiny:llama")
    focus_by_tab(page, "prompt")
    page.keyboard.type("Hello there")
    focus_by_tab(page, "max_tokens")
    page.keyboard.press("Control+A")
    page.keyboard.type("6")
    focus_by_tab(page, "send-button")
    page.keyboard.press("Enter")
    for side in ("a", "b"):
        page.locator(f"#answer-{side}-footer .answer-meta").wait_for()
        assert page.inner_text(f"#answer-{side}-text").strip()
    expect(page.locator("#answer-a-footer")).to_contain_text("max_tokens 6")
    focus_by_tab(page, page.get_attribute("#answer-b-footer .thumb-down", "id") or "", limit=80)
    page.keyboard.press("Enter")
    expect(page.locator("#answer-b-footer")).to_contain_text("recorded: thumbs down")
    lines = (served[1] / ".studio" / "feedback" / "feedback.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[-1])["score"] == -1.0
    assert serious_violations(page) == []


def test_export_form_by_keyboard_alone(studio, served, page):
    runs = served[1]
    (runs / "hollow" / "final").mkdir(parents=True)
    (runs / "hollow" / "manifest.json").write_text('{"status": "completed"}', encoding="utf-8")
    (runs / "exports" / "taken").mkdir(parents=True)
    page.goto(studio + "/export?run=hollow")
    focus_by_tab(page, "export-kind")
    page.keyboard.press("ArrowDown")  # merged -> adapter
    expect(page.locator("#export-kind")).to_have_value("adapter")
    focus_by_tab(page, "export-out")
    page.keyboard.type(str(runs / "exports" / "taken"))
    focus_by_tab(page, "export-button")
    page.keyboard.press("Enter")
    expect(page.locator("#export-result .error")).to_contain_text("taken already exists; choose a new folder")
    assert not (runs / ".studio" / "export" / "taken.json").exists()  # refused: no process started
    assert serious_violations(page) == []
