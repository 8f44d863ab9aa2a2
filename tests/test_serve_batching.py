"""Batching in the built-in engine: jobs queued together decode together, and every greedy answer
equals the same request served alone, whatever shares its batch (prompts of very different
lengths, other max_tokens and stop strings, streaming or not, two adapters and the base queued at
once). One row's cancellation, timeout or broken client never touches the others."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.batching import batch_key, left_pad, take_batch
from tunelab.serve.engine import Delta, Done, Engine, Event, Failed, Job, SamplingParams
from tunelab.serve.routing import Router
from tunelab.serve.server import BackgroundServer

QUESTIONS = {
    "short": "hi",
    "long": "question 1 " + "and then a much longer question with many more words in it " * 6,
    "mid": "question 4 please",
}


@pytest.fixture(scope="module")
def engine(bot_runs: dict[str, Path]) -> Iterator[Engine]:
    engine = Engine.load(None, bot_runs, device="cpu", queue_size=64, max_tokens_limit=64, max_batch=16)
    batches: list[int] = []
    real = engine.generate

    def recording(rows: list) -> None:  # the sizes of the batches the worker actually decoded
        batches.append(len(rows))
        real(rows)

    engine.generate = recording  # type: ignore[method-assign]
    engine.batches = batches  # type: ignore[attr-defined]
    engine.start()
    yield engine
    engine.stop()


class Sink:
    """Collects one job's events; ``on_delta`` lets a test act as the client mid-answer."""

    def __init__(self, on_delta: Callable[[Job], None] | None = None) -> None:
        self.events: list[Event] = []
        self.finished = threading.Event()
        self.on_delta = on_delta
        self.job: Job | None = None

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, Delta) and self.on_delta is not None:
            self.on_delta(self.job)
        if isinstance(event, Done | Failed):
            self.finished.set()

    @property
    def final(self) -> Event:
        assert self.finished.wait(60), "the job was never answered"
        return self.events[-1]

    @property
    def streamed(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Delta))


def make_job(engine: Engine, spec: dict, sink: Sink) -> Job:
    prompt = engine.encode_chat([{"role": "user", "content": QUESTIONS[spec["q"]]}], spec["adapter"])
    params = SamplingParams(
        max_tokens=spec["max_tokens"],
        temperature=spec.get("temperature", 0.0),
        stop=tuple(spec.get("stop", ())),
        seed=spec.get("seed"),
    )
    job = Job(spec["adapter"], prompt, params, sink, stream=spec.get("stream", False), timeout_s=60)
    sink.job = job
    return job


def alone(engine: Engine, spec: dict) -> Done:
    sink = Sink()
    engine.submit(make_job(engine, spec, sink))
    final = sink.final
    assert isinstance(final, Done), final
    return final


def together(engine: Engine, specs: list[dict], sinks: list[Sink] | None = None) -> list[Sink]:
    """Queue every job while the worker is paused, so they are all waiting when it wakes."""
    sinks = sinks or [Sink() for _ in specs]
    engine.pause()
    try:
        for spec, sink in zip(specs, sinks, strict=True):
            engine.submit(make_job(engine, spec, sink))
    finally:
        engine.resume()
    for sink in sinks:
        assert sink.finished.wait(60), "a job was never answered"
    return sinks


def mixed_specs(engine: Engine) -> list[dict]:
    """Three adapters' worth of greedy jobs: different prompt lengths, max_tokens, stops, streaming."""
    specs = []
    for adapter in ("yes-bot", "no-bot", None):
        for i, q in enumerate(QUESTIONS):
            specs.append({"adapter": adapter, "q": q, "max_tokens": (12, 5, 20)[i], "stream": i % 2 == 0})
    for spec in specs[::2]:  # a stop string from inside the answer this job gives alone
        full = alone(engine, spec).text
        spec["stop"] = [full.strip()[2:4] or "zz", "never-said"]
    return specs


def test_greedy_batched_answers_equal_each_served_alone(engine: Engine) -> None:
    specs = mixed_specs(engine)
    expected = [alone(engine, spec) for spec in specs]
    assert {e.finish_reason for e in expected} == {"stop", "length"}  # stops really fire
    engine.batches.clear()
    sinks = together(engine, specs)
    assert sorted(engine.batches) == [3, 3, 3]  # one batch per adapter (base included), not 9 runs
    for spec, want, sink in zip(specs, expected, sinks, strict=True):
        got = sink.final
        assert isinstance(got, Done), (spec, got)
        assert (got.text, got.finish_reason) == (want.text, want.finish_reason), spec
        assert (got.prompt_tokens, got.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
        assert got.completion_tokens <= spec["max_tokens"]
        if spec["stream"]:
            assert sink.streamed == want.text
        else:
            assert not sink.streamed
        for stop in spec.get("stop", ()):
            assert stop not in sink.streamed


def test_rows_are_answered_as_they_stop_not_when_the_batch_ends(engine: Engine) -> None:
    specs = [{"adapter": "no-bot", "q": "mid", "max_tokens": n, "stream": True} for n in (2, 30)]
    later = Sink()
    seen_when_first_done: list[str] = []

    class First(Sink):
        def __call__(self, event: Event) -> None:
            if isinstance(event, Done):
                seen_when_first_done.append(later.streamed)
            super().__call__(event)

    first, second = (sink.final for sink in together(engine, specs, [First(), later]))
    assert (first.completion_tokens, first.finish_reason) == (2, "length")
    assert second.completion_tokens > 2
    assert len(seen_when_first_done[0]) < len(second.text)  # the long row was still decoding


def test_one_rows_cancellation_timeout_or_broken_client_leaves_the_others_intact(engine: Engine) -> None:
    spec = {"adapter": "yes-bot", "q": "long", "max_tokens": 20, "stream": True}
    want = alone(engine, spec)

    def cancel(job: Job) -> None:  # the client disconnects after its first piece of text
        job.cancelled.set()

    def expire(job: Job) -> None:  # the request's deadline passes mid-answer
        job.timeout_s = -1.0

    def broken(job: Job) -> None:  # the client's event loop is gone: emitting raises
        raise RuntimeError("event loop is closed")

    sinks = [Sink(), Sink(cancel), Sink(), Sink(expire), Sink(broken), Sink()]
    engine.batches.clear()
    engine.pause()
    for sink in sinks:
        engine.submit(make_job(engine, spec, sink))
    engine.resume()
    for i in (0, 1, 2, 3, 5):
        assert sinks[i].finished.wait(60)
    assert engine.batches == [6]
    for i in (0, 2, 5):
        assert (sinks[i].final.text, sinks[i].streamed) == (want.text, want.text)
    for i in (1, 3):
        final = sinks[i].final
        assert isinstance(final, Failed) and final.error.status == 504
    assert not sinks[4].finished.is_set() and sinks[4].job.cancelled.is_set()


def test_a_late_job_fails_alone_and_the_rest_of_its_batch_runs(engine: Engine) -> None:
    spec = {"adapter": None, "q": "short", "max_tokens": 6}
    want = alone(engine, spec)
    sinks = [Sink(), Sink()]
    engine.pause()
    jobs = [make_job(engine, spec, sink) for sink in sinks]
    jobs[0].timeout_s = -1.0  # it waited past its deadline in the queue
    for job in jobs:
        engine.submit(job)
    engine.resume()
    assert isinstance(sinks[0].final, Failed) and sinks[0].final.error.status == 504
    assert sinks[1].final.text == want.text


def test_seeded_samples_run_alone_and_stay_reproducible(engine: Engine) -> None:
    spec = {"adapter": "no-bot", "q": "mid", "max_tokens": 12, "temperature": 1.0, "seed": 7}
    want = alone(engine, spec)
    engine.batches.clear()
    sinks = together(engine, [spec, {**spec, "seed": None}, spec])
    assert engine.batches == [1, 1, 1]
    assert sinks[0].final.text == want.text == sinks[2].final.text


def run_then_follow(engine: Engine, first: list[dict], follow: dict, delay: float, wait_s: float) -> Sink:
    """Queue ``first`` together; ``delay`` s after the first job is answered, a client sends
    ``follow`` (like a closed-loop client sending its next request); returns the follower's sink."""
    follower = Sink()

    class Leader(Sink):
        def __call__(self, event: Event) -> None:
            super().__call__(event)
            if isinstance(event, Done):
                # From now on: so the leader's own start never waits out an earlier batch's window.
                engine.batch_wait_s = wait_s
                job = make_job(engine, follow, follower)
                threading.Timer(delay, engine.submit, args=(job,)).start()

    saved, engine.batch_wait_s = engine.batch_wait_s, 0.0
    try:
        together(engine, first, [Leader()] + [Sink() for _ in first[1:]])
        assert follower.finished.wait(60)
    finally:
        engine.batch_wait_s = saved
    return follower


def test_a_just_answered_client_joins_the_batch_waiting_for_the_worker(engine: Engine) -> None:
    """Closed-loop clients must not split into two groups that take turns (half-sized batches)."""
    yes, no = ({"adapter": a, "q": "mid", "max_tokens": 3} for a in ("yes-bot", "no-bot"))
    for wait_s, expected in ((0.0, [1, 1, 1]), (2.0, [1, 2])):
        engine.batches.clear()
        run_then_follow(engine, [yes, no], no, delay=0.2, wait_s=wait_s)
        assert engine.batches == expected, wait_s


def test_a_lone_client_never_waits_for_company(engine: Engine) -> None:
    spec = {"adapter": None, "q": "short", "max_tokens": 3}
    started = time.monotonic()
    follower = run_then_follow(engine, [spec], spec, delay=0.0, wait_s=30.0)
    assert isinstance(follower.final, Done) and time.monotonic() - started < 15


def job_like(adapter: str | None, prompt: int = 3, max_tokens: int = 4, **params: object) -> Job:
    return Job(adapter, [1] * prompt, SamplingParams(max_tokens=max_tokens, **params), lambda e: None)


def test_take_batch_groups_compatible_jobs_and_keeps_the_rest_in_order() -> None:
    a1, b1, a2, s1, a3, g = (
        job_like("a", temperature=0),
        job_like("b", temperature=0),
        job_like("a", temperature=0),
        job_like("a", temperature=0.7),
        job_like("a", temperature=0),
        job_like("a", temperature=0.7, top_p=0.9),
    )
    queue = deque([a1, b1, a2, s1, a3, g])
    assert take_batch(queue, max_batch=2) == [a1, a2]
    assert list(queue) == [b1, s1, a3, g]
    assert take_batch(queue, max_batch=16) == [b1]
    assert take_batch(queue, max_batch=16) == [s1]  # same temperature but another top_p: apart
    assert list(queue) == [a3, g]
    assert take_batch(deque([a1, a2]), max_batch=1) == [a1]


def test_take_batch_keeps_seeded_jobs_alone_and_respects_the_context() -> None:
    seeded = job_like("a", temperature=0.7, seed=3)
    assert batch_key(seeded) is None
    assert take_batch(deque([seeded, job_like("a", temperature=0.7, seed=3)]), 16) == [seeded]
    long_prompt, long_answer = (
        job_like(None, prompt=10, max_tokens=2),
        job_like(None, prompt=2, max_tokens=10),
    )
    queue = deque([long_prompt, long_answer])
    assert take_batch(queue, 16, context=12) == [long_prompt]  # 10 + 10 positions would not fit
    assert take_batch(deque([long_prompt, long_answer]), 16, context=20) == [long_prompt, long_answer]


def test_left_pad_right_aligns_prompts_and_masks_the_padding() -> None:
    import torch

    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_concurrent_streamed_and_plain_requests_through_the_server_match_alone(
    engine: Engine, bot_runs: dict[str, Path]
) -> None:
    """The HTTP path: the openai client's requests queued together answer as they do alone."""
    router = Router(engine.base_name, list(engine.adapters))
    with BackgroundServer(create_app(engine, router, ServeSettings(api_key="k"))) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="k", max_retries=0)
        asks = [(m, q) for m in ("yes-bot", "no-bot", "tiny:llama") for q in QUESTIONS.values()]

        def ask(model: str, question: str, stream: bool) -> str:
            kw = {"model": model, "messages": [{"role": "user", "content": question}]}
            kw |= {"temperature": 0, "max_tokens": 10}
            if not stream:
                return client.chat.completions.create(**kw).choices[0].message.content
            chunks = client.chat.completions.create(stream=True, **kw)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        expected = [ask(m, q, False) for m, q in asks]
        engine.batches.clear()
        engine.pause()
        results: dict[int, str] = {}
        threads = [
            threading.Thread(target=lambda i=i, m=m, q=q: results.__setitem__(i, ask(m, q, i % 2 == 0)))
            for i, (m, q) in enumerate(asks)
        ]
        for t in threads:
            t.start()
        _wait_until(lambda: engine.queue_depth == len(asks))
        engine.resume()
        for t in threads:
            t.join(60)
        assert [results[i] for i in range(len(asks))] == expected
        assert max(engine.batches) > 1
    engine.start()  # the server's shutdown stopped the worker the other tests share


def _wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
