"""The Chat page: one prompt, two models side by side, both answers streamed token by token.

*Send* checks the sampling settings and gives the exchange an id; each column then opens its own
server-sent-events stream, which loads its model (:mod:`tunelab.studio.chat_models`, the serve
engine) and submits a :class:`~tunelab.serve.engine.Job` as ``tunelab serve`` does, forwarding the
job's Delta/Done/Failed events. Every finished answer is logged, and every thumbs up/down recorded,
with :class:`tunelab.data.feedback.FeedbackLog` in ``RUNS/.studio/feedback/``: the server's log
format, so ``tunelab data from-feedback RUNS/.studio/feedback`` makes preference pairs of them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from tunelab.data.feedback import REQUESTS_LOG, FeedbackLog
from tunelab.studio import chat_models
from tunelab.studio.forms import form_fields
from tunelab.studio.jobs import STUDIO_DIR
from tunelab.studio.live import sse
from tunelab.studio.render import ENV, page

FEEDBACK_DIR = "feedback"  # RUNS/.studio/feedback: requests.jsonl + feedback.jsonl
SIDES = ("a", "b")
MAX_TOKENS_LIMIT = 1024  # the serve engine's default limit
ANSWER_TIMEOUT_S = 300.0  # a first answer on CPU includes no load time (the model loads before the job)


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None

    def logged(self) -> dict[str, Any]:
        """As the server logs a request's sampling: only the fields that were given."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass
class Exchange:
    prompt: str
    sampling: Sampling
    models: dict[str, str]  # side -> the form value of its model


@dataclass
class ChatState:
    """What the page keeps in memory: engines (a cache), pending exchanges and answered ids."""

    runs_dir: Path
    models: chat_models.EngineCache = field(default_factory=chat_models.EngineCache)
    pending: dict[tuple[str, str], Exchange] = field(default_factory=dict)
    answered: dict[str, str] = field(default_factory=dict)  # answer id -> variant, for the thumbs
    _log: FeedbackLog | None = None

    @property
    def log_dir(self) -> Path:
        return self.runs_dir / STUDIO_DIR / FEEDBACK_DIR

    @property
    def log(self) -> FeedbackLog:
        if self._log is None:  # opened on the first answer: a studio that never chats writes nothing
            self._log = FeedbackLog(self.log_dir)
        return self._log

    def variant_of(self, answer_id: str) -> str | None:
        """The model an answer came from: remembered, else found in the log (an answer from before a restart)."""
        if answer_id in self.answered:
            return self.answered[answer_id]
        try:
            with open(self.log_dir / REQUESTS_LOG, encoding="utf-8") as f:
                for line in f:
                    record = json.loads(line) if f'"{answer_id}"' in line else {}
                    if record.get("id") == answer_id:
                        return record.get("variant")
        except (OSError, ValueError):
            return None
        return None


def parse_sampling(fields: dict[str, str]) -> Sampling:
    """The four sampling fields, or ValueError naming the field and the range it must be in."""

    def number(name: str, cast, low, high, default):
        text = fields.get(name, "").strip()
        if not text:
            return default
        try:
            value = cast(text)
        except ValueError:
            raise ValueError(
                f"{name}: '{text}' is not a{'n integer' if cast is int else ' number'}"
            ) from None
        if not low <= value <= high:
            raise ValueError(f"{name}: {value} is outside {low}..{high}")
        return value

    return Sampling(
        temperature=number("temperature", float, 0.0, 2.0, 0.0),
        top_p=number("top_p", float, 0.0, 1.0, 1.0) or 1.0,
        max_tokens=number("max_tokens", int, 1, MAX_TOKENS_LIMIT, 64),
        seed=number("seed", int, 0, 2**31 - 1, None),
    )


def model_of(fields: dict[str, str], side: str) -> str:
    """A typed model wins over the list: the text field is for what the list does not offer."""
    return fields.get(f"model_{side}_path", "").strip() or fields.get(f"model_{side}", "").strip()


def register(app: FastAPI) -> None:
    """The Chat page's routes."""
    # Engines are daemon threads and the log flushes every line, so a studio that stops loses nothing.
    app.state.chat = ChatState(app.state.runs_dir)

    @app.get("/chat")
    def chat(request: Request):
        state: ChatState = request.app.state.chat
        options = chat_models.choices(state.runs_dir)
        defaults = _default_pair(options)
        return page("chat.html", active="/chat", options=options, defaults=defaults)

    @app.post("/chat/send")
    async def chat_send(request: Request):
        state: ChatState = request.app.state.chat
        fields = await form_fields(request)
        prompt = fields.get("prompt", "")
        models = {side: model_of(fields, side) for side in SIDES}
        try:
            for side, model in models.items():
                request.app.state.roots.check_local(model, f"model {side}")
        except ValueError as e:
            return page("_error.html", message=str(e))
        try:
            sampling = parse_sampling(fields)
        except ValueError as e:
            return page("_error.html", message=f"bad sampling setting: {e}")
        if not prompt.strip():
            return page("_error.html", message="type a prompt first")
        if not all(models.values()):
            return page("_error.html", message="choose a model for both columns (from the list, or type one)")
        exchange_id = uuid.uuid4().hex[:12]
        for side in SIDES:
            state.pending[(exchange_id, side)] = Exchange(prompt, sampling, models)
        return page("_chat_answers.html", id=exchange_id, models=models, sampling=sampling, sides=SIDES)

    @app.get("/chat/stream/{exchange_id}/{side}")
    async def chat_stream(request: Request, exchange_id: str, side: str):
        state: ChatState = request.app.state.chat
        # One stream per column: a reconnecting EventSource finds nothing pending and ends at once.
        exchange = state.pending.pop((exchange_id, side), None)
        events = answer_events(state, exchange, f"{exchange_id}-{side}", side)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.post("/chat/feedback")
    async def chat_feedback(request: Request):
        state: ChatState = request.app.state.chat
        fields = await form_fields(request)
        answer_id, score = fields.get("id", ""), fields.get("score", "")
        if score not in ("1", "-1"):
            return page("_error.html", message=f"score: {score} is not 1 (thumbs up) or -1 (thumbs down)")
        variant = state.variant_of(answer_id)
        if variant is None:
            return page("_error.html", message=f"no answer with id {answer_id} in {state.log_dir}")
        state.log.feedback(id=answer_id, alias=None, variant=variant, score=float(score))
        return page("_saved_note.html", note=f"recorded: thumbs {'up' if score == '1' else 'down'}")


def _default_pair(options: list[tuple[str, str]]) -> dict[str, str]:
    """Base vs the newest tuned run when there are any: the comparison people open the page for."""
    runs = [value for value, _ in options if value.startswith("run:")]
    bases = [value for value, _ in options if value.startswith("base:")]
    if not runs:
        return {"a": "", "b": ""}
    tuned = runs[-1]
    base = f"base:{tuned[4:]}" if f"base:{tuned[4:]}" in bases else (bases[0] if bases else runs[0])
    return {"a": base, "b": tuned}


def _fragment(template: str, **context: Any) -> str:
    return ENV.get_template(template).render(**context)


async def answer_events(
    state: ChatState, exchange: Exchange | None, answer_id: str, side: str
) -> AsyncIterator[str]:
    """``status``, then ``delta`` per piece of text, then ``footer`` (the answer's settings and
    thumbs, or why it failed), then ``done``, which closes the column's stream."""
    if exchange is None:
        yield sse("done", "")
        return
    model = exchange.models[side]
    yield sse("status", _fragment("_chat_note.html", note=f"loading {model}…"))
    try:
        target = chat_models.resolve(state.runs_dir, model)
        engine, adapter = await asyncio.to_thread(state.models.get, target)
    except Exception as e:  # noqa: BLE001 - any load failure (missing file, bad config, OOM) is shown, not raised
        yield sse("footer", _fragment("_chat_failed.html", reason=f"could not load {model}: {e}"))
        yield sse("done", "")
        return
    yield sse("status", _fragment("_chat_note.html", note=f"{target.variant}: answering…"))
    async for event in _generate(state, engine, adapter, target.variant, exchange, answer_id):
        yield event
    yield sse("status", "")  # the footer says how the answer ended
    yield sse("done", "")


async def _generate(
    state, engine, adapter, variant, exchange: Exchange, answer_id: str
) -> AsyncIterator[str]:
    """Submit the job to the engine and forward its events as HTML fragments; log the finished answer."""
    from tunelab.serve.engine import Delta, Done, Job, SamplingParams  # noqa: PLC0415
    from tunelab.serve.errors import APIError  # noqa: PLC0415

    messages = [{"role": "user", "content": exchange.prompt}]
    s = exchange.sampling
    try:
        prompt_ids = engine.encode_chat(messages, adapter)
        max_tokens = engine.resolve_max_tokens(len(prompt_ids), s.max_tokens)
    except (ValueError, APIError) as e:
        yield sse("footer", _fragment("_chat_failed.html", reason=getattr(e, "message", str(e))))
        return
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    params = SamplingParams(max_tokens=max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed)
    job = Job(
        adapter,
        prompt_ids,
        params,
        lambda e: loop.call_soon_threadsafe(events.put_nowait, e),
        stream=True,
        timeout_s=ANSWER_TIMEOUT_S,
    )
    engine.submit(job)
    try:
        while not isinstance(event := await events.get(), Done) and isinstance(event, Delta):
            yield sse("delta", _fragment("_chat_delta.html", text=event.text))
    finally:
        job.cancelled.set()  # the tab went away mid-answer: the worker stops at the next token
    if not isinstance(event, Done):
        yield sse("footer", _fragment("_chat_failed.html", reason=event.error.message))
        return
    state.answered[answer_id] = variant
    state.log.request(
        id=answer_id, alias=None, variant=variant, user=None, messages=messages, response=event.text,
        finish_reason=event.finish_reason, sampling=s.logged(),
    )  # fmt: skip
    yield sse("footer", _fragment("_chat_footer.html", id=answer_id, done=event, sampling=s, variant=variant))
