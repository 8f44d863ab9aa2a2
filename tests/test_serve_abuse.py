"""`tunelab serve` under abuse (issue 26, section 3): oversized and deeply nested bodies, prompts far
past the context, clients that leave, upstreams that answer garbage or leak internals, and the
documentation pages. One tiny:llama server with a small body limit and a fake upstream behind it."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client.parser import text_string_to_metric_families

from tunelab.serve import app as app_module
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.backends import Backends, parse_backend
from tunelab.serve.engine import Engine
from tunelab.serve.limits import MAX_JSON_DEPTH
from tunelab.serve.routing import Router, WatchPolicy
from tunelab.serve.server import BackgroundServer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
LIMIT = 64 * 1024
BASE = "tiny:llama"
SECRET = "Traceback at /srv/secret/model_runner.py line 12"


def fake_upstream() -> FastAPI:
    """An upstream that answers what the first message asks for: html, json-for-a-stream, crash."""
    upstream = FastAPI()

    @upstream.get("/health")
    def health() -> dict:
        return {}

    @upstream.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        said = (await request.json())["messages"][0]["content"]
        if said == "html":
            return PlainTextResponse("<html>502 Bad Gateway (nginx)</html>", media_type="text/html")
        if said == "crash":
            return JSONResponse({"detail": SECRET}, status_code=500)
        message = {"role": "assistant", "content": f"echo {said}"}
        return JSONResponse({"id": "up-1", "object": "chat.completion", "choices": [{"message": message}]})

    return upstream


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[BackgroundServer, Engine]]:
    with BackgroundServer(fake_upstream()) as upstream:
        engine = Engine.load(BASE, {}, device="cpu", max_tokens_limit=64)
        backends = Backends([parse_backend(f"up=m@{upstream.url}")], max_failures=1000)
        router = Router(engine.base_name, [], WatchPolicy(min_samples=1000), backends=backends.names)
        settings = ServeSettings(api_key=KEY, max_body_bytes=LIMIT, watch_interval_s=60)
        with BackgroundServer(create_app(engine, router, settings, backends)) as server:
            yield server, engine


@pytest.fixture
def server(served: tuple[BackgroundServer, Engine]) -> BackgroundServer:
    return served[0]


@pytest.fixture
def engine(served: tuple[BackgroundServer, Engine]) -> Engine:
    return served[1]


def post(server: BackgroundServer, body: object, path: str = "/v1/chat/completions") -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.url}{path}", content=content, headers=AUTH, timeout=60)


def ask(text: str, model: str = BASE, **extra: object) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 4, **extra}


def metric(server: BackgroundServer, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def wait_for(condition: Any, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# --- size ----------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_a_413_and_never_parsed(
    server: BackgroundServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = []
    real = app_module.parse_json
    monkeypatch.setattr(app_module, "parse_json", lambda raw: parsed.append(len(raw)) or real(raw))
    declared = post(server, ask("a" * LIMIT))
    assert declared.status_code == 413 and declared.json()["error"]["code"] == "body_too_large"
    assert "--max-body-mb" in declared.json()["error"]["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        whole = json.dumps(ask("a" * (LIMIT // 2))).encode()
        yield whole[:-1]
        yield b" " * LIMIT + whole[-1:]

    streamed = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), headers=AUTH, timeout=60)
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "body_too_large"
    assert parsed == []
    feedback = post(server, {"adapter": BASE, "score": 1, "user": "u" * LIMIT}, "/v1/feedback")
    assert feedback.status_code == 413  # routes that FastAPI parses are capped the same way
    assert post(server, ask("hello")).status_code == 200 and len(parsed) == 1


def test_a_prompt_far_past_the_context_is_refused_without_tokenising_it(
    server: BackgroundServer, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    tokenizer = engine.tokenizer

    class Spy:
        def __call__(self, text: str, **kw: Any) -> Any:
            calls.append(len(text))
            return tokenizer(text, **kw)

        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

    monkeypatch.setattr(engine, "tokenizer", Spy())
    too_long = "word " * (engine.max_prompt_chars // 5 + 1)
    for path, body in (
        ("/v1/chat/completions", ask(too_long)),
        ("/v1/completions", {"model": BASE, "prompt": too_long, "max_tokens": 4}),
    ):
        error = post(server, body, path).json()["error"]
        assert error["code"] == "context_length_exceeded" and "characters" in error["message"]
        assert error["param"] == ("messages" if "chat" in path else "prompt")
    assert calls == []
    assert post(server, ask("hello")).status_code == 200 and calls


def test_health_answers_while_a_prompt_is_being_tokenised(
    server: BackgroundServer, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenising a long prompt once blocked the event loop: /health took seconds meanwhile."""
    entered, release = threading.Event(), threading.Event()
    real = engine.encode_text

    def held(prompt: str) -> list[int]:
        entered.set()
        release.wait(30)
        return real(prompt)

    monkeypatch.setattr(engine, "encode_text", held)
    body = {"model": BASE, "prompt": "a long prompt", "max_tokens": 2}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, server, body, "/v1/completions")
        try:
            assert entered.wait(30)
            # On the event loop, the held tokeniser would keep this from ever being answered.
            assert httpx.get(f"{server.url}/health", timeout=20).json()["status"] == "ok"
        finally:
            release.set()
        assert pending.result(timeout=60).status_code == 200


# --- shape ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/feedback"])
def test_a_deeply_nested_body_is_a_400(server: BackgroundServer, path: str) -> None:
    """30,000 levels (under the size limit) once came back as a 500 from a RecursionError."""
    deep = b'{"model": "tiny:llama", "messages": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    response = post(server, deep, path)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_nesting_past_the_depth_limit_anywhere_is_a_400_naming_it(server: BackgroundServer) -> None:
    nested: Any = {}
    for _ in range(MAX_JSON_DEPTH):
        nested = {"type": "object", "properties": {"x": nested}}
    tool = {"type": "function", "function": {"name": "f", "parameters": nested}}
    error = post(server, ask("hi", tools=[tool])).json()["error"]
    assert error["code"] == "body_too_deep" and str(MAX_JSON_DEPTH) in error["message"]
    error = post(server, ask("hi", model="up", extra=nested)).json()["error"]  # a backend's body too
    assert error["code"] == "body_too_deep"


def test_a_client_that_leaves_mid_body_is_one_quiet_log_line(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    host = server.url.removeprefix("http://")
    with caplog.at_level(logging.INFO):
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            sock.sendall(f"{head}Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n".encode())
            sock.sendall(b'{"model": "tiny:llama", "mess')
        wait_for(lambda: any("went away" in r.getMessage() for r in caplog.records))
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert post(server, ask("hello")).status_code == 200


# --- metrics -------------------------------------------------------------------------------------


def test_client_mistakes_and_departures_are_not_variant_errors(
    server: BackgroundServer, engine: Engine
) -> None:
    for _ in range(2):
        assert post(server, ask("hi", max_tokens=65)).status_code == 400  # over --max-tokens-limit
    assert metric(server, "tunelab_errors_total", variant=BASE, code="400") is None
    assert metric(server, "tunelab_client_errors_total", variant=BASE, code="400") >= 2
    engine.pause()  # nothing is generated: the client leaves while its request waits
    try:
        body = ask("hi", stream=True)
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH) as response:
            next(response.iter_lines())  # the role chunk, then leave
        wait_for(lambda: metric(server, "tunelab_client_errors_total", variant=BASE, code="499"))
    finally:
        engine.resume()
    assert metric(server, "tunelab_errors_total", variant=BASE, code="499") is None
    assert server.app.state.tunelab.router.health(BASE)["error_rate"] in (0, None)


def test_an_upstream_200_that_is_not_a_completion_is_a_502_fault(server: BackgroundServer) -> None:
    before = metric(server, "tunelab_upstream_errors_total", variant="up", reason="bad_response") or 0
    html = post(server, ask("html", model="up"))
    assert html.status_code == 502 and html.json()["error"]["code"] == "upstream_bad_response"
    assert "nginx" not in html.text
    stream = post(server, ask("hello", model="up", stream=True))  # JSON where an event stream belongs
    assert stream.status_code == 502 and stream.json()["error"]["code"] == "upstream_bad_response"
    assert metric(server, "tunelab_upstream_errors_total", variant="up", reason="bad_response") == before + 2
    assert metric(server, "tunelab_errors_total", variant="up", code="502") >= 2
    assert server.app.state.tunelab.router.health("up")["error_rate"] > 0  # what the watcher reads
    assert post(server, ask("hello", model="up")).json()["choices"][0]["message"]["content"] == "echo hello"


def test_an_upstream_5xx_body_is_logged_and_the_client_gets_a_reference(
    server: BackgroundServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="tunelab.serve"):
        crashed = post(server, ask("crash", model="up"))
    assert crashed.status_code == 500 and crashed.headers["content-type"] == "application/json"
    error = crashed.json()["error"]
    assert (
        error["code"] == "upstream_error" and "/srv" not in crashed.text and "Traceback" not in crashed.text
    )
    ref = error["message"].removeprefix("upstream error, see log ref ")
    (record,) = [r for r in caplog.records if ref in r.getMessage()]
    assert SECRET in record.getMessage()


# --- documentation pages -------------------------------------------------------------------------


def test_no_cdn_docs_and_the_schema_needs_the_key(server: BackgroundServer) -> None:
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert httpx.get(f"{server.url}{path}", headers=AUTH).status_code == 404
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401
    schema = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()
    assert "/v1/chat/completions" in schema["paths"] and "/openapi.json" not in schema["paths"]
