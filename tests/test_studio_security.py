"""The studio against a web page that is not its own (issue 26 §2): token, Host, Origin, CSRF, body types,
the roots it may read and write, and a long audit that must not hold up other pages (§3).

The same attacks from a real second origin in Chromium are in test_studio_browser_attacks.py.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from studio_client import BASE, logged_in, studio_client
from tunelab.studio import jobs
from tunelab.studio.app import create_app

SECRET = "root:$6$salt$hash:19000:0:99999:7:::"
ROWS = [{"instruction": "Say hi to the user", "output": "hi there friend"}] * 3


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


@pytest.fixture
def outside(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that is none of the studio's roots, holding a secret in a file of each kind it reads."""
    folder = tmp_path_factory.mktemp("elsewhere")
    for name in ("shadow", "shadow.yaml", "secret.jsonl", "secret.csv"):
        (folder / name).write_text(f"{SECRET}\n{SECRET}\n", encoding="utf-8")
    return folder


def recipe_form(data_file: Path, **extra: str) -> dict[str, str]:
    return {"model.name_or_path": "tiny:llama", "data.train": str(data_file), "output.name": "mine", **extra}


def test_the_studio_always_has_a_token_and_trades_it_for_a_strict_cookie(tmp_path):
    app = create_app(tmp_path / "runs")
    assert len(app.state.token) >= 32 and app.state.token != create_app(tmp_path / "runs").state.token
    anonymous = TestClient(app, base_url=BASE, follow_redirects=False)
    for path in ("/", "/data", "/static/studio.css", "/recipe?load=x.yaml"):
        assert anonymous.get(path).status_code == 401, path
    assert anonymous.get("/?token=wrong").status_code == 401
    login = anonymous.get(f"/data?path=a.jsonl&token={app.state.token}")
    assert login.status_code == 303 and login.headers["location"] == "/data?path=a.jsonl"  # token dropped
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert anonymous.get("/data").status_code == 200  # the cookie
    bearer = TestClient(app, base_url=BASE).get("/", headers={"Authorization": f"Bearer {app.state.token}"})
    assert bearer.status_code == 200


def test_a_rebound_host_gets_nothing_even_with_the_token(tmp_path, outside):
    app = create_app(tmp_path / "runs", roots=[outside])
    client = logged_in(app)
    rebound = {"Host": "evil.example:7860"}
    response = client.get(f"/recipe?load={outside / 'shadow.yaml'}", headers=rebound)
    assert response.status_code == 403 and "--allow-host evil.example" in response.text
    assert SECRET not in response.text
    assert client.get("/", headers={"Host": "localhost:7860"}).status_code == 200
    allowed = logged_in(create_app(tmp_path / "runs", allowed_hosts=["127.0.0.1", "studio.lan"]))
    assert allowed.get("/", headers={"Host": "studio.lan:7860"}).status_code == 200


@pytest.mark.parametrize(
    ("headers", "refusal"),
    [
        ({"Origin": "http://evil.example"}, "cross-origin"),
        ({"Origin": "http://127.0.0.1:9999"}, "cross-origin"),  # same site, other origin: still refused
        ({"Origin": "null"}, "cross-origin"),
        ({"Origin": None}, "CSRF"),  # no Origin and no Referer: a browser always sends one on a POST
        ({"X-CSRF-Token": "guess"}, "CSRF"),
        ({"X-CSRF-Token": None}, "CSRF"),
    ],
)
def test_state_changes_need_same_origin_and_the_csrf_token(tmp_path, data_file, headers, refusal):
    client = studio_client(tmp_path / "runs")
    for name, value in headers.items():
        client.headers.pop(name) if value is None else client.headers.update({name: value})
    response = client.post("/recipe/save", data=recipe_form(data_file))
    assert response.status_code == 403 and refusal in response.text
    assert not (tmp_path / "runs" / "recipes").exists()


def test_a_referer_from_the_studio_stands_for_the_origin(tmp_path, data_file):
    client = studio_client(tmp_path / "runs")
    client.headers.pop("Origin")
    response = client.post("/recipe/save", data=recipe_form(data_file), headers={"Referer": f"{BASE}/recipe"})
    assert response.status_code == 200 and (tmp_path / "runs" / "recipes" / "mine.yaml").is_file()


def test_the_pages_carry_the_csrf_token_for_htmx_and_the_upload(tmp_path):
    client = studio_client(tmp_path / "runs")
    html = client.get("/data").text
    csrf = client.headers["X-CSRF-Token"]
    assert f'<meta name="csrf-token" content="{csrf}">' in html
    assert f'hx-headers=\'{{"X-CSRF-Token": "{csrf}"}}\'' in html


def test_forms_take_only_form_bodies_and_the_upload_only_raw_bytes(tmp_path, data_file):
    client = studio_client(tmp_path / "runs")
    body = "&".join(f"{k}={v}" for k, v in recipe_form(data_file).items())
    for kind in ("text/plain", "application/json", "multipart/form-data; boundary=x"):
        response = client.post("/recipe/save", content=body, headers={"Content-Type": kind})
        assert response.status_code == 415, kind
    assert not (tmp_path / "runs" / "recipes").exists()
    upload = client.put(
        "/data/upload?name=a.jsonl", content=data_file.read_bytes(), headers={"Content-Type": "text/plain"}
    )
    assert upload.status_code == 415 and not (tmp_path / "runs" / "uploads").exists()


def test_files_outside_the_roots_are_refused_naming_the_path_never_its_content(tmp_path, outside):
    client = studio_client(tmp_path / "runs")
    for name in ("shadow", "shadow.yaml"):
        response = client.get(f"/recipe?load={outside / name}")
        assert response.status_code == 400 and "outside the studio" in response.text
        assert str(outside / name) in response.text and "$6$" not in response.text
    for route in ("/data/audit", "/data/preview", "/data/clean"):
        for name in ("secret.jsonl", "secret.csv"):
            html = client.post(route, data={"path": str(outside / name)}).text
            assert "outside the studio" in html and "$6$" not in html, route
    assert not (tmp_path / "runs" / "data").exists()  # clean wrote nothing


def test_a_file_under_the_roots_that_is_no_recipe_is_not_quoted(tmp_path):
    client = studio_client(tmp_path / "runs")
    notes = tmp_path / "notes.yaml"
    notes.write_text("root: x\npassword: hunter2\n", encoding="utf-8")
    html = client.get(f"/recipe?load={notes}").text
    assert "not a recipe" in html and "hunter2" not in html and "password" not in html
    recipe = tmp_path / "typo.yaml"  # a recipe's own mistakes are still named, key and all
    recipe.write_text("model: {name_or_path: tiny:llama}\ntraning: {}\n", encoding="utf-8")
    assert "traning" in client.get(f"/recipe?load={recipe}").text


def test_a_recipe_naming_files_outside_the_roots_is_neither_saved_nor_trained(tmp_path, data_file, outside):
    client = studio_client(tmp_path / "runs")
    (outside / "reward.py").write_text("def score(*a):\n    return 1.0\n", encoding="utf-8")
    html = client.post("/recipe/save", data=recipe_form(outside / "secret.jsonl")).text
    assert "data.train" in html and "outside the studio" in html
    assert not (tmp_path / "runs" / "recipes").exists()
    recipe = tmp_path / "grpo.yaml"  # written by hand under the roots, its reward script elsewhere
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data_file)},
        "method": {"name": "lora"},
        "objective": {"name": "grpo", "reward": f"{outside / 'reward.py'}:score"},
    }
    recipe.write_text(yaml.safe_dump(raw), encoding="utf-8")
    html = client.post("/train/start", data={"recipe": str(recipe)}).text
    assert "objective.reward" in html and "outside the studio" in html
    far = outside / "far.yaml"
    far.write_text(yaml.safe_dump({**raw, "objective": {"name": "sft"}}), encoding="utf-8")
    assert "outside the studio" in client.post("/train/start", data={"recipe": str(far)}).text
    assert not list((tmp_path / "runs" / jobs.STUDIO_DIR).glob("*.json"))  # nothing started


def test_an_export_outside_the_roots_is_refused_and_nothing_is_made(tmp_path, outside):
    runs = tmp_path / "runs"
    (runs / "done" / "final").mkdir(parents=True)
    client = studio_client(runs)
    for out, refusal in ((outside / "new-export", "outside the studio"), ("--help", "starts with '-'")):
        html = client.post("/export/start", data={"run": "done", "kind": "adapter", "out": str(out)}).text
        assert refusal in html.replace("&#39;", "'"), out
    assert not (outside / "new-export").exists() and not Path("--help").exists()
    assert not list((runs / jobs.STUDIO_DIR).rglob("*.json"))


def test_a_long_audit_does_not_hold_up_other_pages(tmp_path, data_file, monkeypatch):
    """The audit is held on an event until another page has answered: were the audit run on the
    event loop, that page could not answer and the audit would only end on the safety bound."""
    import tunelab.data.audit as audit_module

    real, started, release, order = audit_module.audit, threading.Event(), threading.Event(), []

    def held_audit(*args, **kwargs):
        started.set()
        release.wait(timeout=120)  # a safety bound for a broken build, not a timing
        order.append("audit")
        return real(*args, **kwargs)

    monkeypatch.setattr(audit_module, "audit", held_audit)
    app = create_app(tmp_path / "runs", roots=[tmp_path])
    with logged_in(app) as client:  # one event loop serves every request, as uvicorn's does
        result = {}
        auditing = threading.Thread(
            target=lambda: result.update(audit=client.post("/data/audit", data={"path": str(data_file)}))
        )
        auditing.start()
        assert started.wait(timeout=120)
        page = client.get("/runs")
        order.append("page")
        release.set()
        auditing.join()
    assert page.status_code == 200 and order == ["page", "audit"]
    assert "3 rows" in result["audit"].text


def test_a_link_under_the_roots_to_a_file_outside_is_refused(tmp_path, outside):
    client = studio_client(tmp_path / "runs")
    link = tmp_path / "innocent.jsonl"
    link.symlink_to(outside / "secret.jsonl")
    html = client.post("/data/audit", data={"path": str(link)}).text
    assert "outside the studio" in html and "$6$" not in html


def test_the_cli_refuses_a_data_root_that_is_no_folder(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tunelab",
            "studio",
            "--runs",
            str(tmp_path / "runs"),
            "--data-root",
            str(tmp_path / "no"),
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin", "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "--data-root" in result.stderr and "not a folder" in result.stderr
