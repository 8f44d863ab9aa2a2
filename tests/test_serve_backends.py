"""`tunelab serve --backend`: tunelab's router in front of OpenAI-compatible upstreams.

The done-when test runs two real llama.cpp servers (llama-cpp-python's `llama_cpp.server`) on
loopback, each loading a different tiny GGUF, behind one alias of a backends-only tunelab serve;
the official openai client talks to the router. A small FastAPI upstream that fails on demand
covers 5xx, timeouts and recovery deterministically; the config file, the status command and the
SSE reader are tested without any server.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from llamacpp_gate import usable_llama_cpp
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.backends import Backends, parse_backend
from tunelab.serve.proxy import SSETap
from tunelab.serve.routing import Router, WatchPolicy, bucket, pick
from tunelab.serve.server import BackgroundServer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ASK = [{"role": "user", "content": "Say hi"}]
GREEDY = {"temperature": 0, "max_tokens": 8}
SHARES = {"stock": 0.5, "tuned": 0.5}
USERS = [f"user-{i}" for i in range(16)]
# Only up/down moves traffic in these tests: the error-rate and latency rollbacks need more samples.
POLICY = WatchPolicy(min_samples=1000, max_latency_ratio=1e6)
WATCH_S = 0.25


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServer:
    """llama.cpp's OpenAI server (llama-cpp-python) in a subprocess on a loopback port."""

    def __init__(self, model: Path, port: int | None = None) -> None:
        self.model, self.port = model, port or free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LlamaServer:
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model),
            "--host",
            "127.0.0.1",
        ]
        command += ["--port", str(self.port), "--n_ctx", "256", "--n_threads", "1", "--verbose", "False"]
        # By default llama-cpp-python's server ends a running stream early (with [DONE]) as soon as any
        # other request arrives, the router's health probes included; a server behind a router must not.
        command += ["--interrupt_requests", "False"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).is_success:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError(f"llama.cpp server on {self.url} did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def metric(server: BackgroundServer, name: str, **labels: str) -> float | None:
    text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def wait_for(condition, timeout_s: float = 10.0) -> float:
    """Seconds until ``condition()`` held; fails the test past ``timeout_s``."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not met in time"
        time.sleep(0.05)
    return time.monotonic() - started


def variant_of(user: str) -> str:
    return pick(SHARES, bucket(user, "bot"))


# --- two real llama.cpp servers behind one alias ----------------------------------------------


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two different tiny Llama GGUFs (seeds 0 and 1), written by tunelab's llama GGUF writer."""
    usable_llama_cpp()
    pytest.importorskip("sse_starlette")  # llama-cpp-python's [server] extra
    from tunelab.models.gguf_write import write_llama_gguf
    from tunelab.models.tiny import build_tiny_llama, build_tiny_tokenizer

    root = tmp_path_factory.mktemp("gguf")
    made = {}
    for seed, name in enumerate(("stock", "tuned")):
        tokenizer = build_tiny_tokenizer()
        model = build_tiny_llama(tokenizer, seed=seed)
        made[name] = write_llama_gguf(model, tokenizer, root / f"{name}.gguf", dtype="f16", name=name)
    return made


@pytest.fixture(scope="module")
def upstreams(ggufs: dict[str, Path]) -> Iterator[dict[str, LlamaServer]]:
    servers = {name: LlamaServer(path) for name, path in ggufs.items()}
    try:
        for server in servers.values():
            server.start()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="module")
def direct(upstreams: dict[str, LlamaServer]) -> dict[str, str]:
    """Each upstream's own greedy answer to ASK, asked directly."""
    answers = {}
    for name, server in upstreams.items():
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        answers[name] = (
            client.chat.completions.create(model="x", messages=ASK, **GREEDY).choices[0].message.content
        )
    assert answers["stock"] != answers["tuned"]  # otherwise the routing checks below prove nothing
    return answers


@pytest.fixture(scope="module")
def router_server(
    upstreams: dict[str, LlamaServer], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BackgroundServer]:
    """Backends only: no local model. `stock` learns its model name from /v1/models; `tuned` is given one."""
    specs = [
        parse_backend(f"stock={upstreams['stock'].url}"),
        parse_backend(f"tuned=tiny-tuned@{upstreams['tuned'].url}/v1/"),
    ]
    backends = Backends(specs, timeout_s=30, max_failures=3)
    router = Router(None, [], POLICY, backends=backends.names)
    router.set_alias("bot", dict(SHARES))
    log_dir = tmp_path_factory.mktemp("log")
    settings = ServeSettings(api_key=KEY, watch_interval_s=WATCH_S, log_dir=log_dir)
    with BackgroundServer(create_app(None, router, settings, backends)) as server:
        yield server


@pytest.fixture
def client(router_server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router_server.url}/v1", api_key=KEY, max_retries=0)


def ask(client: openai.OpenAI, user: str, model: str = "bot") -> tuple[str, str, str]:
    """(content, variant header, response id) of one greedy chat through the router."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=ASK, user=user, **GREEDY)
    reply = raw.parse()
    return reply.choices[0].message.content, raw.headers["x-tunelab-adapter"], reply.id


def test_models_list_the_backends_and_the_alias(
    client: openai.OpenAI, router_server: BackgroundServer
) -> None:
    cards = httpx.get(f"{router_server.url}/v1/models", headers=AUTH).json()["data"]
    assert {c["id"]: c["kind"] for c in cards} == {"stock": "backend", "tuned": "backend", "bot": "alias"}
    states = router_server.app.state.tunelab.backends.states
    assert states["stock"].upstream_model.endswith("stock.gguf")  # discovered from its /v1/models
    assert states["tuned"].upstream_model == "tiny-tuned"  # given as MODEL@URL
    # llama-cpp-python has no /health: after one 404 the probes ask /v1/models only (half the noise).
    wait_for(lambda: not states["stock"].has_health and not states["tuned"].has_health)


def test_the_split_is_sticky_by_user_and_each_answer_is_its_upstreams(
    client: openai.OpenAI, direct: dict[str, str]
) -> None:
    seen = {}
    for user in USERS:
        content, variant, _ = ask(client, user)
        assert variant == variant_of(user)
        assert content == direct[variant]  # the request reached that user's upstream and came back whole
        assert ask(client, user)[:2] == (content, variant)  # sticky
        seen[user] = variant
    assert set(seen.values()) == {"stock", "tuned"}
    raw = client.chat.completions.with_raw_response.create(model="bot", messages=ASK, user=USERS[0], **GREEDY)
    assert raw.headers["x-tunelab-alias"] == "bot"


def test_streaming_through_the_router_equals_the_plain_answer(
    client: openai.OpenAI, direct: dict[str, str]
) -> None:
    for variant in ("stock", "tuned"):
        user = next(u for u in USERS if variant_of(u) == variant)
        raw = client.chat.completions.with_raw_response.create(
            model="bot", messages=ASK, user=user, stream=True, **GREEDY
        )
        assert raw.headers["x-tunelab-adapter"] == variant
        assert raw.headers["content-type"].startswith("text/event-stream")
        chunks = list(raw.parse())
        assert len(chunks) > 2, chunks  # relayed as chunks, not one buffered body
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct[variant]


def test_feedback_for_backend_answers_is_tracked_and_logged(
    client: openai.OpenAI, router_server: BackgroundServer, direct: dict[str, str]
) -> None:
    """Scores by response id reach the variant that answered; the log turns into a DPO pair."""
    from tunelab.data.feedback import from_feedback

    stock_user = next(u for u in USERS if variant_of(u) == "stock")
    tuned_user = next(u for u in USERS if variant_of(u) == "tuned")
    _, _, stock_id = ask(client, stock_user)
    stream = client.chat.completions.create(model="bot", messages=ASK, user=tuned_user, stream=True, **GREEDY)
    tuned_id = next(iter(stream)).id
    list(stream)
    for response_id, score, variant in ((stock_id, -1.0, "stock"), (tuned_id, 1.0, "tuned")):
        answer = httpx.post(
            f"{router_server.url}/v1/feedback",
            json={"id": response_id, "score": score, "user": "rater"},
            headers=AUTH,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["adapter"] == variant and answer.json()["alias"] == "bot"
        assert answer.json()["health"]["feedback_n"] >= 1
    log_dir = router_server.app.state.tunelab.settings.log_dir
    requests = {r["id"]: r for r in map(json.loads, (log_dir / "requests.jsonl").read_text().splitlines())}
    assert requests[tuned_id]["response"] == direct["tuned"]  # the streamed text, assembled
    assert requests[stock_id]["variant"] == "stock" and requests[stock_id]["messages"] == ASK
    assert requests[stock_id]["sampling"] == {"temperature": 0, "max_tokens": 8}
    feedback = [json.loads(line) for line in (log_dir / "feedback.jsonl").read_text().splitlines()]
    assert {(f["id"], f["variant"], f["score"]) for f in feedback} >= {
        (stock_id, "stock", -1.0),
        (tuned_id, "tuned", 1.0),
    }
    out = log_dir.parent / "pairs.jsonl"
    summary = from_feedback(log_dir, out)
    row = json.loads(out.read_text().splitlines()[0])
    assert summary["rows"] >= 1 and row["chosen"][0]["content"] == direct["tuned"]
    assert row["rejected"][0]["content"] == direct["stock"]


def test_sdk_streams_are_complete_logged_and_take_feedback_every_time(
    client: openai.OpenAI, router_server: BackgroundServer, direct: dict[str, str]
) -> None:
    """The openai SDK closes the connection right after [DONE]: every such stream is a complete
    answer (logged, feedback-able, not a 499), and its chunks name the variant, not the GGUF path."""
    ids = []
    for user in USERS[:12]:
        chunks = list(
            client.chat.completions.create(model="bot", messages=ASK, user=user, stream=True, **GREEDY)
        )
        assert {c.model for c in chunks} == {variant_of(user)}
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct[variant_of(user)]
        )
        scored = httpx.post(
            f"{router_server.url}/v1/feedback", json={"id": chunks[0].id, "score": 0.5}, headers=AUTH
        )
        assert scored.status_code == 200, scored.text  # at once: no race with the end of the stream
        ids.append(chunks[0].id)
    log_dir = router_server.app.state.tunelab.settings.log_dir
    logged = {json.loads(line)["id"] for line in (log_dir / "requests.jsonl").read_text().splitlines()}
    assert set(ids) <= logged
    for variant in ("stock", "tuned"):
        assert metric(router_server, "tunelab_client_errors_total", variant=variant, code="499") is None
        assert metric(router_server, "tunelab_time_to_first_token_seconds_count", variant=variant) >= 1
        assert metric(router_server, "tunelab_inter_token_latency_seconds_count", variant=variant) >= 1
    assert client.chat.completions.create(model="bot", messages=ASK, user=USERS[0], **GREEDY).model in SHARES


HOSTILE = [  # each is a 500 (or worse) from llama-cpp-python 0.3.36 when it reaches it
    {"temperature": "hot"},
    {"top_p": -1},
    {"stop": 5},
    {"top_k": "x"},
    {"top_k": -1},
    {"logprobs": "x"},
    {"logit_bias": {"abc": 1}},
    {"min_p": 5},
    {"presence_penalty": 1e308},
    {"repeat_penalty": -5},
    {"response_format": {"type": "bogus"}},
    {"user": 5},
    {"mirostat_mode": 7},
    {"logit_bias_type": "weird"},
    {"grammar": "root ::= ("},  # kills the llama.cpp server process
    {"functions": [{"name": "x"}]},
    {"tools": [{"type": "function", "function": {"name": "x", "parameters": 5}}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"messages": [{"role": "bot", "content": "x"}]},
    {"messages": [{"role": "tool", "content": "x"}]},
    {"messages": [{"role": "assistant", "content": None}]},
    # and what it answers 200 with unbounded output, or ignores
    {"max_tokens": -1},
    {"max_tokens": 10**12},
    {"messages": None},
    {"n": 0},
    {"stop": ["a", "b", "c", "d", "e"]},
]


def test_no_client_can_roll_back_a_healthy_backend_and_an_admin_can_undo_a_rollback(
    upstreams: dict[str, LlamaServer],
) -> None:
    """Requests that a real llama.cpp server answers with a 500 are refused by the router itself (400)
    and never reach it, so however many a client sends, the candidate keeps its traffic."""
    backends = Backends(
        [parse_backend(f"{n}={upstreams[n].url}") for n in ("stock", "tuned")], timeout_s=30, max_failures=3
    )
    router = Router(None, [], WatchPolicy(min_samples=2, max_latency_ratio=1e6), backends=backends.names)
    router.set_alias("bot", dict(SHARES))
    settings = ServeSettings(api_key=KEY, watch_interval_s=WATCH_S, max_tokens_limit=64)
    tuned_user = next(u for u in USERS if variant_of(u) == "tuned")
    stock_user = next(u for u in USERS if variant_of(u) == "stock")
    post = lambda body: httpx.post(  # noqa: E731
        f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30
    )
    with BackgroundServer(create_app(None, router, settings, backends)) as server:
        for user in (stock_user, tuned_user, stock_user, tuned_user):
            ok = post({"model": "bot", "user": user, "messages": ASK, **GREEDY})
            assert ok.status_code == 200, ok.text
        for extra in HOSTILE * 2:
            refused = post({"model": "bot", "user": tuned_user, "messages": ASK, "max_tokens": 4, **extra})
            assert refused.status_code == 400, (extra, refused.text)
        assert router.describe()["bot"]["shares"] == SHARES
        assert router.is_up("tuned") and backends.states["tuned"].failures == 0
        assert metric(server, "tunelab_upstream_errors_total", variant="tuned") is None
        assert metric(server, "tunelab_rollbacks_total", variant="tuned") is None
        counted = [metric(server, "tunelab_client_errors_total", variant=v, code="400") or 0 for v in SHARES]
        assert sum(counted) == 2 * len(HOSTILE)  # `"user": 5` is no user: those two went anywhere
        assert (
            post({"model": "bot", "user": tuned_user, "messages": ASK, **GREEDY}).headers["x-tunelab-adapter"]
            == "tuned"
        )
        restore = f"{server.url}/admin/aliases/bot/restore"
        assert httpx.post(restore, headers=AUTH).status_code == 409  # nothing was rolled back
        for _ in range(2):  # the variant's own faults do roll it back ...
            router.observe("tuned", False, 0.1, alias="bot")
        assert router.describe()["bot"]["shares"] == {"stock": 1.0, "tuned": 0.0}
        assert httpx.post(restore).status_code == 401  # ... and undoing that takes the key
        undone = httpx.post(restore, headers=AUTH)
        assert undone.status_code == 200 and undone.json()["shares"] == SHARES
        assert (
            post({"model": "bot", "user": tuned_user, "messages": ASK, **GREEDY}).headers["x-tunelab-adapter"]
            == "tuned"
        )


def test_a_clients_bad_request_is_passed_through_and_never_counted(
    client: openai.OpenAI, router_server: BackgroundServer
) -> None:
    """A prompt past llama.cpp's context is llama.cpp's 400: relayed as is, not a fault of the variant."""
    state = router_server.app.state.tunelab
    user = next(u for u in USERS if variant_of(u) == "tuned")
    before = state.router.health("tuned")
    too_long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="bot", messages=too_long, user=user, max_tokens=4)
    assert caught.value.response.headers["x-tunelab-adapter"] == "tuned"
    assert "context" in caught.value.message  # llama.cpp's own message, passed through
    after = state.router.health("tuned")
    assert after["requests"] == before["requests"] and after["error_rate"] in (0, None)
    assert state.backends.states["tuned"].failures == 0
    assert metric(router_server, "tunelab_upstream_errors_total", variant="tuned") is None
    assert metric(router_server, "tunelab_errors_total", variant="tuned", code="400") is None
    assert metric(router_server, "tunelab_client_errors_total", variant="tuned", code="400") == 1


def test_status_prints_the_split_and_every_variant(router_server: BackgroundServer) -> None:
    from tunelab.cli import app

    result = CliRunner().invoke(app, ["serve", "status", "--url", router_server.url, "--api-key", KEY])
    assert result.exit_code == 0, result.output
    assert "stock 50%, tuned 50%" in result.output
    rows = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") > 4}
    assert "backend" in rows["stock"] and "up" in rows["tuned"]


def test_a_dead_upstream_loses_its_users_to_the_baseline_until_it_is_back(
    client: openai.OpenAI,
    router_server: BackgroundServer,
    upstreams: dict[str, LlamaServer],
    direct: dict[str, str],
) -> None:
    tuned_users = [u for u in USERS if variant_of(u) == "tuned"]
    health = lambda: httpx.get(f"{router_server.url}/health").json()["variants"]  # noqa: E731
    upstreams["tuned"].stop()
    seconds = wait_for(lambda: not health()["tuned"]["up"])
    assert seconds < 3 * WATCH_S + 5  # three failed probes, each a refused connection
    for user in tuned_users:
        assert ask(client, user)[:2] == (direct["stock"], "stock")
    assert metric(router_server, "tunelab_variant_up", variant="tuned") == 0
    assert metric(router_server, "tunelab_variant_up", variant="stock") == 1
    assert metric(router_server, "tunelab_upstream_errors_total", variant="tuned", reason="connect") >= 3
    assert httpx.get(f"{router_server.url}/ready").status_code == 200  # the baseline still answers

    upstreams["tuned"].start()  # same port: a probe brings it back
    wait_for(lambda: health()["tuned"]["up"], timeout_s=15)
    assert ask(client, tuned_users[0])[:2] == (direct["tuned"], "tuned")
    assert metric(router_server, "tunelab_variant_up", variant="tuned") == 1

    upstreams["stock"].stop()  # the baseline itself: nothing left to fall back to
    wait_for(lambda: not health()["stock"]["up"])
    assert httpx.get(f"{router_server.url}/ready").status_code == 503
    stock_user = next(u for u in USERS if variant_of(u) == "stock")
    with pytest.raises(openai.InternalServerError) as caught:
        ask(client, stock_user)
    assert caught.value.status_code == 503 and "'stock'" in caught.value.message
    assert ask(client, tuned_users[0])[1] == "tuned"  # the candidate's own users still get it
    assert metric(router_server, "tunelab_errors_total", variant="stock", alias="bot", code="503") >= 1
    from tunelab.cli import app

    status = CliRunner().invoke(app, ["serve", "status", "--url", router_server.url, "--api-key", KEY])
    assert status.exit_code == 1
    assert "error: not ready: 'stock' (baseline of alias 'bot') is down" in status.output


# --- a fake upstream that fails on demand ------------------------------------------------------


def fake_upstream(received: list[dict]) -> object:
    """An OpenAI-shaped upstream: echoes the body it got; 'fail' → 500, 'slow' → late, 'bad' → 400."""
    app = FastAPI()
    app.state.healthy = True

    @app.get("/health")
    def health() -> JSONResponse:
        return JSONResponse({}, status_code=200 if app.state.healthy else 503)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> JSONResponse:
        body = await request.json()
        received.append(body)
        said = body["messages"][0]["content"]
        if said in ("fail", "bad"):
            code = 500 if said == "fail" else 400
            return JSONResponse({"error": {"message": f"upstream says {said}"}}, status_code=code)
        if said == "slow":
            await asyncio.sleep(2)
        if body.get("stream"):
            return StreamingResponse(_lingering_stream(f"echo {said}"), media_type="text/event-stream")
        message = {"role": "assistant", "content": f"echo {said}"}
        answer = {"id": "fake-1", "object": "chat.completion", "model": "/srv/models/fake.gguf"}
        return JSONResponse({**answer, "choices": [{"message": message}]})

    return app


async def _lingering_stream(text: str) -> AsyncIterator[str]:
    """An answer streamed word by word, then [DONE], then the connection held open a while (as a
    busy server may), so only [DONE] can tell the router the answer is complete."""
    for i, word in enumerate(text.split(" ")):
        delta = {"content": word if i == 0 else f" {word}"}
        yield f"data: {json.dumps({'id': f'fake-{text}', 'model': 'fake', 'choices': [{'delta': delta}]})}\n\n"
    yield f"data: {json.dumps({'id': f'fake-{text}', 'choices': [{'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
    yield "data: [DONE]\n\n"
    await asyncio.sleep(1.5)


@pytest.fixture(scope="module")
def fake(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[BackgroundServer, BackgroundServer, list[dict]]]:
    """(upstream, router) with one backend `up` served directly and in alias `mix` with the local tiny base."""
    from tunelab.serve.engine import Engine

    received: list[dict] = []
    with BackgroundServer(fake_upstream(received)) as upstream:
        engine = Engine.load("tiny:llama", {}, device="cpu", max_tokens_limit=16)
        backends = Backends([parse_backend(f"up={upstream.url}")], timeout_s=0.5, max_failures=3)
        router = Router(engine.base_name, [], POLICY, backends=backends.names)
        router.set_alias("mix", {"tiny:llama": 0.5, "up": 0.5})
        log_dir = tmp_path_factory.mktemp("fake-log")
        settings = ServeSettings(api_key=KEY, watch_interval_s=WATCH_S, log_dir=log_dir)
        app = create_app(engine, router, settings, backends)
        with BackgroundServer(app) as server:
            yield upstream, server, received


def say(server: BackgroundServer, text: str, **extra: object) -> httpx.Response:
    body = {"model": "up", "messages": [{"role": "user", "content": text}], **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=10)


def test_only_model_is_rewritten_and_typed_pass_through_parameters_reach_the_upstream(fake) -> None:
    _, server, received = fake
    reply = say(server, "hello", logprobs=True, top_k=3, user="ann")
    assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "echo hello"
    assert reply.headers["x-tunelab-adapter"] == "up"
    assert received[-1] == {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hello"}],
        "logprobs": True,
        "top_k": 3,
        "user": "ann",
        "max_tokens": 256,
    }  # fmt: skip  (no max_tokens asked: the built-in engine's default under --max-tokens-limit)
    assert reply.json()["model"] == "up"  # the variant's name, not the upstream's


def test_the_router_refuses_what_the_engine_refuses_before_the_backend_sees_it(fake) -> None:
    _, server, received = fake
    before = len(received)
    for extra, param in (
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 1025}, "max_tokens"),  # over --max-tokens-limit (1024 here)
        ({"max_completion_tokens": 5000}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"temperature": "hot"}, "temperature"),
        ({"grammar": "root ::= ("}, "grammar"),
        ({"n": 2}, "n"),
    ):
        refused = say(server, "hello", **extra)
        assert refused.status_code == 400, (extra, refused.text)
        assert refused.json()["error"]["param"] == param, refused.json()
    body = {"model": "up", "max_tokens": 3}
    missing = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH)
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "messages"
    batched = httpx.post(f"{server.url}/v1/completions", json={**body, "prompt": ["a", "b"]}, headers=AUTH)
    assert batched.status_code == 400 and batched.json()["error"]["param"] == "prompt"
    assert len(received) == before  # none of them reached the backend
    assert say(server, "hello", max_tokens=7).status_code == 200 and received[-1]["max_tokens"] == 7


def test_an_alias_mixes_the_local_base_and_a_backend(fake) -> None:
    _, server, _ = fake
    served = set()
    for i in range(12):
        body = {
            "model": "mix",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 2,
            "user": f"u{i}",
        }
        reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
        assert reply.status_code == 200, reply.text
        served.add(reply.headers["x-tunelab-adapter"])
    assert served == {"tiny:llama", "up"}
    kinds = {c["id"]: c["kind"] for c in httpx.get(f"{server.url}/v1/models", headers=AUTH).json()["data"]}
    assert kinds == {"tiny:llama": "base", "up": "backend", "mix": "alias"}


def test_built_in_answers_are_logged_and_the_base_takes_feedback(fake) -> None:
    """The request log holds built-in answers too (streamed: the assembled text); base is a variant."""
    _, server, _ = fake
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    plain = client.chat.completions.create(model="tiny:llama", messages=ASK, user="bo", **GREEDY)
    stream = list(client.chat.completions.create(model="tiny:llama", messages=ASK, stream=True, **GREEDY))
    text = client.completions.create(model="tiny:llama", prompt="Once", max_tokens=3, temperature=0, seed=1)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == plain.choices[0].message.content
    scored = httpx.post(f"{server.url}/v1/feedback", json={"id": plain.id, "score": 0.5}, headers=AUTH)
    assert scored.status_code == 200 and scored.json()["adapter"] == "tiny:llama"
    log_dir = server.app.state.tunelab.settings.log_dir
    logged = {r["id"]: r for r in map(json.loads, (log_dir / "requests.jsonl").read_text().splitlines())}
    assert logged[plain.id]["user"] == "bo" and logged[plain.id]["messages"] == ASK
    assert logged[plain.id]["response"] == plain.choices[0].message.content
    assert logged[stream[0].id]["response"] == streamed and logged[stream[0].id]["variant"] == "tiny:llama"
    assert logged[text.id]["prompt"] == "Once" and logged[text.id]["sampling"]["seed"] == 1
    (feedback,) = [json.loads(line) for line in (log_dir / "feedback.jsonl").read_text().splitlines()]
    assert (feedback["id"], feedback["variant"], feedback["score"], feedback["alias"]) == (
        plain.id,
        "tiny:llama",
        0.5,
        None,
    )


def test_sdk_streams_through_the_router_are_complete_at_done(fake) -> None:
    """The upstream holds its connection open after [DONE]; the SDK closes it right after [DONE] and
    posts feedback at once: every answer is already logged and scored, none is a 499."""
    _, server, _ = fake
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    for i in range(6):
        chunks = list(
            client.chat.completions.create(
                model="up", messages=[{"role": "user", "content": f"n{i}"}], stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == f"echo n{i}"
        scored = httpx.post(
            f"{server.url}/v1/feedback", json={"id": chunks[0].id, "score": 1.0}, headers=AUTH
        )
        assert scored.status_code == 200, scored.text
    log_dir = server.app.state.tunelab.settings.log_dir
    logged = {json.loads(line)["id"] for line in (log_dir / "requests.jsonl").read_text().splitlines()}
    assert {f"fake-echo n{i}" for i in range(6)} <= logged
    time.sleep(2)  # past the upstream's linger: nothing is counted late as a departure either
    assert metric(server, "tunelab_client_errors_total", variant="up", code="499") is None
    assert metric(server, "tunelab_requests_total", variant="up", alias="") >= 6


def test_sdk_streams_of_the_built_in_engine_are_complete_and_take_feedback(fake) -> None:
    _, server, _ = fake
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    ids = []
    for i in range(8):
        stream = client.chat.completions.create(
            model="tiny:llama", messages=ASK, user=f"s{i}", stream=True, temperature=0, max_tokens=4
        )
        response_id = list(stream)[0].id
        scored = httpx.post(f"{server.url}/v1/feedback", json={"id": response_id, "score": 1.0}, headers=AUTH)
        assert scored.status_code == 200, scored.text
        ids.append(response_id)
    log_dir = server.app.state.tunelab.settings.log_dir
    assert set(ids) <= {
        json.loads(line)["id"] for line in (log_dir / "requests.jsonl").read_text().splitlines()
    }
    assert metric(server, "tunelab_client_errors_total", variant="tiny:llama", code="499") is None
    assert metric(server, "tunelab_time_to_first_token_seconds_count", variant="tiny:llama") >= 8
    assert metric(server, "tunelab_inter_token_latency_seconds_count", variant="tiny:llama") >= 8


def cut_upstream(port: int) -> socket.socket:
    """An upstream that lists a model, then answers a completion with one SSE event and hangs up."""
    import threading

    listener = socket.create_server(("127.0.0.1", port))

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = conn.recv(65536)
                if b"/v1/models" in request.split(b"\r\n", 1)[0]:
                    body = b'{"data": [{"id": "m"}]}'
                    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                    conn.sendall(head.encode() + body)
                    continue
                event = b'data: {"id": "x", "choices": [{"delta": {"content": "hi"}}]}\n\n'
                head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                conn.sendall(head + f"{len(event):x}\r\n".encode() + event + b"\r\n")

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_a_connection_dropped_mid_stream_is_a_disconnect_not_a_connect_fault() -> None:
    port = free_port()
    listener = cut_upstream(port)
    backends = Backends([parse_backend(f"cut=http://127.0.0.1:{port}")], max_failures=3)
    router = Router(None, [], POLICY, backends=backends.names)
    settings = ServeSettings(api_key=KEY, watch_interval_s=60)
    try:
        with BackgroundServer(create_app(None, router, settings, backends)) as server:
            body = {"model": "cut", "messages": ASK, "stream": True}
            reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=10)
            assert reply.status_code == 200 and "upstream_unavailable" in reply.text
            assert metric(server, "tunelab_upstream_errors_total", variant="cut", reason="disconnect") == 1
            assert metric(server, "tunelab_upstream_errors_total", variant="cut", reason="connect") is None
            assert metric(server, "tunelab_errors_total", variant="cut", code="502") == 1
    finally:
        listener.close()


def test_a_rollback_is_reported_with_its_reason() -> None:
    router = Router(None, [], WatchPolicy(min_samples=2), backends=["stock", "tuned"])
    seen = []
    router.on_rollback = lambda *event: seen.append(event)
    router.set_alias("bot", {"stock": 0.5, "tuned": 0.5})
    for _ in range(2):
        router.observe("stock", True, 0.1, alias="bot")
        router.observe("tuned", False, 0.1, alias="bot")
    assert seen == [("bot", "tuned", "error_rate")]
    assert router.describe()["bot"]["shares"] == {"stock": 1.0, "tuned": 0.0}


def test_5xx_and_timeouts_count_mark_the_backend_down_and_a_probe_brings_it_back(fake) -> None:
    upstream, server, _ = fake
    bad = say(server, "bad")
    assert bad.status_code == 400 and bad.json() == {"error": {"message": "upstream says bad"}}  # as sent
    assert server.app.state.tunelab.backends.states["up"].failures == 0
    upstream.app.state.healthy = False  # probes fail too (503), so only a healthy probe brings it back
    failed = say(server, "fail")
    assert failed.status_code == 500 and failed.json()["error"]["code"] == "upstream_error"
    slow = say(server, "slow")
    assert slow.status_code == 504 and slow.json()["error"]["code"] == "upstream_timeout"
    wait_for(lambda: say(server, "hello").status_code == 503, timeout_s=5)  # the third fault: down
    requests_before = metric(server, "tunelab_requests_total", variant="up", alias="")
    down = say(server, "hello").json()["error"]
    assert down["code"] == "variant_down" and "'up'" in down["message"]
    assert metric(server, "tunelab_requests_total", variant="up", alias="") == requests_before + 1
    assert metric(server, "tunelab_errors_total", variant="up", alias="", code="503") >= 1
    assert metric(server, "tunelab_upstream_errors_total", variant="up", reason="http_5xx") >= 1
    assert metric(server, "tunelab_upstream_errors_total", variant="up", reason="timeout") == 1
    assert metric(server, "tunelab_variant_up", variant="up") == 0
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200  # the alias's baseline is the local base, which is up
    upstream.app.state.healthy = True
    wait_for(lambda: say(server, "hello").status_code == 200, timeout_s=5)
    assert metric(server, "tunelab_variant_up", variant="up") == 1


def test_a_refused_connection_is_answered_by_the_baseline(fake) -> None:
    """The request never reached the dead backend, so its alias's baseline answers it at once; the
    fault still counts, and after K of them the dead backend gets no more tries."""
    upstream, _, _ = fake
    backends = Backends(
        [parse_backend(f"up={upstream.url}"), parse_backend(f"gone=http://127.0.0.1:{free_port()}")],
        max_failures=3,
    )
    router = Router(None, [], POLICY, backends=backends.names)
    shares = {"up": 0.5, "gone": 0.5}
    router.set_alias("ab", dict(shares))
    users = [u for u in (f"user-{i}" for i in range(40)) if pick(shares, bucket(u, "ab")) == "gone"][:4]
    settings = ServeSettings(api_key=KEY, watch_interval_s=60)  # no probes: requests alone find the fault
    with BackgroundServer(create_app(None, router, settings, backends)) as server:
        for user in users:
            body = {"model": "ab", "user": user, "messages": [{"role": "user", "content": "hi"}]}
            reply = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=AUTH, timeout=10)
            assert reply.status_code == 200 and reply.headers["x-tunelab-adapter"] == "up"
            assert reply.json()["choices"][0]["message"]["content"] == "echo hi"
        assert metric(server, "tunelab_upstream_errors_total", variant="gone", reason="connect") == 3
        assert metric(server, "tunelab_variant_up", variant="gone") == 0 and not router.is_up("gone")
        # The clients got 200s from `up`: that is what the request metrics say, once per request.
        assert metric(server, "tunelab_requests_total", variant="up", alias="ab") == len(users)
        assert metric(server, "tunelab_requests_total", variant="gone", alias="ab") is None
        assert metric(server, "tunelab_errors_total", variant="gone") is None
        server.app.state.tunelab.upstream_ok("gone")  # as a good probe would; direct: no baseline to go to
        lost = httpx.post(
            f"{server.url}/v1/chat/completions", json={"model": "gone", "messages": ASK}, headers=AUTH
        )
        assert lost.status_code == 502 and lost.json()["error"]["code"] == "upstream_unavailable"
        assert "'gone'" in lost.json()["error"]["message"]


# --- no server needed --------------------------------------------------------------------------


def test_alias_shares_follow_the_last_colon() -> None:
    from tunelab.serve.routing import parse_alias

    assert parse_alias("bot=tiny:llama:0.25,up:0.75,solo") == (
        "bot",
        {"tiny:llama": 0.25, "up": 0.75, "solo": 1.0},
    )
    with pytest.raises(ValueError, match="share 'x' of 'a' is not a number"):
        parse_alias("bot=a:x")


def test_backend_specs_and_their_urls() -> None:
    assert parse_backend("a=http://h:1").url == "http://h:1/v1"
    assert parse_backend("a=http://h:1/v1/").url == "http://h:1/v1"
    spec = parse_backend("a=meta-llama/Llama-3@8B@https://h/x/v1")
    assert (spec.model, spec.url, spec.root) == ("meta-llama/Llama-3@8B", "https://h/x/v1", "https://h/x")
    for bad in ("a", "=http://h", "a=h:1", "a=@http://h", "a=ftp://h"):
        with pytest.raises(ValueError, match="--backend"):
            parse_backend(bad)


def test_the_sse_tap_reads_any_chunking_and_line_ending() -> None:
    events = [
        {"id": "c1", "choices": [{"delta": {"role": "assistant"}}]},
        {"id": "c1", "choices": [{"delta": {"content": "héllo "}}]},
        {"id": "c1", "choices": [{"delta": {"content": "wörld"}, "finish_reason": "stop"}]},
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}},
    ]
    for newline in (b"\n", b"\r\n"):
        raw = b"".join(b"data: " + json.dumps(e, ensure_ascii=False).encode() + newline * 2 for e in events)
        raw += b": ping" + newline * 2 + b"data: [DONE]" + newline * 2
        tap = SSETap()
        for i in range(0, len(raw), 3):  # cuts through lines and UTF-8 characters
            tap.feed(raw[i : i + 3])
        answer = tap.finish()
        assert (answer.id, answer.text, answer.finish_reason, answer.tokens) == (
            "c1",
            "héllo wörld",
            "stop",
            (3, 2),
        )


def _serve_cli(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> tuple[object, list]:
    from tunelab.cli import app

    started: list = []
    monkeypatch.setattr("tunelab.serve.server.serve", started.append)
    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    return CliRunner().invoke(app, ["serve", *args]), started


def test_a_config_file_sets_what_the_command_line_leaves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(
        "backends:\n  stock: http://127.0.0.1:9001\n  tuned: {url: 'http://127.0.0.1:9002/v1', model: lora-a}\n"
        "aliases:\n  bot: {stock: 0.9, tuned: 0.1}\nrollouts:\n  bot: [0.1, 0.5, 1.0]\n"
        "policy: {min_samples: 7}\nport: 9100\nmax_batch: 4\nwatch_interval: 1.5\nlog_dir: logs\n"
        "max_body_mb: 0.5\n"
    )
    result, started = _serve_cli(
        monkeypatch, ["--config", str(config), "--port", "9200", "--backend", "x=http://h:1"]
    )
    assert result.exit_code == 0, result.output
    (serve_config,) = started
    assert serve_config.port == 9200  # the command line wins
    assert serve_config.base is None and serve_config.max_batch == 4 and serve_config.watch_interval_s == 1.5
    assert sorted(serve_config.backends) == ["stock", "tuned", "x"]
    assert serve_config.backends["tuned"].model == "lora-a" and serve_config.backends["stock"].url.endswith(
        ":9001/v1"
    )
    assert (
        serve_config.aliases == {"bot": {"stock": 0.9, "tuned": 0.1}}
        and serve_config.rollouts["bot"][0] == 0.1
    )
    assert serve_config.policy.min_samples == 7 and serve_config.log_dir == Path("logs")
    from tunelab.serve.server import build_app

    app = build_app(dataclasses.replace(serve_config, log_dir=None))  # None: no log file opened here
    assert app.state.tunelab.settings.max_body_bytes == 512 * 1024


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("backends:\n  a: {url: nope}\n", "serve.yaml: backends.a.url: 'nope' is not an http(s) URL"),
        ("backends:\n  a: {url: 'http://h', key: 1}\n", "serve.yaml: backends.a.key: not a backend field"),
        ("polcy: {}\n", "serve.yaml: 'polcy' is not a serve setting"),
        ("port: eighty\n", "serve.yaml: port: 'eighty' is not a whole number"),
        ("max_body_mb: lots\n", "serve.yaml: max_body_mb: 'lots' is not a number"),
        ("policy: {min_samples: 0}\n", "--min-samples 0: give a whole number of at least 1"),
        ("aliases:\n  bot: [a, b]\n", "serve.yaml: aliases.bot: give the variants' shares as a mapping"),
        ("backends: [\n", "serve.yaml: line 2:"),
        (
            "backends:\n  a: {url: 'http://h', api_key_env: TUNELAB_TEST_UNSET}\n",
            "a.api_key_env: $TUNELAB_TEST_UNSET is not set",
        ),
    ],
)
def test_a_bad_config_is_one_line_naming_file_and_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text(text)
    result, started = _serve_cli(monkeypatch, ["--config", str(config)])
    assert result.exit_code == 2 and not started
    (line,) = result.output.splitlines()
    assert line.startswith("error: ") and message in line and "Traceback" not in result.output


def test_bad_backend_flags_and_numbers_are_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    for args, message in (
        (["--backend", "nourl"], "error: --backend 'nourl': write NAME=URL or NAME=MODEL@URL"),
        (
            ["--backend", "a=http://h", "--max-batch", "0"],
            "error: --max-batch 0: give a whole number of at least 1",
        ),
        (
            ["--backend", "a=http://h", "--watch-interval", "0"],
            "error: --watch-interval 0: give a number of seconds",
        ),
        (["--backend", "a=http://h", "--max-body-mb", "0"], "error: --max-body-mb 0: give a size"),
        (
            ["--backend", "a=http://h", "--backend", "b=http://i", "--alias", "bot=a:0.9,b:0.3"],
            "error: alias 'bot': shares add up to 1.2 (0.9 + 0.3); make them add up to 1",
        ),
    ):
        result, started = _serve_cli(monkeypatch, args)
        assert result.exit_code == 2 and not started
        assert result.output.splitlines()[0].startswith(message) and len(result.output.splitlines()) == 1


def test_status_of_a_server_that_is_not_there_is_one_line() -> None:
    from tunelab.cli import app

    result = CliRunner().invoke(app, ["serve", "status", "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 2
    (line,) = result.output.splitlines()
    assert line.startswith("error: no tunelab server answered at http://127.0.0.1:")
