"""Hostile cases for ``tunelab serve`` (issue 26, section 3: serving under abuse).

One real ``python -m tunelab serve`` (tiny:llama, an API key, the default 4 MB body limit) runs for all
cases, started on first use and stopped when the probe exits; three backends point at a small fake
upstream in this process that answers HTML, crashes with internals in its 500 body, or answers JSON
where an event stream was asked for. The server's log goes to a file that the cases read.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx

from hostile import Case, Outcome, free_port, user_env

AREA = "serve"
KEY = "hostile-key"
MODEL = "tiny:llama"
SECRET = "Traceback (most recent call last): File /srv/secret/runner.py"
JSON = {"content-type": "application/json"}
HEALTH_STALL_S = 5.0  # /health slower than this while one request is refused: the event loop was blocked


class _Upstream(BaseHTTPRequestHandler):
    """``/html/...`` answers 200 HTML, ``/crash/...`` a 500 naming a path, ``/json/...`` a plain JSON
    completion (whatever was asked); ``.../health`` is always fine."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self._send(200, "application/json", b"{}")

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        kind = self.path.split("/")[1]
        if kind == "html":
            self._send(200, "text/html", b"<html><body>502 Bad Gateway (nginx)</body></html>")
        elif kind == "crash":
            self._send(500, "application/json", json.dumps({"detail": SECRET}).encode())
        else:
            answer = {"id": "up-1", "object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}
            self._send(200, "application/json", json.dumps(answer).encode())

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


class _Served:
    """The one server the cases share: its URL, its log file, and the auth header."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="hostile-serve-"))
        self.upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
        threading.Thread(target=self.upstream.serve_forever, daemon=True).start()
        up = f"http://127.0.0.1:{self.upstream.server_address[1]}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.folder / "serve.log"
        backends = [f"--backend={name}=m@{up}/{name}" for name in ("html", "crash", "json")]
        env = user_env()
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tunelab", "serve", "--base", MODEL, "--port", str(self.port)]
                + ["--api-key", KEY, "--backend-failures", "1000", "--watch-interval", "60", *backends],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.folder,
            )
        atexit.register(self.close)
        deadline = time.monotonic() + 180
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tunelab serve did not start: {self.log.read_text()[-300:]}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/health", timeout=2).is_success
        return False

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}", **JSON}

    def post(self, body: object, path: str = "/v1/chat/completions", **kw: object) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.url}{path}", content=content, headers=self.auth, timeout=120, **kw)

    def metric(self, name: str, **labels: str) -> float | None:
        for line in httpx.get(f"{self.url}/metrics", headers=self.auth).text.splitlines():
            if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
        return None

    def rss_mb(self) -> int:
        """The server process's resident memory (Linux), 0 where /proc has none."""
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
        return 0

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)
        self.upstream.shutdown()


_SERVED: list[_Served] = []


def served() -> _Served:
    if not _SERVED:
        _SERVED.append(_Served())
    return _SERVED[0]


def _ask(text: str, model: str = MODEL, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


def _error(response: httpx.Response) -> dict:
    try:
        return response.json().get("error") or {}
    except ValueError:
        return {}


def _expect(response: httpx.Response, status: int, code: str | None = None) -> Outcome:
    """ok for the expected refusal; traceback for a 500; silent for anything else."""
    error = _error(response)
    seen = f"{response.status_code} {error.get('code')}: {str(error.get('message'))[:110]}"
    if response.status_code == status and (code is None or error.get("code") == code):
        return Outcome("ok", seen)
    if response.status_code == 500 and error.get("code") == "internal_error":
        return Outcome("traceback", seen)
    return Outcome("silent", seen)


def ten_mb_prompt(_: Path) -> Outcome:
    server = served()  # started first: the time reported is the request's alone
    rss, started = server.rss_mb(), time.monotonic()
    response = server.post(_ask("a" * 10_000_000))
    outcome = _expect(response, 413, "body_too_large")
    seconds = time.monotonic() - started
    return Outcome(
        outcome.verdict, f"{outcome.detail[:60]} in {seconds:.1f}s, RSS {rss} → {server.rss_mb()} MB"
    )


def chunked_body_past_the_limit(_: Path) -> Outcome:
    def chunks():  # no Content-Length: only counting as it arrives can stop it
        for _ in range(10):
            yield b" " * 1_000_000
        yield json.dumps(_ask("hi")).encode()

    server = served()
    response = httpx.post(
        f"{server.url}/v1/chat/completions", content=chunks(), headers=server.auth, timeout=120
    )
    return _expect(response, 413, "body_too_large")


def health_during_a_3mb_prompt(_: Path) -> Outcome:
    """A prompt under the body limit but far past the context: refused before tokenising; /health
    is asked meanwhile (its slowest answer is reported)."""
    server, slowest = served(), 0.0
    result: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: result.append(server.post(_ask("word " * 600_000))))
    sender.start()
    while sender.is_alive():
        started = time.monotonic()
        httpx.get(f"{server.url}/health", timeout=60)
        slowest = max(slowest, time.monotonic() - started)
    outcome = _expect(result[0], 400, "context_length_exceeded")
    detail = f"{outcome.detail[:90]}; slowest /health {slowest * 1000:.0f} ms"
    if outcome.verdict == "ok" and (slowest > HEALTH_STALL_S or "characters" not in outcome.detail):
        return Outcome("silent", f"tokenised whole on the event loop: {detail}")
    return Outcome(outcome.verdict, detail)


def client_400_not_a_variant_error(_: Path) -> Outcome:
    server = served()
    response = server.post(_ask("hi", max_tokens=100_000))
    if response.status_code != 400:
        return _expect(response, 400)
    counted = server.metric("tunelab_errors_total", variant=MODEL, code="400")
    client = server.metric("tunelab_client_errors_total", variant=MODEL, code="400")
    if counted:
        return Outcome("silent", f"tunelab_errors_total{{code=400}} = {counted}: counted against the variant")
    return Outcome("ok", f"400 counted as the client's ({client:g}), not the variant's")


def client_leaving_a_stream_not_a_variant_error(_: Path) -> Outcome:
    server = served()
    body = _ask("hi", stream=True, max_tokens=400)
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json=body, headers=server.auth
    ) as response:
        next(response.iter_lines())  # the first chunk, then leave
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.metric("tunelab_errors_total", variant=MODEL, code="499"):
            return Outcome(
                "silent", "tunelab_errors_total{code=499}: a departure counted against the variant"
            )
        if server.metric("tunelab_client_errors_total", variant=MODEL, code="499"):
            return Outcome("ok", "499 counted as the client's, not the variant's")
        time.sleep(0.2)
    return Outcome("silent", "no 499 recorded at all")


def upstream_200_html(_: Path) -> Outcome:
    server = served()
    response = server.post(_ask("hi", model="html"))
    outcome = _expect(response, 502, "upstream_bad_response")
    if outcome.verdict != "ok":
        return outcome
    faults = server.metric("tunelab_upstream_errors_total", variant="html", reason="bad_response")
    if not faults:
        return Outcome("silent", "502 to the client but no upstream fault counted")
    return Outcome("ok", f"{outcome.detail[:80]}; upstream faults {faults:g}")


def upstream_json_for_a_stream(_: Path) -> Outcome:
    return _expect(served().post(_ask("hi", model="json", stream=True)), 502, "upstream_bad_response")


def upstream_500_body(_: Path) -> Outcome:
    server = served()
    response = server.post(_ask("hi", model="crash"))
    if "/srv/secret" in response.text or "Traceback" in response.text:
        return Outcome("leak", f"{response.status_code}: {response.text[:120]}")
    message = str(_error(response).get("message"))
    if not message.startswith("upstream error, see log ref "):
        return Outcome("silent", f"{response.status_code}: {message[:120]}")
    ref = message.rsplit(" ", 1)[1]
    logged = any(ref in line and "/srv/secret" in line for line in server.log.read_text().splitlines())
    return Outcome("ok" if logged else "silent", f"{message}; {'in' if logged else 'NOT in'} the log")


def nested_100k_deep(_: Path) -> Outcome:
    deep = b'{"model": "tiny:llama", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return _expect(served().post(deep), 400, "body_too_deep")


def user_message_without_content(_: Path) -> Outcome:
    body = {"model": MODEL, "messages": [{"role": "user"}], "max_tokens": 4}
    return _expect(served().post(body), 400)


def client_leaving_mid_body(_: Path) -> Outcome:
    server = served()
    before = len(server.log.read_text().splitlines())
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"
        )
        sock.sendall(head.encode() + b'{"model": "tiny:llama", "mess')
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        new = server.log.read_text().splitlines()[before:]
        if any("Traceback" in line or "internal error" in line for line in new):
            return Outcome(
                "traceback", next(line for line in new if "Traceback" in line or "internal" in line)
            )
        if said := [line for line in new if "went away" in line]:
            return Outcome("ok", said[0].strip()[:140])
        time.sleep(0.2)
    return Outcome("silent", "nothing logged")


def docs_with_an_api_key(_: Path) -> Outcome:
    server = served()
    pages = {path: httpx.get(f"{server.url}{path}") for path in ("/docs", "/redoc", "/openapi.json")}
    if pages["/openapi.json"].status_code == 200:
        return Outcome("leak", "/openapi.json (admin routes described) answered without the key")
    for path in ("/docs", "/redoc"):
        if pages[path].status_code == 200 or "cdn" in pages[path].text.lower():
            return Outcome("silent", f"{path} answered {pages[path].status_code} (scripts from a CDN)")
    return Outcome(
        "ok", ", ".join(f"{path} {page.status_code}" for path, page in pages.items()) + " without the key"
    )


CASES = [
    Case(AREA, "a 10 MB prompt is refused unread (413)", ten_mb_prompt),
    Case(AREA, "a chunked body past the limit is cut off (413)", chunked_body_past_the_limit),
    Case(AREA, "a 3 MB prompt is refused untokenised; /health answers", health_during_a_3mb_prompt),
    Case(AREA, "a client's 400 is not a variant error", client_400_not_a_variant_error),
    Case(
        AREA, "a client leaving a stream is not a variant error", client_leaving_a_stream_not_a_variant_error
    ),
    Case(AREA, "an upstream 200 HTML answer is a 502 fault", upstream_200_html),
    Case(AREA, "an upstream JSON answer to a stream is a 502", upstream_json_for_a_stream),
    Case(AREA, "an upstream 500 body stays in the log", upstream_500_body),
    Case(AREA, "a body nested 100k deep is a 400", nested_100k_deep),
    Case(AREA, "a user message without content is a 400", user_message_without_content),
    Case(AREA, "a client leaving mid-body is one log line", client_leaving_mid_body),
    Case(AREA, "with --api-key, no CDN docs and a keyed schema", docs_with_an_api_key),
]
