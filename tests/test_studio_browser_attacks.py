"""Issue 26 §2 in a real Chromium: a page from a second origin tries each attack on `tunelab studio` and
`tunelab serve`, and is refused.

The victim's browser holds the studio's cookie (it opened the start URL). The attacker's page is served
from ``http://127.0.0.1:OTHER``: the same *site* as the studio, so even the SameSite=Strict cookie goes
along and only the Origin and CSRF checks stand in the way. DNS rebinding is played with Chromium's
``--host-resolver-rules``: ``evil.example`` resolves to 127.0.0.1, so a page of that origin reaches the
services under a Host they must refuse. Each server records the status it answered, so every refusal
is shown to come from the server, not from a request the browser never sent.
"""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path

import pytest
import yaml

from test_studio_browser import CHROMIUM, playwright
from test_studio_train import tiny_recipe
from tunelab.serve.app import ServeSettings
from tunelab.serve.app import create_app as serve_app
from tunelab.serve.routing import Router
from tunelab.serve.server import BackgroundServer
from tunelab.studio import jobs
from tunelab.studio.app import create_app

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH; run `make chromium`")
SECRET = "root:$6$salt$hash:19000:0:99999:7:::"

ATTACK = """<!doctype html><title>cute cats</title>
<iframe name="sink"></iframe>
<form id="classic" method="post" enctype="text/plain" target="sink"><input name="x" value="y"></form>
<script>
async function attack(studio, serve, train, recipe, out) {
  const posts = [
    ["/recipe/save", train, "application/x-www-form-urlencoded"],
    ["/recipe/save", train, "text/plain"],
    ["/train/start", "recipe=" + encodeURIComponent(recipe) + "&name=pwned", "application/x-www-form-urlencoded"],
    ["/train/start", "recipe=" + encodeURIComponent(recipe) + "&name=pwned", "text/plain"],
    ["/export/start", "run=done&kind=adapter&out=" + encodeURIComponent(out), "application/x-www-form-urlencoded"],
  ];
  for (const [path, body, type] of posts) {
    await fetch(studio + path, {method: "POST", mode: "no-cors", credentials: "include",
                                headers: {"Content-Type": type}, body});
  }
  const chat = JSON.stringify({model: "tiny:llama", messages: [{role: "user", content: "hi"}]});
  await fetch(serve + "/v1/chat/completions", {method: "POST", mode: "no-cors",
                                               headers: {"Content-Type": "text/plain"}, body: chat});
  let read;
  try { read = await (await fetch(studio + "/runs", {credentials: "include"})).text(); }
  catch (e) { read = "blocked: " + e; }
  const form = document.getElementById("classic");  // a plain form post, the oldest CSRF of all
  form.action = studio + "/train/start";
  const loaded = new Promise(resolve => document.querySelector("iframe").onload = resolve);
  form.submit();
  await loaded;
  return read;
}
</script>"""


def recorded(app, log: list[tuple[str, str, int]]):
    """``app`` with every answer's (method, path, status) appended to ``log``."""

    async def wrapper(scope, receive, send):
        async def answer(message):
            if message["type"] == "http.response.start":
                log.append((scope["method"], scope["path"], message["status"]))
            await send(message)

        await app(scope, receive, answer)

    return wrapper


class Attacker:
    """The attacker's site: one page, on its own port of 127.0.0.1."""

    def __init__(self):
        class Page(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = ATTACK.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    """A logged-in Chromium, the studio (a finished run to export, a recipe to train, a secret file
    under its roots), a keyless `serve`, and the attacker's page; what each server answered."""
    home = tmp_path_factory.mktemp("victim")
    runs = home / "runs"
    (runs / "done" / "final").mkdir(parents=True)
    (home / "secret.jsonl").write_text(f"{SECRET}\n", encoding="utf-8")
    (home / "secret.yaml").write_text(f"{SECRET}\n", encoding="utf-8")
    studio_log: list = []
    serve_log: list = []
    studio = create_app(runs, roots=[home, Path(__file__).parents[1] / "recipes" / "data"])
    served = serve_app(None, Router(None, []), ServeSettings())
    attacker = Attacker()
    with (
        BackgroundServer(recorded(studio, studio_log)) as studio_server,
        BackgroundServer(recorded(served, serve_log)) as serve_server,
        playwright.sync_playwright() as p,
    ):
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--host-resolver-rules=MAP evil.example 127.0.0.1"],
        )
        page = browser.new_context().new_page()
        page.goto(f"{studio_server.url}/?token={studio.state.token}")  # the victim opened the studio
        yield {
            "page": page, "home": home, "runs": runs, "studio": studio_server, "serve": serve_server,
            "attacker": attacker, "studio_log": studio_log, "serve_log": serve_log, "app": studio,
        }  # fmt: skip
        browser.close()
        attacker.server.shutdown()


def test_a_second_origin_can_neither_save_train_export_nor_generate(world):
    page, home, runs = world["page"], world["home"], world["runs"]
    recipe = tiny_recipe(home, 3)
    form = {
        "model.name_or_path": "tiny:llama",
        "model.trust_remote_code": "true",
        "data.train": str(Path(__file__).parents[1] / "recipes" / "data" / "tiny_train.jsonl"),
        "output.name": "pwned",
    }
    train = "&".join(f"{k}={v}" for k, v in form.items())
    page.goto(world["attacker"].url)
    read = page.evaluate(
        "([s, v, t, r, o]) => attack(s, v, t, r, o)",
        [world["studio"].url, world["serve"].url, train, str(recipe), str(home / "exported")],
    )
    assert read.startswith("blocked")  # no CORS: the attacker's page reads nothing
    posts = [(path, status) for method, path, status in world["studio_log"] if method == "POST"]
    assert [p for p, _ in posts] == ["/recipe/save"] * 2 + ["/train/start"] * 2 + [
        "/export/start",
        "/train/start",
    ]
    assert all(status == 403 for _, status in posts), posts  # every one reached the studio and was refused
    assert world["serve_log"] == [("POST", "/v1/chat/completions", 403)]
    assert not (runs / "recipes").exists() and not (home / "exported").exists()
    assert not list((runs / jobs.STUDIO_DIR).rglob("*.json"))  # no training, no export started

    page.goto(f"{world['studio'].url}/recipe")  # the control: the studio's own page may save, same browser
    saved = page.evaluate(
        """async (body) => {
             const csrf = document.querySelector("meta[name=csrf-token]").content;
             const r = await fetch("/recipe/save", {method: "POST", body,
               headers: {"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": csrf}});
             return [r.status, await r.text()];
           }""",
        train.replace("pwned", "mine"),
    )
    assert saved[0] == 200 and (runs / "recipes" / "mine.yaml").is_file(), saved
    assert yaml.safe_load((runs / "recipes" / "mine.yaml").read_text())["model"]["trust_remote_code"] is True


def test_dns_rebinding_reads_nothing_from_either_service(world):
    page, home = world["page"], world["home"]
    port = world["studio"].port
    response = page.goto(f"http://evil.example:{port}/recipe?load={home / 'secret.yaml'}")
    assert response.status == 403 and "--allow-host evil.example" in page.content()
    assert "$6$" not in page.content()
    preview = page.evaluate(  # same origin now (evil.example:PORT): a read would succeed but for the Host
        """async (path) => {
             const r = await fetch("/data/preview", {method: "POST", body: "path=" + encodeURIComponent(path),
               headers: {"Content-Type": "application/x-www-form-urlencoded"}});
             return [r.status, await r.text()];
           }""",
        str(home / "secret.jsonl"),
    )
    assert preview[0] == 403 and "$6$" not in preview[1]
    serve_port = world["serve"].port
    assert page.goto(f"http://evil.example:{serve_port}/v1/models").status == 403
    chat = page.evaluate(
        """async () => {
             const r = await fetch("/v1/chat/completions", {method: "POST", headers: {"Content-Type": "application/json"},
               body: JSON.stringify({model: "tiny:llama", messages: [{role: "user", content: "hi"}]})});
             return [r.status, await r.text()];
           }"""
    )
    assert chat[0] == 403 and json.loads(chat[1])["error"]["code"] == "host_not_allowed"
