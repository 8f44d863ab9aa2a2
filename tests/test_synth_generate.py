"""Generation client, `data synth`, `data augment` and the closing audit on tiny:llama and a real
`tunelab serve` on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tunelab.console import make_console
from tunelab.serve.server import BackgroundServer, ServeConfig, build_app
from tunelab.synth.client import (
    EndpointBackend,
    GenerationError,
    GenSettings,
    cache_key,
    normalise_endpoint,
    open_generator,
)

CONVS = [
    [{"role": "user", "content": "Say hi"}],
    [{"role": "user", "content": "Count to three please"}],
    [{"role": "user", "content": "Name a colour"}],
]


class Served:
    """A tiny-model `tunelab serve` app behind a real socket, counting the chat requests it answers."""

    def __init__(self) -> None:
        self.requests = 0
        app = build_app(ServeConfig(base="tiny:llama", device="cpu", max_tokens_limit=512))

        @app.middleware("http")
        async def count(request, call_next):  # type: ignore[no-untyped-def]
            if request.url.path.endswith("/chat/completions"):
                self.requests += 1
            return await call_next(request)

        self.server = BackgroundServer(app)


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    served = Served()
    with served.server:
        yield served


def quiet():
    return make_console(stderr=True, file=open("/dev/null", "w"))  # noqa: SIM115 - closed with the process


# -- the client ----------------------------------------------------------------------------------


def test_local_generation_is_batched_seeded_and_cached(tmp_path: Path) -> None:
    settings = GenSettings(max_tokens=12, temperature=0.9, seed=3)
    gen = open_generator("tiny:llama", cache_dir=tmp_path / "c", batch_size=2, device="cpu", console=quiet())
    first = gen.chat(CONVS, settings)
    assert len(first) == 3 and all(isinstance(a, str) for a in first)
    assert gen.model_calls == 3
    again = gen.chat(CONVS, settings)
    assert again == first and gen.model_calls == 3  # all from the cache: no model call
    # A fresh generator (a re-run) on the same cache: same rows, still no model call.
    rerun = open_generator("tiny:llama", cache_dir=tmp_path / "c", device="cpu", console=quiet())
    assert rerun.chat(CONVS, settings) == first and rerun.model_calls == 0
    # Without the cache, the same seed gives the same samples; another seed gives others.
    fresh = open_generator("tiny:llama", use_cache=False, batch_size=2, device="cpu", console=quiet())
    assert fresh.chat(CONVS, settings) == first
    other = fresh.chat(CONVS, GenSettings(max_tokens=12, temperature=0.9, seed=4))
    assert other != first and fresh.model_calls == 6


def test_cache_key_covers_model_conversation_and_settings() -> None:
    base = cache_key("m", CONVS[0], GenSettings())
    assert base == cache_key("m", CONVS[0], GenSettings())
    assert base != cache_key("n", CONVS[0], GenSettings())
    assert base != cache_key("m", CONVS[1], GenSettings())
    assert base != cache_key("m", CONVS[0], GenSettings(seed=1))
    assert base != cache_key("m", CONVS[0], GenSettings(stop=("x",)))


def test_stop_strings_cut_the_answer(tmp_path: Path) -> None:
    gen = open_generator("tiny:llama", use_cache=False, device="cpu", console=quiet())
    (full,) = gen.chat(CONVS[:1], GenSettings(max_tokens=24, temperature=0))
    cut_at = next(c for c in full[1:] if not c.isspace())
    (cut,) = gen.chat(CONVS[:1], GenSettings(max_tokens=24, temperature=0, stop=(cut_at,)))
    assert cut_at not in cut and full.startswith(cut)


def test_bad_model_spec_is_a_generation_error(tmp_path: Path) -> None:
    with pytest.raises(GenerationError, match="cannot load model"):
        open_generator(str(tmp_path / "nope"), console=quiet())
    with pytest.raises(GenerationError, match="no model"):
        open_generator(None, console=quiet())


def test_endpoint_url_normalised() -> None:
    assert normalise_endpoint("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalise_endpoint("http://h:1/v1/") == "http://h:1/v1"
    assert normalise_endpoint("https://h/openai/v1") == "https://h/openai/v1"
    with pytest.raises(GenerationError, match="not an http"):
        normalise_endpoint("localhost:8000")


def test_endpoint_generation_and_cache_on_a_real_server(served: Served, tmp_path: Path) -> None:
    url = served.server.url
    settings = GenSettings(max_tokens=8, temperature=0.8, seed=5)
    gen = open_generator(endpoint=url, cache_dir=tmp_path / "c", concurrency=2, console=quiet())
    assert gen.name == f"endpoint:{url}/v1#tiny:llama"  # the served model, found through /v1/models
    before = served.requests
    answers = gen.chat(CONVS, settings)
    assert len(answers) == 3 and served.requests - before == 3
    rerun = open_generator(endpoint=url, cache_dir=tmp_path / "c", console=quiet())
    assert rerun.chat(CONVS, settings) == answers
    assert served.requests - before == 3 and rerun.model_calls == 0  # the re-run made no request


def _backend_with(handler, sleeps: list[float], retries: int = 3) -> EndpointBackend:
    backend = EndpointBackend(
        "http://fake.invalid/v1", "m", api_key="k", concurrency=1, retries=retries, sleep=sleeps.append
    )
    backend.client = openai.OpenAI(
        base_url="http://fake.invalid/v1",
        api_key="k",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(handler)),
    )
    return backend


def _reply(text: str) -> dict:
    message = {"role": "assistant", "content": text}
    return {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


def test_endpoint_retries_429_and_5xx_with_backoff_but_not_4xx() -> None:
    statuses = iter([429, 503, 200])
    seen: list[dict] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        status = next(statuses)
        return httpx.Response(status, json=_reply("ok") if status == 200 else {"error": {"message": "busy"}})

    sleeps: list[float] = []
    backend = _backend_with(flaky, sleeps)
    out = list(backend.generate(CONVS[:1], GenSettings(seed=9, stop=("a", "b", "c", "d", "e"))))
    assert out == [([0], ["ok"])]
    assert sleeps == [0.5, 1.0]  # exponential back-off
    assert seen[-1]["seed"] == 9 and seen[-1]["stop"] == ["a", "b", "c", "d"]  # seed passed through

    calls: list[int] = []

    def refuses(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json={"error": {"message": "max_tokens too large"}})

    with pytest.raises(GenerationError, match="HTTP 400"):
        list(_backend_with(refuses, sleeps).generate(CONVS[:1], GenSettings()))
    assert len(calls) == 1  # a 4xx is never retried


def test_unreachable_endpoint_fails_after_retries() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    sleeps: list[float] = []
    with pytest.raises(GenerationError, match="after 3 attempt"):
        list(_backend_with(down, sleeps, retries=2).generate(CONVS[:1], GenSettings()))
    assert sleeps == [0.5, 1.0]
