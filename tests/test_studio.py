"""tunelab studio, server side: each page's content comes from the CLI's own functions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from studio_client import BASE, studio_client
from tunelab.studio.app import create_app
from tunelab.studio.data_page import audit_findings
from tunelab.studio.render import STATIC, TEMPLATES

ROWS = [
    {"instruction": "Say hi to the user", "output": "hi there friend"},
    {"instruction": "Count to three please", "output": "one two three"},
    {"instruction": "Say hi to the user", "output": "hi there friend"},
    {"instruction": "Write to me at bob@example.com today", "output": "sure I will"},
]


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    return studio_client(tmp_path / "runs")


def test_home_has_nav_to_every_page(client):
    html = client.get("/").text
    assert 'aria-current="page"' in html
    for href in ("/data", "/recipe"):
        assert f'href="{href}"' in html


def test_no_cdn_links_in_templates_and_vendored_assets_are_listed():
    for template in TEMPLATES.glob("*.html"):
        text = template.read_text(encoding="utf-8")
        assert not re.search(r"(src|href)=\"(https?:)?//", text), template.name
    vendored = (STATIC / "vendor" / "VENDORED.md").read_text(encoding="utf-8")
    for asset in ("htmx.min.js", "htmx-ext-sse.min.js", "axe.min.js", "uPlot.iife.min.js"):
        assert (STATIC / "vendor" / asset).is_file()
        assert asset in vendored


def test_static_assets_are_served(client):
    response = client.get("/static/vendor/htmx.min.js")
    assert response.status_code == 200 and "htmx" in response.text[:2000]


def test_audit_shows_findings_with_offending_rows(client, data_file):
    html = client.post("/data/audit", data={"path": str(data_file)}).text
    assert "4 rows" in html
    assert "exact duplicates" in html and "pii email" in html
    assert "Say hi to the user" in html  # the duplicated row, shown as written
    assert "bob@example.com" in html


def test_audit_of_a_missing_file_is_one_line_error(client, tmp_path):
    html = client.post("/data/audit", data={"path": str(tmp_path / "nope.jsonl")}).text
    assert 'role="alert"' in html and "nope.jsonl" in html
    assert "Traceback" not in html


def test_findings_flatten_the_report_sections():
    report = {
        "rows": 3,
        "settings": {"x": {"rows": 9}},
        "exact_duplicates": {"rows": 2, "examples": [[1, 3]]},
        "pii": {"email": {"rows": 1, "row_numbers": [2]}, "ip": {"rows": 0, "row_numbers": []}},
        "lengths": {"over_max_length": 1, "over_examples": [{"row": 3, "length": 99}]},
    }
    found = {f.name: (f.count, f.rows) for f in audit_findings(report)}
    assert found == {
        "exact duplicates": (2, [1, 3]),
        "pii email": (1, [2]),
        "longer than max length": (1, [3]),
    }


def test_mask_preview_matches_data_show(client, data_file):
    from tunelab.data.show import preview_examples
    from tunelab.models.load import tokenizer_for

    previews, _ = preview_examples(str(data_file), tokenizer_for("tiny:llama"), n=1)
    html = client.post("/data/preview", data={"path": str(data_file), "model": "tiny:llama", "n": "1"}).text
    loss = sum(previews[0].loss_mask)
    assert f"{len(previews[0].input_ids)} tokens, {loss} with loss" in html
    tokens = html[html.index('<p class="tokens">') :]  # past the legend
    assert tokens.count('class="tok loss') == loss
    assert tokens.count('<span class="tok') == len(previews[0].pieces)


def test_recipe_form_comes_from_the_schema_and_registries(client):
    from tunelab.methods import METHODS
    from tunelab.objectives import OBJECTIVES

    html = client.get("/recipe").text
    for name in ("training.learning_rate", "data.max_length", "method.r", "objective.train_on"):
        assert f'name="{name}"' in html
    for name in METHODS.names() + OBJECTIVES.names():
        assert f'<option value="{name}"' in html
    assert 'value="0.0002"' in html  # training.learning_rate's default


def test_changing_the_method_changes_its_fields(client):
    html = client.post("/recipe/form", data={"method.name": "full", "model.name_or_path": "tiny:llama"}).text
    assert 'name="method.r"' not in html
    assert 'value="tiny:llama"' in html  # what the user typed survives the re-render


def test_recipe_check_gives_recipe_checks_messages(client, data_file):
    from tunelab.recipe import RecipeError, parse_recipe

    form = {"model.name_or_path": "tiny:llama", "data.train": str(data_file), "training.learning_rate": "-1"}
    html = client.post("/recipe/check", data=form).text
    with pytest.raises(RecipeError) as err:
        parse_recipe(
            {
                "model": {"name_or_path": "tiny:llama"},
                "data": {"train": str(data_file)},
                "method": {"name": "lora"},
                "training": {"learning_rate": "-1"},
            }
        )
    assert err.value.problems and all(p.replace("'", "&#39;") in html for p in err.value.problems)
    form["training.learning_rate"] = "1e-3"
    html = client.post("/recipe/check", data=form).text
    assert 'id="recipe-ok"' in html and "learning_rate: 0.001" in html


class FormValues(HTMLParser):
    """What a browser submits for ``<form id=FORM_ID>``: named inputs (ticked checkboxes only), selects."""

    def __init__(self, form_id: str) -> None:
        super().__init__()
        self.form_id, self.inside, self.values = form_id, False, {}
        self.select: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "form":
            self.inside = a.get("id") == self.form_id
        if not self.inside or "name" not in a and tag != "option":
            return
        if tag == "input" and (a.get("type") != "checkbox" or "checked" in a):
            self.values[a["name"]] = a.get("value", "on")
        elif tag == "select":
            self.select = a["name"]
        elif tag == "option" and self.select and ("selected" in a or self.select not in self.values):
            self.values[self.select] = a.get("value", "")

    def handle_endtag(self, tag):
        if tag == "select":
            self.select = None
        elif tag == "form":
            self.inside = False


def submitted(html: str, form_id: str = "recipe") -> dict[str, str]:
    parser = FormValues(form_id)
    parser.feed(html)
    return parser.values


def test_nested_sections_are_sub_fieldsets_with_an_enable_box_when_optional(client, data_file):
    html = client.get("/recipe").text
    for name in (
        "training.early_stopping.patience",
        "data.split.eval_ratio",
        "training.ewc.lambda",
        "training.distributed.fsdp.sharding",
        "eval.max_new_tokens",
        "export.verify_n",
        "seed",
    ):
        assert f'name="{name}"' in html
    for optional in ("training.early_stopping", "data.split", "training.ewc", "data.replay"):
        assert f'name="enable.{optional}">' in html  # unticked by default
    assert 'name="enable.training.distributed"' not in html  # always there: no box
    form = submitted(html) | {"model.name_or_path": "tiny:llama", "data.train": str(data_file)}
    checked = client.post("/recipe/check", data=form | {"training.ewc.lambda": "-5"}).text
    assert 'id="recipe-ok"' in checked and "ewc: null" in checked  # unticked: left out, bad value or not
    checked = client.post("/recipe/check", data=form | {"enable.training.ewc": "on"}).text
    assert "training.ewc.previous_data: required field is missing" in checked  # ticked: checked


def test_recipe_with_early_stopping_and_split_round_trips_through_the_form(client, data_file, tmp_path):
    from tunelab.recipe import dump_yaml, load_recipe

    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {
            "train": str(data_file),
            "split": {"eval_ratio": 0.25, "by": "random", "seed": 7},
            "columns": {"instruction": "question"},
        },
        "method": {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {
            "max_steps": 5,
            "early_stopping": {"metric": "eval_loss", "patience": 2, "min_delta": 0.01},
            "distributed": {"fsdp": {"sharding": "grad_op"}, "deepspeed": {"zero_stage": 3}},
        },
    }
    path = tmp_path / "es.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    html = client.get("/recipe", params={"load": str(path)}).text
    values = submitted(html)
    assert (
        values["enable.training.early_stopping"] == "on" and values["training.early_stopping.patience"] == "2"
    )
    assert values["enable.data.split"] == "on" and values["data.split.seed"] == "7"
    assert "enable.training.ewc" not in values
    checked = client.post("/recipe/check", data=values).text
    shown = checked.split('<pre id="yaml" tabindex="0">')[1].split("</pre>")[0]
    assert unescape(shown) == dump_yaml(load_recipe(path))  # the same YAML, nested and YAML-only settings too


def test_an_invalid_nested_value_is_reported_as_recipe_check_reports_it(client, data_file):
    from tunelab.recipe import RecipeError, parse_recipe

    form = submitted(client.get("/recipe").text) | {"data.train": str(data_file)}
    form |= {"enable.training.early_stopping": "on", "training.early_stopping.patience": "0"}
    html = client.post("/recipe/check", data=form).text
    with pytest.raises(RecipeError) as err:
        parse_recipe(
            {
                "model": {"name_or_path": "tiny:llama"},
                "data": {"train": str(data_file)},
                "method": {"name": "lora"},
                "training": {"early_stopping": {"patience": 0}},
            }
        )
    [problem] = err.value.problems
    assert problem.startswith("training.early_stopping.patience: ")
    assert (
        f'<li data-path="training.early_stopping.patience"><strong>bad</strong> studio form: {problem}</li>'
        in html
    )


def test_recipe_check_reports_a_missing_data_file(client, tmp_path):
    form = {"model.name_or_path": "tiny:llama", "data.train": str(tmp_path / "gone.jsonl")}
    html = client.post("/recipe/check", data=form).text
    assert "data.train:" in html and "file not found" in html


def test_plan_and_save(client, data_file, tmp_path):
    form = {"model.name_or_path": "tiny:llama", "data.train": str(data_file), "output.name": "mine"}
    assert "predicted peak allocated" in client.post("/recipe/plan", data=form).text
    first = client.post("/recipe/save", data=form).text
    second = client.post("/recipe/save", data=form).text
    saved = tmp_path / "runs" / "recipes"
    assert "mine.yaml" in first and "mine-2.yaml" in second  # never over an existing file
    assert "tiny:llama" in (saved / "mine.yaml").read_text(encoding="utf-8")


def test_api_key_is_required_when_set(tmp_path):
    client = TestClient(
        create_app(tmp_path / "runs", api_key="s3cret"), base_url=BASE, follow_redirects=False
    )
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    login = client.get("/?key=s3cret")
    assert login.status_code == 303
    assert client.get("/data").status_code == 200  # the cookie set by the login


def test_cli_refuses_a_public_bind_without_a_key(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tunelab", "studio", "--host", "0.0.0.0", "--runs", str(tmp_path)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin", "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: refusing to run the studio on 0.0.0.0")
    assert "Traceback" not in result.stderr


RAW = {"Content-Type": "application/octet-stream"}  # what the page's upload script sends


def test_upload_is_stored_in_the_runs_dir_never_over_a_file(client, tmp_path, data_file):
    body = data_file.read_bytes()
    first = client.put(
        "/data/upload", headers=RAW, params={"name": "../../evil/train.jsonl"}, content=body
    ).json()["path"]
    second = client.put("/data/upload", headers=RAW, params={"name": "train.jsonl"}, content=body).json()[
        "path"
    ]
    uploads = tmp_path / "runs" / "uploads"
    assert (Path(first), Path(second)) == (uploads / "train.jsonl", uploads / "train-2.jsonl")
    assert Path(first).read_bytes() == body
    refused = client.put("/data/upload", headers=RAW, params={"name": "notes.exe"}, content=b"x")
    assert refused.status_code == 400 and "upload a data file" in refused.json()["error"]
    empty = client.put("/data/upload", headers=RAW, params={"name": "e.jsonl"}, content=b"")
    assert empty.status_code == 400 and not (uploads / "e.jsonl").exists()
    assert sorted(p.name for p in uploads.iterdir()) == ["train-2.jsonl", "train.jsonl"]  # no partial left


def test_recommend_lists_the_rules_and_applies_to_the_form(client):
    from tunelab.plan.recommend import count_params, recommend

    expected = recommend(count_params("tiny:llama"), "lora")
    form = {"model.name_or_path": "tiny:llama", "method.name": "lora"}
    html = client.post("/recipe/recommend", data=form).text
    for rec in expected:
        assert rec.field in html and rec.rule.replace("'", "&#39;") in html
    assert "method.target_modules (YAML only)" in html  # a list field: not in the form
    lr = next(r.value for r in expected if r.field == "training.learning_rate")
    applied = client.post("/recipe/form", data=form | {"training.learning_rate": str(lr)}).text
    assert f'name="training.learning_rate" type="text" value="{lr}"' in applied
    assert "give a model first" in client.post("/recipe/recommend", data={}).text


def test_clean_shows_dropped_rows_with_reasons_and_never_replaces(client, data_file, tmp_path):
    first = client.post("/data/clean", data={"path": str(data_file), "action": "clean"}).text
    assert "4 rows in, 3 rows out" in first
    changes = first[first.index('id="clean-changes"') :]
    assert '<th scope="row">3</th><td>dropped</td><td>exact_duplicate</td>' in changes
    assert "pii_redacted" in changes
    second = client.post("/data/clean", data={"path": str(data_file), "action": "clean"}).text
    folder = tmp_path / "runs" / "data"
    assert str(folder / "train.clean.jsonl") in first and str(folder / "train.clean-2.jsonl") in second
    assert len((folder / "train.clean.jsonl").read_text(encoding="utf-8").splitlines()) == 3


def test_split_writes_the_splits_into_the_runs_dir(client, data_file, tmp_path):
    html = client.post(
        "/data/clean", data={"path": str(data_file), "action": "split", "ratios": "0.5,0.5"}
    ).text
    folder = tmp_path / "runs" / "data" / "train-split"
    assert str(folder / "train.jsonl") in html and str(folder / "validation.jsonl") in html
    written = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in folder.glob("*.jsonl"))
    assert written == len(ROWS)
    assert (
        'role="alert"'
        in client.post("/data/clean", data={"path": str(data_file), "action": "split", "ratios": "2"}).text
    )


def test_cli_serves_the_studio_and_refuses_a_file_as_runs_dir(tmp_path):
    import socket
    import time
    import urllib.error
    import urllib.request

    env = {"PATH": "/usr/bin", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    not_a_dir = tmp_path / "runs.txt"
    not_a_dir.write_text("x", encoding="utf-8")
    bad = subprocess.run(
        [sys.executable, "-m", "tunelab", "studio", "--runs", str(not_a_dir)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "is a file" in bad.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "tunelab",
        "studio",
        "--runs",
        str(tmp_path / "runs"),
        "--port",
        str(port),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        printed = server.stderr.readline()  # "studio http://127.0.0.1:PORT/?token=...  (runs: ...)"
        url = re.search(r"http://\S+\?token=\S+", printed).group(0)
        opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor()
        )  # as a browser keeps the cookie
        deadline, html = time.monotonic() + 300, ""  # a deadline for a condition: generous under load
        while time.monotonic() < deadline and not html:
            try:
                html = opener.open(url, timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
        assert str(tmp_path / "runs") in html  # the home page names the runs dir it was given
        with pytest.raises(urllib.error.HTTPError) as refused:  # without the token: nothing
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
        assert refused.value.code == 401
    finally:
        server.terminate()
        server.wait(timeout=10)
