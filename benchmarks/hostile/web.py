"""Issue 26 §2 and the studio's part of §3: what any web page could make `tunelab studio` and `tunelab serve`
do on loopback. Each case starts the real command, then sends what a hostile page in the user's browser
would send: the victim's cookie rides along (same site), the Origin is the attacker's, the Host may be a
rebound DNS name. ``ok``: refused and nothing happened; ``silent``: it was done; ``leak``: a file's
content (or any page) came back.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlencode

from hostile import Case, Outcome, free_port, user_env

SECRET = "root:$6$salt$hash:19000:0:99999:7:::"
EVIL = "http://evil.example"
FORM = "application/x-www-form-urlencoded"


class Service:
    """A `tunelab studio` or `tunelab serve` process on a free loopback port, stopped on exit."""

    def __init__(self, scratch: Path, *args: str):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tunelab", *args, "--port", str(self.port)],
            cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=user_env(),
        )  # fmt: skip
        self.printed = ""

    def __enter__(self) -> Service:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited: {self.process.stderr.read()[-300:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the service did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)

    def request(self, method: str, path: str, body: str = "", headers: dict | None = None) -> tuple[int, str]:
        headers = {"Host": f"127.0.0.1:{self.port}", **(headers or {})}
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        conn.request(method, path, body=body.encode() if body else None, headers=headers)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")


class Studio(Service):
    """`tunelab studio --runs HOME/runs --data-root HOME`; the token read from its start line."""

    def __init__(self, scratch: Path):
        self.home = scratch / "home"
        (self.home / "runs" / "done" / "final").mkdir(parents=True)
        super().__init__(scratch, "studio", "--runs", str(self.home / "runs"), "--data-root", str(self.home))

    def __enter__(self) -> Studio:
        self.printed = self.process.stderr.readline()
        self.token = re.search(r"\?token=(\S+)", self.printed).group(1)
        super().__enter__()
        self.cookie = {
            "Cookie": f"tunelab_studio_{self.port}={self.token}"
        }  # what the victim's browser holds
        return self

    def own(self) -> dict[str, str]:
        """The headers of the studio's own page: its cookie, its origin and the CSRF token it carries."""
        _, html = self.request("GET", "/data", headers=self.cookie)
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', html).group(1)
        return self.cookie | {"Origin": f"http://127.0.0.1:{self.port}", "X-CSRF-Token": csrf}

    def jobs(self) -> list[Path]:
        return list((self.home / "runs" / ".studio").rglob("*.json"))


def _recipe(folder: Path, **objective: str) -> Path:
    data = folder / "train.jsonl"
    data.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n", encoding="utf-8")
    raw = {
        "model": {"name_or_path": "tiny:llama", "trust_remote_code": True},
        "data": {"train": str(data)},
        "method": {"name": "lora"},
        **({"objective": objective} if objective else {}),
    }
    path = folder / "evil.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")  # JSON is YAML
    return path


def _secrets(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("shadow", "secret.yaml", "secret.jsonl", "secret.csv"):
        (folder / name).write_text(f"{SECRET}\n{SECRET}\n", encoding="utf-8")
    return folder


def _refused(status: int, body: str, done: bool, codes: tuple[int, ...] = (403, 415)) -> Outcome:
    if "$6$" in body:
        return Outcome("leak", f"{status}: the file's content came back")
    if done or status not in codes:
        return Outcome("silent", f"answered {status}{'; it was done' if done else ''}: {body[:100]}")
    return Outcome("ok", f"{status}: {_text(body)[:110]}")


def _text(body: str) -> str:
    """A page's words, for the table: tags and runs of space removed."""
    return " ".join(re.sub(r"<[^>]+>", " ", body).split())


def studio_without_token(scratch: Path) -> Outcome:
    with Studio(scratch) as studio:
        if "?token=" not in studio.printed:
            return Outcome("silent", f"no token in the start line: {studio.printed.strip()[:100]}")
        status, body = studio.request("GET", "/runs")
    return _refused(status, body, False, codes=(401,))


def cross_origin_save_then_train(scratch: Path) -> Outcome:
    """POST /recipe/save then /train/start from another origin, form-encoded and text/plain."""
    with Studio(scratch) as studio:
        recipe = _recipe(studio.home)
        save = urlencode({"model.name_or_path": "tiny:llama", "model.trust_remote_code": "true",
                          "data.train": str(studio.home / "train.jsonl"), "output.name": "pwned"})  # fmt: skip
        answers = []
        for kind in (FORM, "text/plain"):
            headers = studio.cookie | {"Origin": EVIL, "Content-Type": kind}
            answers.append(studio.request("POST", "/recipe/save", save, headers))
            answers.append(
                studio.request("POST", "/train/start", urlencode({"recipe": str(recipe)}), headers)
            )
        done = (studio.home / "runs" / "recipes").exists() or bool(studio.jobs())
    bad = [a for a in answers if a[0] != 403]
    return _refused(*(bad[0] if bad else answers[-1]), done)


def same_site_page_without_csrf(scratch: Path) -> Outcome:
    """A page on another port of 127.0.0.1 (same site: the strict cookie goes along) that hides its Origin."""
    with Studio(scratch) as studio:
        recipe = _recipe(studio.home)
        status, body = studio.request(
            "POST", "/train/start", urlencode({"recipe": str(recipe)}), studio.cookie | {"Content-Type": FORM}
        )
        done = bool(studio.jobs())
    return _refused(status, body, done)


def text_plain_form_post(scratch: Path) -> Outcome:
    """The studio's own origin and token, but a text/plain body: forms take only their own type."""
    with Studio(scratch) as studio:
        recipe = _recipe(studio.home)
        headers = studio.own() | {"Content-Type": "text/plain"}
        status, body = studio.request("POST", "/train/start", f"recipe={recipe}", headers)
        done = bool(studio.jobs())
    return _refused(status, body, done, codes=(415,))


def export_to_an_arbitrary_path(scratch: Path) -> Outcome:
    """Even from the studio's own page, an export outside its folders is refused, and nothing is made."""
    with Studio(scratch) as studio:
        target = scratch / "elsewhere" / "export"
        form = urlencode({"run": "done", "kind": "adapter", "out": str(target)})
        cross = studio.request(
            "POST", "/export/start", form, studio.cookie | {"Origin": EVIL, "Content-Type": FORM}
        )
        own = studio.request("POST", "/export/start", form, studio.own() | {"Content-Type": FORM})
        done = target.exists() or bool(studio.jobs())
    if cross[0] != 403:
        return _refused(*cross, done)
    if "outside the studio" not in own[1]:
        return Outcome("silent", f"the studio's own page exported outside its folders: {own[1][:100]}")
    return _refused(403, own[1], done)


def rebound_host_reads_a_file(scratch: Path) -> Outcome:
    """DNS rebinding: ``evil.example`` now points at 127.0.0.1; the page reads a file under the roots."""
    with Studio(scratch) as studio:
        secret = _secrets(studio.home / "private") / "secret.yaml"
        headers = studio.cookie | {"Host": f"evil.example:{studio.port}"}
        status, body = studio.request("GET", f"/recipe?load={quote(str(secret))}", headers=headers)
    return _refused(status, body, False, codes=(403,))


def load_and_preview_outside_the_roots(scratch: Path) -> Outcome:
    """The studio's own session asks for files outside its folders: ``recipe?load=`` and the data routes."""
    outside = _secrets(scratch / "outside")
    with Studio(scratch) as studio:
        answers = [studio.request("GET", f"/recipe?load={quote(str(outside / n))}", headers=studio.cookie)
                   for n in ("shadow", "secret.yaml")]  # fmt: skip
        own = studio.own() | {"Content-Type": FORM}
        for route in ("/data/preview", "/data/audit"):
            for name in ("secret.jsonl", "secret.csv"):
                answers.append(studio.request("POST", route, urlencode({"path": str(outside / name)}), own))
    for status, body in answers:
        if "$6$" in body or "outside the studio" not in body:
            return _refused(status, body, "outside the studio" not in body)
    return Outcome("ok", f"{len(answers)} reads refused: {_text(answers[0][1])[-110:]}")


def a_non_recipe_file_is_not_quoted(scratch: Path) -> Outcome:
    """A file under the roots that is no recipe: its lines must not come back as "unknown key"s."""
    with Studio(scratch) as studio:
        notes = studio.home / "notes.yaml"
        notes.write_text("root: x\npassword: $6$salt$hash\n", encoding="utf-8")
        status, body = studio.request("GET", f"/recipe?load={quote(str(notes))}", headers=studio.cookie)
    return _refused(status, body, False, codes=(400,))


def reward_script_outside_the_roots(scratch: Path) -> Outcome:
    """A recipe under the roots whose reward script (imported by the trainer) lies elsewhere."""
    script = scratch / "outside" / "reward.py"
    script.parent.mkdir()
    script.write_text("def score(*args):\n    return 1.0\n", encoding="utf-8")
    with Studio(scratch) as studio:
        recipe = _recipe(studio.home, name="grpo", reward=f"{script}:score")
        status, body = studio.request(
            "POST", "/train/start", urlencode({"recipe": str(recipe)}), studio.own() | {"Content-Type": FORM}
        )
        done = bool(studio.jobs())
    if "outside the studio" not in body:
        return Outcome("silent", f"{status}: {body[:120]}")
    return _refused(403, body, done)


def a_long_audit_holds_up_no_page(scratch: Path) -> Outcome:
    """A 10 MB audit in one request; meanwhile another page must answer before the audit does."""
    with Studio(scratch) as studio:
        big = studio.home / "big.jsonl"
        row = json.dumps({"instruction": "word " * 40, "output": "answer " * 40}) + "\n"
        big.write_text(row * (10_000_000 // len(row)), encoding="utf-8")
        own, finished = studio.own() | {"Content-Type": FORM}, {}

        def audit() -> None:
            studio.request("POST", "/data/audit", urlencode({"path": str(big)}), own)
            finished["audit"] = time.perf_counter()

        worker = threading.Thread(target=audit)
        start = time.perf_counter()
        worker.start()
        time.sleep(0.5)  # the audit is under way (a probe may time; tests wait on events)
        studio.request("GET", "/runs", headers=studio.cookie)
        page = time.perf_counter()
        worker.join()
    if finished.get("audit", 0) <= page:
        return Outcome("silent", f"the page waited for the audit: answered after {page - start:.1f}s")
    return Outcome(
        "ok", f"page in {page - start - 0.5:.2f}s; the audit took {finished['audit'] - start:.1f}s"
    )


def _serve(scratch: Path) -> Service:
    """A keyless `tunelab serve` on loopback whose one variant is a backend (no model to load)."""
    (scratch / "logs").mkdir()
    return Service(
        scratch, "serve", "--backend", "up=http://127.0.0.1:9/v1", "--log-dir", str(scratch / "logs")
    )


CHAT = json.dumps({"model": "up", "messages": [{"role": "user", "content": "hi"}]})


def serve_text_plain_chat(scratch: Path) -> Outcome:
    """A page's no-cors POST: a text/plain body that is JSON. It must not be parsed, run or logged."""
    with _serve(scratch) as serve:
        status, body = serve.request("POST", "/v1/chat/completions", CHAT, {"Content-Type": "text/plain"})
    logged = any(p.stat().st_size for p in (scratch / "logs").glob("*.jsonl"))
    return _refused(status, body, logged, codes=(415,))


def serve_rebound_host(scratch: Path) -> Outcome:
    with _serve(scratch) as serve:
        headers = {"Host": f"evil.example:{serve.port}", "Content-Type": "application/json"}
        status, body = serve.request("POST", "/v1/chat/completions", CHAT, headers)
    return _refused(status, body, False, codes=(403,))


def serve_cross_origin_json(scratch: Path) -> Outcome:
    with _serve(scratch) as serve:
        headers = {"Origin": EVIL, "Content-Type": "application/json"}
        status, body = serve.request("POST", "/v1/chat/completions", CHAT, headers)
    return _refused(status, body, False, codes=(403,))


CASES = [
    Case("web", "studio: a request without the token", studio_without_token),
    Case("web", "studio: cross-origin save + train (form and text/plain)", cross_origin_save_then_train),
    Case("web", "studio: same-site page, no Origin, no CSRF token", same_site_page_without_csrf),
    Case("web", "studio: text/plain body on a form endpoint", text_plain_form_post),
    Case("web", "studio: export to an arbitrary new path", export_to_an_arbitrary_path),
    Case("web", "studio: DNS rebinding reads recipe?load=", rebound_host_reads_a_file),
    Case("web", "studio: load/preview/audit files outside the roots", load_and_preview_outside_the_roots),
    Case("web", "studio: a non-recipe .yaml is not quoted back", a_non_recipe_file_is_not_quoted),
    Case("web", "studio: recipe with a reward script outside the roots", reward_script_outside_the_roots),
    Case("web", "studio: a 10 MB audit holds up no other page", a_long_audit_holds_up_no_page),
    Case("web", "serve: text/plain chat body", serve_text_plain_chat),
    Case("web", "serve: DNS-rebound Host", serve_rebound_host),
    Case("web", "serve: cross-origin JSON post", serve_cross_origin_json),
]
