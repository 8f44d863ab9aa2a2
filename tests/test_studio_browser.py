"""tunelab studio in a real headless Chromium (Playwright driving the system's /usr/bin/chromium).

Each test asserts on what the page shows. Skipped, saying why, where Playwright or Chromium is absent
(`make chromium` installs Chromium). With TUNELAB_STUDIO_SHOTS=DIR each page's 1280x800 screenshot is
written to DIR (`make studio-shots` writes docs/studio/); otherwise nothing leaves the tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

playwright = pytest.importorskip(
    "playwright.sync_api", reason="playwright not installed (pip install playwright)"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH; run `make chromium`")
expect = playwright.expect
# Every wait is on a condition (a text, a value, a count, a URL, htmx at rest: see settled()), never on
# time; WAIT_MS is only how long a condition may take before the test fails, generous because CI machines
# run loaded (issue 26: a keyboard test failed under a load average of 6). It never slows a passing test.
WAIT_MS = 180_000
expect.set_options(timeout=WAIT_MS)

ROWS = [
    {"instruction": "Say hi to the user", "output": "hi there friend"},
    {"instruction": "Count to three please", "output": "one two three"},
    {"instruction": "Say hi to the user", "output": "hi there friend"},
    {"instruction": "Name a colour you like", "output": "blue is nice"},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """The studio served by uvicorn on a free loopback port, in a thread: (base URL, runs dir, token).
    Its files: the tests' tmp dirs and the repository's example data."""
    import uvicorn

    from tunelab.studio.app import create_app

    runs = tmp_path_factory.mktemp("studio") / "runs"
    app = create_app(runs, roots=[tmp_path_factory.getbasetemp(), Path(__file__).parents[1]])
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_MS / 1000
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the studio did not start"
    yield f"http://127.0.0.1:{port}", runs, app.state.token
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def studio(served) -> str:
    return served[0]


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def logged_in_page(browser, served):
    """A new browser context that opened the start URL, so it holds the studio's cookie."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.goto(f"{served[0]}/?token={served[2]}")
    return page


@pytest.fixture
def page(browser, served):
    page = logged_in_page(browser, served)
    yield page
    page.context.close()


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def serious_violations(page) -> list[str]:
    """axe-core (vendored, served by the studio) run on the page: its serious and critical violations."""
    page.add_script_tag(url="/static/vendor/axe.min.js")
    result = page.evaluate("async () => await axe.run(document)")
    assert result["passes"], "axe-core did not run"
    return [
        f"{v['id']}: {v['help']} ({', '.join(str(n['target']) for n in v['nodes'])})"
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]


def shot(page, name: str, at: str | None = None) -> None:
    """Screenshot to $TUNELAB_STUDIO_SHOTS/NAME.png: the top of the page, or from the element ``at``."""
    folder = os.environ.get("TUNELAB_STUDIO_SHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        if at:
            page.evaluate(f"document.querySelector('{at}').scrollIntoView()")
        else:
            page.evaluate("window.scrollTo(0, 0)")  # the top of the page, as a visitor first sees it
        page.screenshot(path=str(Path(folder) / f"{name}.png"))


def settled(page) -> None:
    """Wait until htmx has no request in flight and nothing swapping or settling, so that the next key or
    click acts on what the last response made of the page. A click during the settle (20 ms, far longer
    on a loaded machine) lost the Apply button's suggested learning rate."""
    page.wait_for_function("!document.querySelector('.htmx-request, .htmx-swapping, .htmx-settling')")


def focus_by_tab(page, element_id: str, limit: int = 40) -> None:
    """Press Tab from the top of the page until ``element_id`` has the focus (fails if it never does)."""
    settled(page)
    for _ in range(limit):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
    raise AssertionError(f"#{element_id} is not reachable with the keyboard")


def test_home_lists_the_pages_and_passes_axe(studio, page):
    page.goto(studio + "/")
    assert page.locator("nav a").all_inner_texts()[:3] == ["Home", "Data", "Recipe"]
    shot(page, "home")
    assert serious_violations(page) == []


def test_data_page_audit_and_mask_preview_by_keyboard(studio, page, data_file):
    page.goto(studio + "/data")
    focus_by_tab(page, "path")
    page.keyboard.type(str(data_file))
    page.keyboard.press("Enter")  # submits the form: the audit
    expect(page.locator("#findings")).to_contain_text("exact duplicates")
    assert "Say hi to the user" in page.locator("table.rows").first.inner_text()  # the offending row
    focus_by_tab(page, "preview-button")
    page.keyboard.press("Enter")
    page.locator("article.example").first.wait_for()
    heading = page.locator("article.example h3").first.inner_text()
    assert "with loss" in heading
    trained = page.locator("article.example").first.locator("span.tok.loss")
    assert trained.count() == int(heading.split(", ")[1].split()[0])  # as many as the heading counts
    assert "hi there friend" in "".join(trained.all_inner_texts())  # the answer is what is trained
    settled(page)
    page.click("#clean-button")
    # the dropped row, with its reason
    expect(page.locator("#clean-changes")).to_contain_text("exact_duplicate")
    shot(page, "data")
    assert serious_violations(page) == []


def test_recipe_page_validates_inline_and_plans(studio, page, data_file):
    page.goto(studio + "/recipe")
    page.fill("#f-model-name_or_path", "tiny:llama")
    page.fill("#f-data-train", str(data_file))
    page.fill("#f-training-learning_rate", "-1")
    # The empty form already lists problems (no model yet): wait for the one this value causes.
    expect(page.locator("#problems")).to_contain_text("bad studio form: training.learning_rate")
    page.fill("#f-training-learning_rate", "0.001")
    expect(page.locator("#recipe-ok")).to_be_visible()
    expect(page.locator("#yaml")).to_contain_text("learning_rate: 0.001")
    settled(page)
    page.click("#plan-button")
    expect(page.locator("#plan-table")).to_contain_text("predicted peak allocated")
    shot(page, "recipe")
    assert serious_violations(page) == []
    settled(page)
    page.click("#recommend-button")
    expect(page.locator("#recommend-table")).to_contain_text("training.learning_rate")
    from tunelab.plan.recommend import count_params, recommend

    lr = next(
        r.value for r in recommend(count_params("tiny:llama"), "lora") if r.field == "training.learning_rate"
    )
    settled(page)
    page.click("#apply-button")
    expect(page.locator("#f-training-learning_rate")).to_have_value(str(lr))
    expect(page.locator("#f-method-r")).to_have_value("16")
    settled(page)
    page.select_option("#f-method-name", "full")
    expect(page.locator("#f-method-r")).to_have_count(0)  # full fine-tuning has no rank
    expect(page.locator("#f-model-name_or_path")).to_have_value("tiny:llama")  # typed values survive


def _points(page) -> int:
    return int(page.inner_text("#points").split()[0])


@pytest.mark.slow
def test_train_page_live_chart_two_tabs_and_a_killed_run(studio, served, browser, page, tmp_path):
    import signal

    from test_studio_train import tiny_recipe

    page.goto(studio + "/train")
    focus_by_tab(page, "recipe-path")
    page.keyboard.press("Control+A")
    page.keyboard.type(str(tiny_recipe(tmp_path, 5000)))
    focus_by_tab(page, "run-name")
    page.keyboard.type("live")
    page.keyboard.press("Enter")
    page.wait_for_url("**/train/live")
    page.wait_for_function("parseInt(document.querySelector('#points').textContent) >= 2")
    first = _points(page)
    page.wait_for_function(f"parseInt(document.querySelector('#points').textContent) > {first}")
    expect(page.locator("#status-word")).to_have_text("running")
    assert page.locator(".chart canvas").count() >= 4  # loss, lr, grad norm, tokens/s drawn by uPlot
    shot(page, "train")
    assert serious_violations(page) == []
    other = logged_in_page(browser, served)
    other.goto(studio + "/train/live")  # a second tab on the same run: the same state, every row so far
    other.wait_for_function(f"parseInt(document.querySelector('#points').textContent) >= {first}")
    expect(other.locator("#status-word")).to_have_text("running")
    job = json.loads((served[1] / ".studio" / "live.json").read_text(encoding="utf-8"))
    os.kill(job["pid"], signal.SIGKILL)
    for tab in (page, other):
        expect(tab.locator("#status-word")).to_have_text("failed")
        expect(tab.locator("#run-status")).to_contain_text("killed or crashed")
    other.context.close()


def test_runs_page_filters_and_sorts(studio, served, page):
    from test_studio_train import fake_run

    runs = served[1]
    fake_run(runs, "zeta-lora", "completed", "lora", 2.0)
    fake_run(runs, "eta-full", "completed", "full", 1.0)
    page.goto(studio + "/runs")
    names = page.locator("#runs-table tbody th").all_inner_texts()
    assert {"zeta-lora", "eta-full"} <= set(names)
    page.select_option("#filter-method", "full")
    focus_by_tab(page, "filter-button")
    page.keyboard.press("Enter")
    page.wait_for_url("**/runs?*method=full*")
    expect(page.locator("#runs-table tbody th")).to_have_text(["eta-full"])
    page.goto(studio + "/runs")
    page.get_by_role("link", name="Key metric").click()
    page.wait_for_url("**sort=key_value**")
    names = page.locator("#runs-table tbody th").all_inner_texts()
    assert names.index("eta-full") < names.index("zeta-lora")  # eval_loss 1.0 before 2.0
    shot(page, "runs")
    assert serious_violations(page) == []
    page.check("input[aria-label='compare zeta-lora']")
    page.check("input[aria-label='compare eta-full']")
    page.click("#compare-button")
    page.wait_for_url("**/runs/compare?*")
    expect(page.locator("#recipe-diff")).to_contain_text("method.name")
    expect(page.locator("#final-metrics")).to_contain_text("eval_loss")
    shot(page, "runs-compare")
    assert serious_violations(page) == []


def test_data_page_upload_then_audit(studio, served, page, data_file):
    page.goto(studio + "/data")
    page.set_input_files("#upload", str(data_file))
    expect(page.locator("#findings")).to_contain_text("exact duplicates")
    stored = page.input_value("#path")
    assert (
        Path(stored).parent == served[1] / "uploads" and Path(stored).read_bytes() == data_file.read_bytes()
    )


def test_finished_run_page_shows_the_before_after_eval(studio, served, page):
    from test_studio_train import PAYLOAD, fake_run

    runs = served[1]
    fake_run(runs, "evaluated", "completed", "lora", 1.0)
    (runs / "evaluated" / "final").mkdir()
    (runs / "evaluated" / "eval").mkdir()
    (runs / "evaluated" / "eval" / "report.json").write_text(json.dumps(PAYLOAD), encoding="utf-8")
    page.goto(studio + "/train/evaluated")
    expect(page.locator("#eval-ci")).to_contain_text("paired bootstrap CI")  # loaded into the page by htmx
    expect(page.locator("#eval-base")).to_have_value("tiny:llama")
    expect(page.locator("#status-word")).to_have_text("completed")
    shot(page, "evaluate", at="#eval")
    assert serious_violations(page) == []


WALK_JS = """(form) => {
  const el = document.activeElement;
  if (!el || el === document.body) return null;
  const style = getComputedStyle(el);
  const labelled = !['INPUT', 'SELECT', 'TEXTAREA'].includes(el.tagName) || el.type === 'hidden'
    || (el.labels && el.labels.length > 0 && el.labels[0].textContent.trim() !== '') || el.getAttribute('aria-label');
  return {key: el.id || el.name || el.tagName + ':' + el.textContent.trim().slice(0, 40),
          inside: !!el.closest(form), outlined: style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0,
          labelled: !!labelled};
}"""

CONTROLS_JS = """(form) => [...document.querySelector(form).querySelectorAll('input, select, button, textarea, summary, a[href]')]
  .filter(el => el.type !== 'hidden' && !el.disabled && el.checkVisibility())
  .map(el => el.id || el.name || el.tagName + ':' + el.textContent.trim().slice(0, 40))"""


def tab_through(page, form: str, limit: int = 600) -> list[str]:
    """Tab from the top of the page through ``form``: every visible control in it must take the focus,
    show a focus outline and (inputs, selects) have a label. Returns the keys in Tab order."""
    settled(page)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    seen: list[str] = []
    for _ in range(limit):
        page.keyboard.press("Tab")
        focused = page.evaluate(WALK_JS, form)
        if focused is None or not focused["inside"]:
            if seen:
                break
            continue
        assert focused["outlined"], f"{focused['key']}: no visible focus outline"
        assert focused["labelled"], f"{focused['key']}: no label"
        seen.append(focused["key"])
    missing = [key for key in page.evaluate(CONTROLS_JS, form) if key not in seen]
    assert not missing, f"not reachable with Tab in {form}: {missing}"
    return seen


def test_every_form_is_reachable_labelled_and_outlined_by_keyboard(studio, served, page):
    from test_studio_train import fake_run

    fake_run(served[1], "kb-run", "completed", "lora", 1.0)
    for url, form in (
        ("/data", "#data-form"),
        ("/recipe", "#recipe"),
        ("/recipe", "#load-form"),
        ("/train", "#train-form"),
        ("/runs", "#runs-filter"),
        ("/eval", "#eval-form"),
    ):
        page.goto(studio + url)
        assert tab_through(page, form), f"{url} {form}: nothing took the focus"
        assert serious_violations(page) == [], url


def test_recipe_nested_section_by_keyboard_shows_its_error_inline(studio, page, data_file):
    page.goto(studio + "/recipe")
    focus_by_tab(page, "f-model-name_or_path")
    page.keyboard.type("tiny:llama")
    focus_by_tab(page, "f-data-train")
    page.keyboard.type(str(data_file))
    summary = "#section-training-early_stopping > summary"
    settled(page)
    page.focus(summary)  # then the keyboard alone: Space opens it, Space ticks the box, type, Enter
    page.keyboard.press("Space")
    expect(page.locator("#section-training-early_stopping")).to_have_attribute("open", "")
    page.keyboard.press("Tab")
    expect(page.locator("#section-training-early_stopping-on")).to_be_focused()
    page.keyboard.press("Space")
    focus_by_tab(page, "f-training-early_stopping-patience")
    page.keyboard.press("Control+A")
    page.keyboard.type("0")
    page.keyboard.press("Enter")  # submits the form: the check
    error = page.locator("#f-training-early_stopping-patience-error")
    expect(error).to_contain_text(
        "training.early_stopping.patience: Input should be greater than or equal to 1"
    )
    expect(page.locator("#f-training-early_stopping-patience")).to_have_attribute("aria-invalid", "true")
    page.keyboard.press("Control+A")
    page.keyboard.type("2")
    page.keyboard.press("Enter")
    expect(page.locator("#recipe-ok")).to_be_visible()
    expect(page.locator("#yaml")).to_contain_text("patience: 2")
    # the inline error goes once htmx settles the swap, a moment after #recipe-ok appears
    expect(error).to_have_count(0)
    focus_by_tab(page, "save-button", limit=600)
    page.keyboard.press("Enter")
    expect(page.locator("#saved")).to_contain_text(".yaml")
    shot(page, "recipe-nested", at="#section-training-early_stopping")
    assert serious_violations(page) == []


def test_train_form_by_keyboard_shows_a_bad_recipes_problem(studio, page, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: tiny:llama}\nmethod: {name: lora}\ndata: {}\n", encoding="utf-8")
    page.goto(studio + "/train")
    focus_by_tab(page, "recipe-path")
    page.keyboard.press("Control+A")
    page.keyboard.type(str(bad))
    focus_by_tab(page, "start-button")
    page.keyboard.press("Enter")
    expect(page.locator("#train-result")).to_contain_text("data")
    expect(page.locator("#train-result")).to_contain_text("bad")


def test_eval_form_by_keyboard_and_the_disagreement_filter(studio, served, page):
    from test_studio_train import PAYLOAD, fake_page_eval

    page.goto(studio + "/eval")
    for field, text in (
        ("eval-base", "tiny:llama"),
        ("eval-tuned", "kb/none"),
        ("eval-data", "d.jsonl"),
        ("eval-max", "five"),
    ):
        focus_by_tab(page, field)
        page.keyboard.type(text)
    page.keyboard.press("Enter")
    expect(page.locator("#eval-result")).to_contain_text("'five' is not a whole number")
    fake_page_eval(served[1], "kb-vs-base", PAYLOAD)
    page.goto(studio + "/eval/kb-vs-base")
    expect(page.locator("tr.prediction")).to_have_count(3)
    focus_by_tab(page, "only-disagreements")
    page.keyboard.press("Space")
    expect(page.locator("#predictions-count")).to_contain_text("2 of 3 example(s), disagreements only")
    expect(page.locator("tr.prediction")).to_have_count(2)
    expect(page.locator("#predictions-table")).not_to_contain_text("say hi")
    expect(page.locator("#only-disagreements")).to_be_focused()  # focus stays on the box
    settled(page)
    page.keyboard.press("Space")
    expect(page.locator("tr.prediction")).to_have_count(3)
    shot(page, "evaluate-page", at="#eval-table")
    assert serious_violations(page) == []
