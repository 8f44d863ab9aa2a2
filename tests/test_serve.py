"""`tunelab serve` end to end: the official openai client against a real uvicorn server on loopback,
serving tiny:llama with two LoRA adapters trained here (on different answers, so they differ)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.engine import Engine
from tunelab.serve.routing import Router, WatchPolicy
from tunelab.serve.server import BackgroundServer

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ASK = [{"role": "user", "content": "question 1"}]
GREEDY = {"temperature": 0, "max_tokens": 8}


def start(
    bot_runs: dict[str, Path], *, policy: WatchPolicy | None = None, **settings: object
) -> BackgroundServer:
    engine = Engine.load(
        None, bot_runs, device="cpu", queue_size=settings.pop("queue_size", 16), max_tokens_limit=64
    )
    # Latency on a shared CI machine is noise: only errors and feedback may roll back in these tests.
    policy = policy or WatchPolicy(min_samples=3, max_latency_ratio=1e6)
    router = Router(engine.base_name, list(engine.adapters), policy)
    router.set_alias("bot", {"yes-bot": 0.5, "no-bot": 0.5})
    return BackgroundServer(create_app(engine, router, ServeSettings(api_key=KEY, **settings)))


@pytest.fixture(scope="module")
def server(bot_runs: dict[str, Path]) -> Iterator[BackgroundServer]:
    with start(bot_runs) as running:
        yield running


@pytest.fixture
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def chat(client: openai.OpenAI, model: str, **kw: object) -> tuple[str, str]:
    """(content, adapter header) of one greedy chat completion."""
    raw = client.chat.completions.with_raw_response.create(model=model, messages=ASK, **{**GREEDY, **kw})
    return raw.parse().choices[0].message.content, raw.headers["x-tunelab-adapter"]


def post_json(url: str, body: object) -> httpx.Response:
    """POST as Python's json module writes it: \\uXXXX escapes and NaN/Infinity, as clients may send."""
    headers = {**AUTH, "content-type": "application/json"}
    return httpx.post(url, content=json.dumps(body), headers=headers, timeout=30)


def engine_of(server: BackgroundServer) -> Engine:
    return server.app.state.tunelab.engine


def test_models_lists_base_adapters_and_alias(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[:3] == ["tiny:llama", "no-bot", "yes-bot"] and "bot" in ids


def test_chat_completion_shape_usage_and_header(client: openai.OpenAI, server: BackgroundServer) -> None:
    raw = client.chat.completions.with_raw_response.create(model="yes-bot", messages=ASK, **GREEDY)
    reply = raw.parse()
    assert raw.headers["x-tunelab-adapter"] == "yes-bot"
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "length"
    prompt_tokens = len(engine_of(server).encode_chat(ASK, "yes-bot"))
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_tokens, 8)
    assert reply.usage.total_tokens == prompt_tokens + 8


def test_each_adapter_and_the_base_answer_differently(client: openai.OpenAI) -> None:
    answers = {model: chat(client, model) for model in ("yes-bot", "no-bot", "tiny:llama")}
    assert {header for _, header in answers.values()} == {"yes-bot", "no-bot", "tiny:llama"}
    assert len({text for text, _ in answers.values()}) == 3
    assert "y" in answers["yes-bot"][0] and "o" in answers["no-bot"][0]


def test_streaming_chat_equals_the_non_streamed_answer(
    client: openai.OpenAI, server: BackgroundServer
) -> None:
    whole, _ = chat(client, "no-bot")
    chunks = list(
        client.chat.completions.create(
            model="no-bot", messages=ASK, stream=True, stream_options={"include_usage": True}, **GREEDY
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices
    body = {"model": "no-bot", "messages": ASK, "stream": True, **GREEDY}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=AUTH) as response:
        assert response.headers["x-tunelab-adapter"] == "no-bot"
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"


def test_text_completion_stops_at_the_stop_string_streamed_or_not(client: openai.OpenAI) -> None:
    full = client.completions.create(model="yes-bot", prompt="question 2", **GREEDY).choices[0].text
    stop = full.strip()[1:3]  # a piece from inside the answer
    expected = full[: full.find(stop)]
    reply = client.completions.create(model="yes-bot", prompt="question 2", stop=[stop, "zzz"], **GREEDY)
    assert reply.choices[0].text == expected and reply.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="yes-bot", prompt="question 2", stop=stop, stream=True, **GREEDY
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_same_seed_same_sample(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        kw = {"temperature": 1.0, "max_tokens": 12, "seed": seed}
        return client.completions.create(model="tiny:llama", prompt="hello", **kw).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_alias_is_sticky_per_user_and_answers_like_its_adapter(client: openai.OpenAI) -> None:
    alone = {name: chat(client, name)[0] for name in ("yes-bot", "no-bot")}
    seen = set()
    for user in [f"user-{i}" for i in range(4)]:
        text, adapter = chat(client, "bot", user=user)
        assert text == alone[adapter]
        assert chat(client, "bot", user=user)[1] == adapter  # sticky
        seen.add(adapter)
    assert seen == {"yes-bot", "no-bot"}
    raw = httpx.post(
        f"{client.base_url}chat/completions",
        json={"model": "bot", "messages": ASK, **GREEDY},
        headers={**AUTH, "x-user-id": "user-3"},
    )
    assert raw.headers["x-tunelab-adapter"] == chat(client, "bot", user="user-3")[1]


def test_concurrent_requests_for_different_adapters_match_each_served_alone(client: openai.OpenAI) -> None:
    models = ["yes-bot", "no-bot", "tiny:llama"] * 3
    alone = {m: chat(client, m) for m in set(models)}
    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        together = list(pool.map(lambda m: chat(client, m), models))
    assert together == [alone[m] for m in models]


def test_admin_shares_load_unload_and_rollback_by_feedback(
    client: openai.OpenAI, server: BackgroundServer, bot_runs: dict[str, Path]
) -> None:
    admin = httpx.Client(base_url=server.url, headers=AUTH)
    put = admin.put("/admin/aliases/canary", json={"shares": {"yes-bot": 0.0, "no-bot": 1.0}})
    assert put.status_code == 200 and put.json()["baseline"] == "yes-bot"
    assert all(chat(client, "canary", user=f"u{i}")[1] == "no-bot" for i in range(4))

    loaded = admin.post("/admin/adapters", json={"name": "yes-copy", "path": str(bot_runs["yes-bot"])})
    assert loaded.status_code == 201
    assert chat(client, "yes-copy")[0] == chat(client, "yes-bot")[0]
    assert admin.delete("/admin/adapters/no-bot").status_code == 409  # aliases still route to it
    assert admin.delete("/admin/adapters/yes-copy").status_code == 200
    with pytest.raises(openai.NotFoundError):
        chat(client, "yes-copy")

    for _ in range(3):  # the baseline is liked, the candidate is not: the watcher moves traffic back
        admin.post("/v1/feedback", json={"adapter": "yes-bot", "score": 1.0}).raise_for_status()
    reply = client.chat.completions.create(model="canary", messages=ASK, **GREEDY)
    for _ in range(3):
        admin.post("/v1/feedback", json={"id": reply.id, "score": -1.0}).raise_for_status()
    canary = admin.get("/admin/aliases").json()["canary"]
    assert canary["shares"] == {"yes-bot": 1.0, "no-bot": 0.0}
    assert "mean feedback -1.00 vs baseline 1.00" in canary["events"][-1]["message"]
    assert chat(client, "canary", user="u1")[1] == "yes-bot"
    # The window is per adapter, so "bot" (same baseline) lost its no-bot share too; restore it.
    assert admin.get("/admin/aliases").json()["bot"]["shares"]["no-bot"] == 0.0
    admin.put("/admin/aliases/bot", json={"shares": {"yes-bot": 0.5, "no-bot": 0.5}}).raise_for_status()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "nope", "messages": ASK}, 404, "model"),
        ({"model": "yes-bot", "messages": ASK, "n": 2}, 400, "n"),
        ({"model": "yes-bot", "messages": ASK, "max_tokens": 65}, 400, "max_tokens"),
        ({"model": "yes-bot", "messages": [{"role": "user", "content": "hi " * 600}]}, 400, "messages"),
        ({"model": "yes-bot", "messages": ASK, "temperature": 3}, 400, "temperature"),
        ({"model": "yes-bot", "messages": ASK, "logit_bias": {}}, 400, "logit_bias"),
        ({"model": "yes-bot", "messages": ASK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "yes-bot"}, 400, "messages"),
        (
            {"model": "yes-bot", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages",
        ),
        ({"model": "yes-bot", "messages": ASK, "seed": 2**80}, 400, "seed"),
        ({"model": "yes-bot", "messages": ASK, "seed": -(2**63) - 1}, 400, "seed"),
        ({"model": "yes-bot", "messages": ASK, "max_tokens": 0}, 400, "max_tokens"),
        ({"model": "yes-bot", "messages": ASK, "max_tokens": 10**30}, 400, "max_tokens"),
        ({"model": "yes-bot", "messages": ASK, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
        ({"model": "yes-bot", "messages": ASK, "temperature": -0.5}, 400, "temperature"),
        ({"model": "yes-bot", "messages": ASK, "top_p": 0}, 400, "top_p"),
        ({"model": "yes-bot", "messages": ASK, "top_p": 1.5}, 400, "top_p"),
        ({"model": "yes-bot", "messages": ASK, "n": 0}, 400, "n"),
        ({"model": "yes-bot", "messages": ASK, "stop": [1]}, 400, "stop"),
        ({"model": "yes-bot", "messages": []}, 400, "messages"),
        ({"model": "yes-bot", "messages": [{"role": "user", "content": None}]}, 400, "messages.0.content"),
        ({"model": "yes-bot", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
        ({"model": "yes-bot", "messages": [{"role": "assistant"}, *ASK]}, 400, "messages.0.content"),
        ({"model": "yes-bot", "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role"),
        (
            {"model": "yes-bot", "messages": [{"role": "user", "content": "\ud800"}]},
            400,
            "messages.0.content",
        ),
        ({"model": "yes-bot", "messages": ASK, "stop": ["\udfff"]}, 400, "stop"),
        ({"model": "yes-bot", "messages": ASK, "temperature": float("nan")}, 400, "temperature"),
        ({"model": "yes-bot", "messages": ASK, "top_p": float("inf")}, 400, "top_p"),
    ],
)
def test_bad_requests_get_openai_error_bodies(
    server: BackgroundServer, body: dict, status: int, param: str
) -> None:
    response = post_json(f"{server.url}/v1/chat/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param and error["message"]
    assert error["type"] != "server_error"


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "the prompt is empty"),
        ([], "give one string"),
        (["a", "b"], "give one string"),
        ([[1, 2]], "prompt"),
        ("hi " * 600, "context"),
        ("a lone surrogate \ud800", "lone UTF-16 surrogate"),
    ],
)
def test_bad_completion_prompts_are_400s_naming_the_prompt(
    server: BackgroundServer, prompt: object, message: str
) -> None:
    """An empty prompt once reached torch and came back as a 500 quoting its internal error."""
    body = {"model": "yes-bot", "prompt": prompt, "max_tokens": 4}
    response = post_json(f"{server.url}/v1/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt" and message in error["message"]
    assert "tensor" not in error["message"].lower() and "Value error" not in error["message"]


def test_the_extreme_valid_seeds_work(client: openai.OpenAI) -> None:
    for seed in (2**63 - 1, -(2**63), 0):
        reply = client.completions.create(model="tiny:llama", prompt="hi", max_tokens=2, seed=seed)
        assert reply.choices[0].finish_reason in ("length", "stop")


def test_an_unexpected_error_is_logged_and_answered_without_its_text(
    server: BackgroundServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("secret detail at /srv/internal/path.py")

    monkeypatch.setattr(server.app.state.tunelab, "model_list", broken)
    with caplog.at_level(logging.ERROR, logger="tunelab.serve"):
        response = httpx.get(f"{server.url}/v1/models", headers=AUTH)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert (
        "secret" not in response.text and "/srv" not in response.text and "RuntimeError" not in response.text
    )
    (record,) = [r for r in caplog.records if r.name == "tunelab.serve" and r.exc_info]
    assert "secret detail" in str(record.exc_info[1])
    ref = error["message"].split("reference ")[1].split(";")[0]
    assert ref in record.getMessage()


def test_bad_json_and_unknown_routes_are_openai_errors_too(server: BackgroundServer) -> None:
    bad = httpx.post(
        f"{server.url}/v1/completions", content=b"{nope", headers={**AUTH, "content-type": "application/json"}
    )
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    missing = httpx.get(f"{server.url}/v1/nothing", headers=AUTH)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_a_key_is_required_everywhere_but_health(server: BackgroundServer) -> None:
    anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model="yes-bot", messages=ASK, **GREEDY)
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/admin/aliases")):
        assert httpx.request(method, f"{server.url}{path}").status_code == 401
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_metrics_count_requests_and_tokens_per_adapter(
    client: openai.OpenAI, server: BackgroundServer
) -> None:
    def counts() -> dict[tuple[str, str, str], float]:
        text = httpx.get(f"{server.url}/metrics", headers=AUTH).text
        return {
            (s.name, s.labels.get("variant", ""), s.labels.get("alias", "")): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    before = counts()
    chat(client, "no-bot")
    chat(client, "no-bot")
    chat(client, "yes-bot")
    after = counts()

    def grew(name: str, adapter: str) -> float:
        key = (name, adapter, "")
        return after.get(key, 0) - before.get(key, 0)

    assert grew("tunelab_requests_total", "no-bot") == 2 and grew("tunelab_requests_total", "yes-bot") == 1
    assert grew("tunelab_completion_tokens_total", "no-bot") == 16
    assert grew("tunelab_request_latency_seconds_count", "yes-bot") == 1


def test_full_queue_is_429_and_a_stuck_request_times_out(bot_runs: dict[str, Path]) -> None:
    with start(bot_runs, queue_size=1, request_timeout_s=1.0) as small:
        engine = engine_of(small)
        client = openai.OpenAI(base_url=f"{small.url}/v1", api_key=KEY, max_retries=0)
        body = {"model": "yes-bot", "messages": ASK, **GREEDY}
        engine.pause()  # the worker takes nothing: the first request fills the one queue slot
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                httpx.post, f"{small.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30
            )
            _wait_for(lambda: engine.queue_depth == 1)
            with pytest.raises(openai.RateLimitError) as excinfo:
                chat(client, "no-bot")
            stuck = pending.result(timeout=10)
        engine.resume()
        assert excinfo.value.status_code == 429 and excinfo.value.body["code"] == "queue_full"
        assert stuck.status_code == 504 and stuck.json()["error"]["code"] == "timeout"
        assert stuck.headers["x-tunelab-adapter"] == "yes-bot"
        later = httpx.post(f"{small.url}/v1/chat/completions", json=body, headers=AUTH, timeout=30)
        assert later.status_code == 200 and later.json()["choices"][0]["message"]["content"]


def _wait_for(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_client_errors_never_count_against_an_adapter_but_engine_faults_do(
    bot_runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad requests once came back as 500s and were counted as the adapter's errors, which is the
    number the rollback watcher acts on: a client could roll back a healthy adapter."""
    with start(bot_runs) as own:
        admin = httpx.Client(base_url=own.url, headers=AUTH, timeout=30)

        def post(path: str, **body: object) -> httpx.Response:
            return admin.post(path, json={"model": "no-bot", **GREEDY, **body})

        def health(name: str) -> dict:
            return admin.get("/admin/adapters").json()[name]["health"]

        for model in ("yes-bot", "no-bot") * 3:  # both sides of alias "bot" have a clean record
            assert post("/v1/chat/completions", model=model, messages=ASK).status_code == 200
        bad = [
            ("/v1/completions", {"prompt": ""}),
            ("/v1/chat/completions", {"messages": ASK, "seed": 2**80}),
            ("/v1/chat/completions", {"messages": ASK, "max_tokens": 65}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 600}]}),
            ("/v1/chat/completions", {"messages": ASK, "n": 3}),
            ("/v1/chat/completions", {"messages": ASK, "top_p": 0}),
        ]
        for path, body in bad * 3:
            for model in ("no-bot", "bot"):
                assert post(path, **{**body, "model": model}).status_code == 400, body
        assert health("no-bot")["error_rate"] == 0 and health("no-bot")["requests"] == 3
        assert admin.get("/admin/aliases").json()["bot"]["shares"] == {"yes-bot": 0.5, "no-bot": 0.5}

        engine = engine_of(own)
        real = engine.generate

        def faulty(rows):  # a genuine engine fault, for the no-bot adapter only (a batch has one)
            if rows[0].job.adapter == "no-bot":
                raise RuntimeError("CUDA error: device-side assert at /opt/kernels.cu")
            return real(rows)

        monkeypatch.setattr(engine, "generate", faulty)
        for _ in range(3):
            fault = post("/v1/chat/completions", messages=ASK)
            assert fault.status_code == 500 and fault.json()["error"]["code"] == "internal_error"
            assert "CUDA" not in fault.text and "/opt" not in fault.text
        assert health("no-bot")["error_rate"] == 0.5 and health("yes-bot")["error_rate"] == 0
        bot = admin.get("/admin/aliases").json()["bot"]
        assert bot["shares"] == {"yes-bot": 1.0, "no-bot": 0.0}
        # The first fault (1 of 4 requests) was already past the 5-point threshold.
        assert "error rate 25.0% vs baseline 0.0%" in bot["events"][-1]["message"]
