"""The FastAPI app: OpenAI-compatible endpoints over an :class:`Engine`, routed by a :class:`Router`.

Handlers validate, pick the adapter, queue a job for the engine's worker thread and wait for its
events (or stream them as server-sent events). Every failure leaves as an OpenAI-shaped error body
with the right 4xx/5xx status; every completion response names the adapter that produced it in
``x-tunelab-adapter``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.serve.engine import Delta, Done, Engine, Event, Failed, Job, SamplingParams
from tunelab.serve.errors import APIError, error_body, internal_error, not_found, timed_out
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.routing import Router
from tunelab.serve.schemas import (
    AdapterLoadRequest,
    AliasRequest,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    Completion,
    CompletionRequest,
    DeltaToolCall,
    FeedbackRequest,
    ModelCard,
    ModelList,
    ResponseFunction,
    ResponseToolCall,
    TextChoice,
    Usage,
)
from tunelab.serve.security import check_bearer
from tunelab.serve.tools import ParsedCall, ToolCallStream, finish_reason, parse_tool_calls, template_messages

log = logging.getLogger("tunelab.serve")
ADAPTER_HEADER = "x-tunelab-adapter"
ALIAS_HEADER = "x-tunelab-alias"
USER_HEADER = "x-user-id"
REMEMBERED_RESPONSES = 10_000


@dataclass
class ServeSettings:
    api_key: str | None = None
    request_timeout_s: float = 60.0
    watch_interval_s: float = 5.0


@dataclass
class _Route:
    """Where one request goes: the adapter (None = base), the alias it came through, the headers."""

    adapter: str | None
    alias: str | None
    served: str

    @property
    def headers(self) -> dict[str, str]:
        return {ADAPTER_HEADER: self.served, **({ALIAS_HEADER: self.alias} if self.alias else {})}


def create_app(engine: Engine, router: Router, settings: ServeSettings | None = None) -> FastAPI:
    """One app per engine; the engine's worker and the watcher timer run for the app's lifetime."""
    settings = settings or ServeSettings()
    state = _AppState(engine, router, settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        watcher = asyncio.create_task(state.watch_forever())
        try:
            yield
        finally:
            watcher.cancel()
            engine.stop()

    app = FastAPI(title="tunelab serve", lifespan=lifespan)
    app.state.tunelab = state
    _install_error_handlers(app)

    def user_auth(authorization: Annotated[str | None, Header()] = None) -> None:
        check_bearer(authorization, settings.api_key)

    def admin_auth(authorization: Annotated[str | None, Header()] = None) -> None:
        check_bearer(authorization, settings.api_key, admin=True)

    user, admin = [Depends(user_auth)], [Depends(admin_auth)]

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "queue_depth": engine.queue_depth, "adapters": router.adapters}

    @app.get("/metrics", dependencies=user)
    def metrics() -> Response:
        state.metrics.queue_depth.set(engine.queue_depth)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models", dependencies=user)
    def models() -> ModelList:
        return state.model_list()

    @app.post("/v1/chat/completions", dependencies=user)
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await state.complete(body, request)

    @app.post("/v1/completions", dependencies=user)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await state.complete(body, request)

    @app.post("/v1/feedback", dependencies=user)
    def feedback(body: FeedbackRequest) -> dict[str, Any]:
        return state.feedback(body)

    @app.get("/admin/adapters", dependencies=admin)
    def list_adapters() -> dict[str, Any]:
        return {
            n: {"path": str(a.path), "health": router.health(n)} for n, a in sorted(engine.adapters.items())
        }

    @app.post("/admin/adapters", dependencies=admin, status_code=201)
    async def load_adapter(body: AdapterLoadRequest) -> dict[str, Any]:
        return await state.load_adapter(body)

    @app.delete("/admin/adapters/{name}", dependencies=admin)
    async def unload_adapter(name: str) -> dict[str, Any]:
        return await state.unload_adapter(name)

    @app.get("/admin/aliases", dependencies=admin)
    def list_aliases() -> dict[str, Any]:
        return router.describe()

    @app.put("/admin/aliases/{alias}", dependencies=admin)
    def set_alias(alias: str, body: AliasRequest) -> dict[str, Any]:
        try:
            router.set_alias(
                alias,
                body.shares,
                baseline=body.baseline,
                rollout=body.rollout,
                rollout_every=body.rollout_every,
                rollout_every_seconds=body.rollout_every_seconds,
            )
        except ValueError as err:
            raise APIError(400, str(err), param="shares") from None
        return router.describe()[alias]

    return app


class _AppState:
    """What the handlers share: engine, router, metrics and which adapter wrote which response."""

    def __init__(self, engine: Engine, router: Router, settings: ServeSettings) -> None:
        self.engine, self.router, self.settings = engine, router, settings
        self.metrics = ServeMetrics()
        self.started = int(time.time())
        self._responses: OrderedDict[str, str | None] = OrderedDict()

    async def watch_forever(self) -> None:
        """The watcher's timer: rollbacks driven by feedback and time-based rollout steps need no request."""
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            self.router.check()

    def model_list(self) -> ModelList:
        cards = [ModelCard(id=self.engine.base_name, created=self.started, kind="base")]
        cards += [ModelCard(id=n, created=self.started, kind="adapter") for n in self.router.adapters]
        cards += [ModelCard(id=n, created=self.started, kind="alias") for n in self.router.aliases]
        return ModelList(data=cards)

    def route(self, model: str, user: str | None) -> _Route:
        try:
            adapter, alias = self.router.resolve(model, user)
        except KeyError:
            known = [self.engine.base_name, *self.router.adapters, *self.router.aliases]
            raise not_found(model, known) from None
        return _Route(adapter, alias, adapter or self.engine.base_name)

    async def complete(self, body: ChatCompletionRequest | CompletionRequest, request: Request) -> Response:
        """Validate, route, queue and answer one chat or text completion."""
        started = time.monotonic()
        if body.n != 1:
            raise APIError(
                400, f"n={body.n}: this server returns one choice per request; send n=1", param="n"
            )
        route = self.route(body.model, body.user or request.headers.get(USER_HEADER))
        try:
            job, events = self._job(body, route)
            self.engine.submit(job)
        except APIError as err:
            err.headers.update(route.headers)
            self._record(route, started, err.status)
            raise
        chat = isinstance(body, ChatCompletionRequest)
        tools = chat and body.active_tools() is not None  # parse the answer for tool calls
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = self._sse(
                job,
                events,
                route,
                response_id,
                chat=chat,
                tools=tools,
                include_usage=include_usage,
                started=started,
            )
            return StreamingResponse(sse, media_type="text/event-stream", headers=route.headers)
        event = await self._final_event(job, events)
        if isinstance(event, Failed):
            self._record(route, started, event.error.status)
            event.error.headers.update(route.headers)
            raise event.error
        self._record(route, started, None, (event.prompt_tokens, event.completion_tokens))
        self._remember(response_id, route.adapter)
        payload = (
            _chat_response(response_id, route.served, event, tools)
            if chat
            else _text_response(response_id, route.served, event)
        )
        return JSONResponse(payload.model_dump(), headers=route.headers)

    def _job(
        self, body: ChatCompletionRequest | CompletionRequest, route: _Route
    ) -> tuple[Job, asyncio.Queue]:
        """The engine job for a request, and the queue its events arrive on (on this event loop)."""
        try:
            if isinstance(body, ChatCompletionRequest):
                messages = template_messages(body.messages)
                prompt_ids = self.engine.encode_chat(messages, route.adapter, tools=body.active_tools())
            else:
                prompt_ids = self.engine.encode_text(body.prompt_text())
        except ValueError as err:  # content parts we cannot read, or a template that rejects the turns/tools
            raise APIError(400, str(err), param=getattr(err, "param", None) or _prompt_param(body)) from None
        if not prompt_ids:  # generate() has nothing to continue from; it would fail inside torch
            raise APIError(
                400,
                "the prompt is empty and this model's tokenizer adds no start token, so there is "
                "nothing to continue; send at least some text",
                param=_prompt_param(body),
            )
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        try:
            max_tokens = self.engine.resolve_max_tokens(len(prompt_ids), requested)
        except APIError as err:
            if err.param == "messages":  # the engine does not know which endpoint asked
                err.param = _prompt_param(body)
            raise
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=tuple(body.stop_list()),
            seed=body.seed,
        )
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(
            route.adapter,
            prompt_ids,
            params,
            emit,
            stream=body.stream,
            timeout_s=self.settings.request_timeout_s,
        )
        return job, events

    async def _next_event(self, job: Job, events: asyncio.Queue) -> Event:
        remaining = job.deadline - time.monotonic() + 1.0  # the worker reports its own timeout first
        try:
            return await asyncio.wait_for(events.get(), timeout=max(remaining, 0.01))
        except TimeoutError:
            job.cancelled.set()
            return Failed(timed_out(job.timeout_s))

    async def _final_event(self, job: Job, events: asyncio.Queue) -> Done | Failed:
        try:
            while not isinstance(event := await self._next_event(job, events), Done | Failed):
                pass
        except asyncio.CancelledError:
            job.cancelled.set()  # the client went away; the worker stops at the next token
            raise
        return event

    async def _sse(
        self,
        job: Job,
        events: asyncio.Queue,
        route: _Route,
        response_id: str,
        *,
        chat: bool,
        tools: bool,
        include_usage: bool,
        started: float,
    ) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text delta, a final chunk with finish_reason, [DONE].

        With tools, content streams up to the first ``<tool_call>``; the calls (and any content
        after them) come in one chunk once generation has ended, then the finish chunk."""
        chunk = _ChunkMaker(response_id, route.served, chat)
        tool_stream = ToolCallStream() if tools else None
        status: int | None = 0
        try:
            if chat:
                yield chunk.role()
            while True:
                event = await self._next_event(job, events)
                if isinstance(event, Delta):
                    if text := (tool_stream.feed(event.text) if tool_stream else event.text):
                        yield chunk.text(text)
                    continue
                if isinstance(event, Failed):
                    status = event.error.status
                    yield _sse_data(event.error.body())
                else:
                    status = None
                    self._remember(response_id, route.adapter)
                    for line in chunk.ending(event, tool_stream):
                        yield line
                    if include_usage:
                        yield chunk.usage(event)
                    self._record(route, started, None, (event.prompt_tokens, event.completion_tokens))
                break
            yield "data: [DONE]\n\n"
        finally:
            if status == 0:  # the client disconnected mid-stream
                job.cancelled.set()
                status = 499
            if status is not None:
                self._record(route, started, status)

    def _record(
        self, route: _Route, started: float, error_status: int | None, tokens: tuple[int, int] = (0, 0)
    ) -> None:
        """Metrics for every request; the watcher's window only for failures that are the server's."""
        latency = time.monotonic() - started
        self.metrics.observe(route.served, route.alias, latency, error_status=error_status, tokens=tokens)
        if error_status is None or error_status >= 500:
            self.router.observe(route.adapter, error_status is None, latency, alias=route.alias)

    def _remember(self, response_id: str, adapter: str | None) -> None:
        self._responses[response_id] = adapter
        while len(self._responses) > REMEMBERED_RESPONSES:
            self._responses.popitem(last=False)

    def feedback(self, body: FeedbackRequest) -> dict[str, Any]:
        if (body.id is None) == (body.adapter is None):
            raise APIError(400, "give exactly one of 'id' (a response id) or 'adapter'", param="id")
        if body.id is not None:
            if body.id not in self._responses:
                raise APIError(
                    404, f"no recent response with id '{body.id}'", param="id", code="unknown_response"
                )
            adapter = self._responses[body.id]
        else:
            adapter = body.adapter
        if adapter is None:
            raise APIError(
                400, "feedback is tracked per adapter; that response came from the base model", param="id"
            )
        try:
            self.router.feedback(adapter, body.score)
        except KeyError:
            raise APIError(404, f"no adapter named '{adapter}' is loaded", param="adapter") from None
        return {"adapter": adapter, "score": body.score, "health": self.router.health(adapter)}

    async def load_adapter(self, body: AdapterLoadRequest) -> dict[str, Any]:
        try:
            self.router.check_name_free(body.name)
            # Loading waits for the model lock, i.e. for the request being generated, so off the event loop.
            loaded = await asyncio.to_thread(self.engine.load_adapter, body.name, body.path)
            self.router.add_adapter(body.name)
        except (OSError, ValueError) as err:
            raise APIError(400, str(err), param="path") from None
        return {"name": loaded.name, "path": str(loaded.path)}

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        try:
            self.router.remove_adapter(name)
        except KeyError:
            raise APIError(404, f"no adapter named '{name}' is loaded", param="name") from None
        except ValueError as err:
            raise APIError(409, str(err), param="name", code="adapter_in_use") from None
        await asyncio.to_thread(self.engine.unload_adapter, name)
        return {"unloaded": name}


class _ChunkMaker:
    """The streamed chunks of one response, chat or text shaped."""

    def __init__(self, response_id: str, model: str, chat: bool) -> None:
        self.id, self.model, self.chat = response_id, model, chat

    def _chat(self, delta: ChatDelta, finish: str | None = None) -> str:
        choice = ChatChunkChoice(delta=delta, finish_reason=finish)
        return _sse_data(ChatCompletionChunk(id=self.id, model=self.model, choices=[choice]).model_dump())

    def _text(self, text: str, finish: str | None = None) -> str:
        choice = TextChoice(text=text, finish_reason=finish)
        return _sse_data(Completion(id=self.id, model=self.model, choices=[choice]).model_dump())

    def role(self) -> str:
        return self._chat(ChatDelta(role="assistant", content=""))

    def text(self, text: str) -> str:
        return self._chat(ChatDelta(content=text)) if self.chat else self._text(text)

    def finish(self, reason: str) -> str:
        return self._chat(ChatDelta(), reason) if self.chat else self._text("", reason)

    def ending(self, done: Done, stream: ToolCallStream | None) -> list[str]:
        """The last chunks: with tools, the calls and the content held back, then the finish reason."""
        if stream is None:
            return [self.finish(done.finish_reason)]
        rest, calls = stream.finish(done.text)
        lines = []
        if rest or calls:
            deltas = [DeltaToolCall(index=i, **_tool_call(call).model_dump()) for i, call in enumerate(calls)]
            lines.append(self._chat(ChatDelta(content=rest or None, tool_calls=deltas or None)))
        return [*lines, self.finish(finish_reason(done.finish_reason, calls))]

    def usage(self, done: Done) -> str:
        usage = _usage(done)
        if self.chat:
            return _sse_data(
                ChatCompletionChunk(id=self.id, model=self.model, choices=[], usage=usage).model_dump()
            )
        return _sse_data(Completion(id=self.id, model=self.model, choices=[], usage=usage).model_dump())


def _sse_data(payload: dict[str, Any]) -> str:
    import json  # noqa: PLC0415

    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _usage(done: Done) -> Usage:
    return Usage(
        prompt_tokens=done.prompt_tokens,
        completion_tokens=done.completion_tokens,
        total_tokens=done.prompt_tokens + done.completion_tokens,
    )


def _chat_response(response_id: str, model: str, done: Done, tools: bool) -> ChatCompletion:
    if tools:
        content, calls = parse_tool_calls(done.text)
        message = AssistantMessage(content=content, tool_calls=[_tool_call(c) for c in calls] or None)
        choice = ChatChoice(message=message, finish_reason=finish_reason(done.finish_reason, calls))
    else:
        choice = ChatChoice(message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)
    return ChatCompletion(id=response_id, model=model, choices=[choice], usage=_usage(done))


def _tool_call(call: ParsedCall) -> ResponseToolCall:
    shape = call.openai()
    return ResponseToolCall(id=shape["id"], function=ResponseFunction(**shape["function"]))


def _text_response(response_id: str, model: str, done: Done) -> Completion:
    choice = TextChoice(text=done.text, finish_reason=done.finish_reason)
    return Completion(id=response_id, model=model, choices=[choice], usage=_usage(done))


def _prompt_param(body: ChatCompletionRequest | CompletionRequest) -> str:
    return "messages" if isinstance(body, ChatCompletionRequest) else "prompt"


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape; user mistakes are 4xx, never a 500."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(err.errors())
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(err.detail), type=kind), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def crashed(request: Request, err: Exception) -> JSONResponse:
        # The traceback goes to the server log; the client gets a reference to it and nothing of the
        # exception's text, which can hold paths, tensor shapes or other internals.
        ref = uuid.uuid4().hex[:12]
        log.error("internal error %s on %s %s", ref, request.method, request.url.path, exc_info=err)
        return JSONResponse(internal_error(ref).body(), status_code=500)


def _describe_validation(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic's errors → one message naming each bad field, and the first field as ``param``."""
    parts, params = [], []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        # Union members add their type name to the path (e.g. stop.str); keep the user's field path.
        loc = [x for x in loc if x not in ("str", "list[str]", "list[dict[str,any]]", "dict[str,any]")]
        field = ".".join(loc)
        if e.get("type") == "json_invalid":
            parts.append(
                f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})"
            )
            field = ""  # its location is a character offset, not a parameter
        elif e.get("type") == "extra_forbidden":
            parts.append(f"'{field}' is not a parameter this server supports")
        else:
            message = str(e.get("msg")).removeprefix("Value error, ")  # pydantic's prefix for our checks
            parts.append(f"{field or 'body'}: {message}")
        params.append(field or None)
    return "; ".join(dict.fromkeys(parts)), next((p for p in params if p), None)
