"""The FastAPI app: OpenAI-compatible endpoints over an :class:`Engine`, routed by a :class:`Router`.

Handlers pick the variant, then either forward the request to a backend (``proxy``) or validate
it, queue a job for the engine's worker thread and wait for its events (or stream them as
server-sent events). Every failure leaves as an OpenAI-shaped error body with the right 4xx/5xx
status; every completion response names the variant that produced it in ``x-tunelab-adapter``.
The engine is optional: a server may front backends only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tunelab.data.feedback import FeedbackLog
from tunelab.serve import proxy
from tunelab.serve.backends import Backends, UpstreamFault
from tunelab.serve.engine import Delta, Done, Engine, Event, Failed, Job, SamplingParams, check_max_tokens
from tunelab.serve.errors import (
    APIError,
    error_body,
    internal_error,
    not_found,
    timed_out,
    variant_down,
    variant_fault,
)
from tunelab.serve.limits import DEFAULT_MAX_BODY_MB, BodyLimit, BodyTooLarge, body_bytes, parse_json
from tunelab.serve.metrics import ServeMetrics
from tunelab.serve.routing import Router, VariantDown
from tunelab.serve.schemas import (
    AdapterLoadRequest,
    AliasRequest,
    AssistantMessage,
    BackendChatRequest,
    BackendCompletionRequest,
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
from tunelab.serve.security import LOOPBACK_NAMES, LocalGuard, check_bearer
from tunelab.serve.tools import ParsedCall, ToolCallStream, finish_reason, parse_tool_calls, template_messages

log = logging.getLogger("tunelab.serve")
ADAPTER_HEADER = "x-tunelab-adapter"
ALIAS_HEADER = "x-tunelab-alias"
USER_HEADER = "x-user-id"
REMEMBERED_RESPONSES = 10_000
# What the request log keeps of a request's sampling settings.
# What a request for a backend is validated with: the built-in schema plus typed pass-through fields.
BACKEND_SCHEMAS: dict[type, type[BaseModel]] = {
    ChatCompletionRequest: BackendChatRequest,
    CompletionRequest: BackendCompletionRequest,
}
SAMPLING_FIELDS = ("temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed")


@dataclass
class ServeSettings:
    api_key: str | None = None
    request_timeout_s: float = 60.0
    watch_interval_s: float = 5.0
    log_dir: Path | None = None
    """Where requests.jsonl and feedback.jsonl go (prompts and answers included); None: no log."""
    max_body_bytes: int = body_bytes(DEFAULT_MAX_BODY_MB)
    """Larger request bodies are refused (413) before they are read whole or parsed."""
    allowed_hosts: frozenset[str] = frozenset(LOOPBACK_NAMES)
    """Host names answered (see :func:`tunelab.serve.security.allowed_hosts`); others get 403."""
    max_tokens_limit: int = 1024
    """``--max-tokens-limit``: the most new tokens a request may ask of a backend (the engine has its own)."""


@dataclass
class _Route:
    """Where one request goes: the variant (None = the local base), the alias it came through, its
    served name, and whether it is a backend."""

    adapter: str | None
    alias: str | None
    served: str
    backend: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return {ADAPTER_HEADER: self.served, **({ALIAS_HEADER: self.alias} if self.alias else {})}


def create_app(
    engine: Engine | None,
    router: Router,
    settings: ServeSettings | None = None,
    backends: Backends | None = None,
) -> FastAPI:
    """One app per engine (None: backends only); the engine's worker, the backends' client and the
    watcher timer run for the app's lifetime."""
    settings = settings or ServeSettings()
    state = _AppState(engine, router, settings, backends or Backends([]))

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await state.start()
        watcher = asyncio.create_task(state.watch_forever())
        try:
            yield
        finally:
            watcher.cancel()
            await state.stop()

    # No Swagger/ReDoc pages (they load their scripts from a CDN); the schema is a keyed route below.
    app = FastAPI(title="tunelab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.state.tunelab = state
    app.add_middleware(LocalGuard, allowed=settings.allowed_hosts, json_only=True)
    _install_error_handlers(app)

    async def user_auth(authorization: Annotated[str | None, Header()] = None) -> None:
        check_bearer(authorization, settings.api_key)

    async def admin_auth(authorization: Annotated[str | None, Header()] = None) -> None:
        check_bearer(authorization, settings.api_key, admin=True)

    user, admin = [Depends(user_auth)], [Depends(admin_auth)]

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness: always 200 while the process answers, with every variant's state."""
        return {"status": "ok", **state.health()}

    @app.get("/ready")
    def ready() -> JSONResponse:
        """Readiness: 200 only while every alias's baseline is up."""
        ok = router.ready()
        return JSONResponse({"status": "ready" if ok else "not_ready", **state.health()}, 200 if ok else 503)

    @app.get("/openapi.json", dependencies=user, include_in_schema=False)
    def openapi() -> dict[str, Any]:
        return app.openapi()

    @app.get("/metrics", dependencies=user)
    def metrics() -> Response:
        state.metrics.queue_depth.set(state.queue_depth)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models", dependencies=user)
    def models() -> ModelList:
        return state.model_list()

    @app.post("/v1/chat/completions", dependencies=user)
    async def chat(request: Request) -> Response:
        return await state.dispatch(request, ChatCompletionRequest, "/chat/completions")

    @app.post("/v1/completions", dependencies=user)
    async def completions(request: Request) -> Response:
        return await state.dispatch(request, CompletionRequest, "/completions")

    @app.post("/v1/feedback", dependencies=user)
    def feedback(body: FeedbackRequest) -> dict[str, Any]:
        return state.feedback(body)

    @app.get("/admin/adapters", dependencies=admin)
    def list_adapters() -> dict[str, Any]:
        adapters = engine.adapters if engine is not None else {}
        return {n: {"path": str(a.path), "health": router.health(n)} for n, a in sorted(adapters.items())}

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

    @app.post("/admin/aliases/{alias}/restore", dependencies=admin)
    def restore_alias(alias: str) -> dict[str, Any]:
        """Undo the watcher's rollbacks of an alias, without a restart."""
        try:
            router.restore(alias)
        except KeyError:
            raise APIError(404, f"no alias named '{alias}'", param="alias") from None
        except ValueError as err:
            raise APIError(409, str(err), param="alias", code="nothing_to_restore") from None
        return router.describe()[alias]

    return app


class _AppState:
    """What the handlers share: engine, backends, router, metrics, the request log, and which
    variant (through which alias) wrote which response."""

    def __init__(
        self, engine: Engine | None, router: Router, settings: ServeSettings, backends: Backends
    ) -> None:
        self.engine, self.router, self.settings, self.backends = engine, router, settings, backends
        self.metrics = ServeMetrics()
        self.started = int(time.time())
        self._responses: OrderedDict[str, tuple[str, str | None]] = OrderedDict()
        self.log = FeedbackLog(settings.log_dir) if settings.log_dir is not None else None
        router.on_rollback = lambda alias, variant, why: self.metrics.rollbacks.labels(
            alias, variant, why
        ).inc()
        for variant in router.variants:
            self.metrics.variant_up.labels(variant).set(1 if router.is_up(variant) else 0)

    async def start(self) -> None:
        if self.engine is not None:
            self.engine.start()
        await self.backends.start()

    async def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        await self.backends.close()
        if self.log is not None:
            self.log.close()

    @property
    def queue_depth(self) -> int:
        return self.engine.queue_depth if self.engine is not None else 0

    async def watch_forever(self) -> None:
        """The watcher's timer: backend probes, rollbacks driven by feedback and time-based rollout
        steps need no request."""
        while True:
            await asyncio.sleep(self.settings.watch_interval_s)
            try:
                await self.probe_backends()
                self.router.check()
            except Exception:  # a bug here must not stop the watcher for the server's lifetime
                log.exception(
                    "the watcher's check failed; it runs again in %gs", self.settings.watch_interval_s
                )

    async def probe_backends(self) -> None:
        names = self.backends.names
        results = await asyncio.gather(*(self.backends.probe(n) for n in names))
        for name, (ok, reason, detail) in zip(names, results, strict=True):
            if ok:
                self.upstream_ok(name)
            elif reason is not None:
                self.upstream_fault(name, UpstreamFault(reason, detail))

    def upstream_fault(self, name: str, fault: UpstreamFault) -> None:
        """One fault of a backend: counted by reason; the K-th in a row takes it out of rotation."""
        self.metrics.upstream_errors.labels(name, fault.reason).inc()
        if self.backends.fault(name, fault.detail):
            self.router.set_up(name, False)
            self.metrics.variant_up.labels(name).set(0)

    def upstream_ok(self, name: str) -> None:
        if self.backends.success(name):
            self.router.set_up(name, True)
            self.metrics.variant_up.labels(name).set(1)

    def health(self) -> dict[str, Any]:
        """Every variant: kind, up, error rate, p50/p95 latency and requests of its window."""
        variants = {}
        for name in self.router.variants:
            stats = self.router.health(name)
            variants[name] = {
                "kind": self.router.kind(name),
                "up": self.router.is_up(name),
                **{k: stats[k] for k in ("requests", "error_rate", "p50_latency_s", "p95_latency_s")},
                **(self.backends.describe(name) if name in self.backends else {}),
            }
        aliases = {
            name: {"shares": alias["shares"], "baseline": alias["baseline"]}
            for name, alias in self.router.describe().items()
        }
        return {
            "queue_depth": self.queue_depth,
            "adapters": self.router.adapters,
            "variants": variants,
            "aliases": aliases,
        }

    def model_list(self) -> ModelList:
        cards = [
            ModelCard(id=n, created=self.started, kind=self.router.kind(n)) for n in self.router.variants
        ]
        cards += [ModelCard(id=n, created=self.started, kind="alias") for n in self.router.aliases]
        return ModelList(data=cards)

    def route(self, model: str, user: str | None) -> _Route:
        try:
            adapter, alias = self.router.resolve(model, user)
        except KeyError:
            raise not_found(model, [*self.router.variants, *self.router.aliases]) from None
        except VariantDown as down:
            # The client's 503 counts in /metrics, not in the watcher's window: the variant is down already.
            self.metrics.observe(down.variant, down.alias, None, error_status=503)
            raise variant_down(down.variant, down.alias) from None
        served = adapter if adapter is not None else str(self.router.base_name)
        return _Route(adapter, alias, served, backend=served in self.backends)

    def failover(self, route: _Route, err: proxy.Unanswered) -> _Route:
        """Where a request goes whose backend refused the connection (so never saw it): its alias's
        baseline, if that is another variant and up; otherwise the error stands."""
        baseline = self.router.baseline(route.alias) if route.alias else None
        if not err.unsent or baseline is None or baseline == route.served or not self.router.is_up(baseline):
            raise err
        log.warning(
            "variant '%s' unreachable; alias '%s' request sent to baseline '%s'",
            route.served,
            route.alias,
            baseline,
        )
        adapter = None if baseline == self.router.base_name else baseline
        return _Route(adapter, route.alias, baseline, backend=baseline in self.backends)

    async def dispatch(
        self, request: Request, schema: type[ChatCompletionRequest] | type[CompletionRequest], path: str
    ) -> Response:
        """Parse, route, then validate with the same schema and limits whoever answers (a backend
        also takes its typed pass-through parameters): every client mistake is tunelab's own 4xx and
        never reaches a backend, where it could be a 5xx counted against the variant."""
        raw = await request.body()  # at most --max-body-mb: BodyLimit refuses more
        data = await _parse_body(raw)
        started = time.monotonic()
        route = None
        user = request.headers.get(USER_HEADER)
        if isinstance(data, dict):
            user = data.get("user") if isinstance(data.get("user"), str) else user
            if isinstance(data.get("model"), str):
                route = self._route_known(data["model"], user)
        backend = route is not None and route.backend
        body = self._validate(data, BACKEND_SCHEMAS[schema] if backend else schema, route, started)
        if not backend:
            return await self.complete(body, request, route)
        sent = self._backend_request(data, body, route, started)
        try:
            return await proxy.forward(self, route, sent, path, user)
        except proxy.Unanswered as err:
            return await self._failed_over(request, schema, route, err, (sent, path, user), started)

    def _route_known(self, model: str, user: str | None) -> _Route | None:
        """The route of a request's model; None for an unknown one (reported after validation)."""
        try:
            return self.route(model, user)
        except APIError as err:
            if err.status != 404:  # a down variant
                raise
        return None

    def _validate(
        self, data: Any, schema: type[BaseModel], route: _Route | None, started: float
    ) -> ChatCompletionRequest | CompletionRequest:
        try:
            body = schema.model_validate(data)
            if body.n != 1:
                raise APIError(
                    400, f"n={body.n}: this server returns one choice per request; send n=1", param="n"
                )
            if isinstance(body, BackendChatRequest | BackendCompletionRequest):
                _check_backend_body(body)
        except ValidationError as err:
            if route is not None:
                self.record(route, started, 400)
            raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors()]) from None
        except APIError as err:
            if route is not None:
                self.record(route, started, err.status)
            err.headers.update(route.headers if route else {})
            raise
        return body

    def _backend_request(
        self,
        data: dict[str, Any],
        body: ChatCompletionRequest | CompletionRequest,
        route: _Route,
        started: float,
    ) -> dict[str, Any]:
        """The client's JSON as it goes upstream: ``--max-tokens-limit`` holds for backends too, so a
        request that names no limit gets the built-in engine's default."""
        requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
        try:
            allowed = check_max_tokens(requested, self.settings.max_tokens_limit)
        except APIError as err:
            self.record(route, started, err.status)
            err.headers.update(route.headers)
            raise
        return data if requested is not None else {**data, "max_tokens": allowed}

    async def _failed_over(
        self,
        request: Request,
        schema: type[ChatCompletionRequest] | type[CompletionRequest],
        route: _Route,
        err: proxy.Unanswered,
        sent: tuple[dict[str, Any], str, str | None],
        started: float,
    ) -> Response:
        """A backend gave no answer: the client sees the baseline's answer where the request can go
        there (the fault still enters the backend's window), else the 502/504."""
        try:
            baseline = self.failover(route, err)
        except proxy.Unanswered:
            self.record(route, started, err.status)
            raise
        self.router.observe(route.adapter, False, time.monotonic() - started, alias=route.alias)
        if not baseline.backend:
            return await self.complete(self._validate(sent[0], schema, baseline, started), request, baseline)
        try:
            return await proxy.forward(self, baseline, *sent)
        except proxy.Unanswered as again:
            self.record(baseline, started, again.status)
            raise

    async def complete(
        self, body: ChatCompletionRequest | CompletionRequest, request: Request, route: _Route | None = None
    ) -> Response:
        """Route (unless already routed), queue and answer one validated chat or text completion."""
        started = time.monotonic()
        user = body.user or request.headers.get(USER_HEADER)
        route = route or self.route(body.model, user)
        try:
            job, events = await self._job(body, route)
            self.engine.submit(job)
        except APIError as err:
            err.headers.update(route.headers)
            self.record(route, started, err.status)
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
                logged=(body, user),
            )
            return StreamingResponse(sse, media_type="text/event-stream", headers=route.headers)
        event = await self._final_event(job, events)
        if isinstance(event, Failed):
            self.record(route, started, event.error.status)
            event.error.headers.update(route.headers)
            raise event.error
        self.record(route, started, None, (event.prompt_tokens, event.completion_tokens))
        self._finished(route, response_id, event, body, user)
        payload = (
            _chat_response(response_id, route.served, event, tools)
            if chat
            else _text_response(response_id, route.served, event)
        )
        return JSONResponse(payload.model_dump(), headers=route.headers)

    def _encode(
        self, body: ChatCompletionRequest | CompletionRequest, route: _Route
    ) -> tuple[list[int], int]:
        """The request's prompt ids and its max_tokens, or a 400 naming the endpoint's prompt field.
        Runs in a worker thread: templating and tokenising a long prompt take time."""
        try:
            if isinstance(body, ChatCompletionRequest):
                messages = template_messages(body.messages)
                prompt_ids = self.engine.encode_chat(messages, route.adapter, tools=body.active_tools())
            else:
                prompt_ids = self.engine.encode_text(body.prompt_text())
            if not prompt_ids:  # generate() has nothing to continue from; it would fail inside torch
                raise APIError(
                    400,
                    "the prompt is empty and this model's tokenizer adds no start token, so there is "
                    "nothing to continue; send at least some text",
                    param="messages",
                )
            requested = getattr(body, "max_completion_tokens", None) or body.max_tokens
            return prompt_ids, self.engine.resolve_max_tokens(len(prompt_ids), requested)
        except ValueError as err:  # content parts we cannot read, or a template that rejects the turns/tools
            raise APIError(400, str(err), param=getattr(err, "param", None) or _prompt_param(body)) from None
        except APIError as err:
            if err.param == "messages":  # the engine does not know which endpoint asked
                err.param = _prompt_param(body)
            raise

    async def _job(
        self, body: ChatCompletionRequest | CompletionRequest, route: _Route
    ) -> tuple[Job, asyncio.Queue]:
        """The engine job for a request, and the queue its events arrive on (on this event loop)."""
        prompt_ids, max_tokens = await asyncio.to_thread(self._encode, body, route)
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
        logged: tuple[ChatCompletionRequest | CompletionRequest, str | None],
    ) -> AsyncIterator[str]:
        """Server-sent events: one chunk per text delta, a final chunk with finish_reason, [DONE].

        With tools, content streams up to the first ``<tool_call>``; the calls (and any content
        after them) come in one chunk once generation has ended, then the finish chunk."""
        chunk = _ChunkMaker(response_id, route.served, chat)
        tool_stream = ToolCallStream() if tools else None
        status: int | None = 0
        token_times: list[float] = []
        try:
            if chat:
                yield chunk.role()
            while True:
                event = await self._next_event(job, events)
                if isinstance(event, Delta):
                    token_times.append(time.monotonic())
                    if text := (tool_stream.feed(event.text) if tool_stream else event.text):
                        yield chunk.text(text)
                    continue
                if isinstance(event, Failed):
                    status = event.error.status
                    yield _sse_data(event.error.body())
                else:
                    # Complete before the last chunks go out: a client may close right after [DONE]
                    # and post feedback for this id at once.
                    status = None
                    self._finished(route, response_id, event, *logged)
                    tokens = (event.prompt_tokens, event.completion_tokens)
                    self.record(route, started, None, tokens, token_times)
                    for line in chunk.ending(event, tool_stream):
                        yield line
                    if include_usage:
                        yield chunk.usage(event)
                break
            yield "data: [DONE]\n\n"
        finally:
            if status == 0:  # the client disconnected mid-stream
                job.cancelled.set()
                status = 499
            if status is not None:
                self.record(route, started, status)

    def record(
        self,
        route: _Route,
        started: float,
        error_status: int | None,
        tokens: tuple[int, int] = (0, 0),
        token_times: list[float] | None = None,
    ) -> None:
        """One request's outcome as its client saw it, once per request; the watcher's window only
        for answers and the variant's own faults (a client's 4xx or disconnect says nothing about the
        variant). ``token_times``: when each streamed token arrived, for TTFT and inter-token latency."""
        latency = time.monotonic() - started
        self.metrics.observe(route.served, route.alias, latency, error_status=error_status, tokens=tokens)
        if token_times:
            self.metrics.observe_tokens(route.served, route.alias, started, token_times)
        if error_status is None or variant_fault(error_status):
            self.router.observe(route.adapter, error_status is None, latency, alias=route.alias)

    def _finished(
        self,
        route: _Route,
        response_id: str,
        done: Done,
        body: ChatCompletionRequest | CompletionRequest,
        user: str | None,
    ) -> None:
        """A built-in answer is complete: remember it for feedback and log it."""
        tokens = (done.prompt_tokens, done.completion_tokens)
        answer = proxy.Answer(response_id, done.text, done.finish_reason, tokens)
        self.completed(route, answer, body.model_dump(exclude_unset=True, exclude_none=True), user)

    def completed(self, route: _Route, answer: proxy.Answer, data: dict[str, Any], user: str | None) -> None:
        """Any completed answer (built-in or backend, streamed or not): remembered and logged."""
        if answer.id is None:
            return
        self._responses[answer.id] = (route.served, route.alias)
        while len(self._responses) > REMEMBERED_RESPONSES:
            self._responses.popitem(last=False)
        if self.log is None:
            return
        text_prompt = data.get("prompt")
        self.log.request(
            id=answer.id,
            alias=route.alias,
            variant=route.served,
            user=user,
            messages=data.get("messages") if text_prompt is None else None,
            prompt=(text_prompt[0] if isinstance(text_prompt, list) and text_prompt else text_prompt),
            response=answer.text,
            finish_reason=answer.finish_reason,
            sampling={k: data[k] for k in SAMPLING_FIELDS if data.get(k) is not None},
        )

    def feedback(self, body: FeedbackRequest) -> dict[str, Any]:
        """A score for a response (by id: its variant and alias) or for a variant by name."""
        if (body.id is None) == (body.adapter is None):
            raise APIError(400, "give exactly one of 'id' (a response id) or 'adapter'", param="id")
        alias = None
        if body.id is not None:
            if body.id not in self._responses:
                raise APIError(
                    404, f"no recent response with id '{body.id}'", param="id", code="unknown_response"
                )
            variant, alias = self._responses[body.id]
        else:
            variant = str(body.adapter)
        try:
            self.router.feedback(variant, body.score)
        except KeyError:
            raise APIError(404, f"no variant named '{variant}' is served", param="adapter") from None
        if self.log is not None:
            self.log.feedback(id=body.id, alias=alias, variant=variant, score=body.score, user=body.user)
        return {
            "adapter": variant,
            "alias": alias,
            "score": body.score,
            "health": self.router.health(variant),
        }

    async def load_adapter(self, body: AdapterLoadRequest) -> dict[str, Any]:
        if self.engine is None:
            raise APIError(
                400, "this server has no local model (backends only); adapters need --base", param="path"
            )
        try:
            self.router.check_name_free(body.name)
            # Loading waits for the model lock, i.e. for the request being generated, so off the event loop.
            loaded = await asyncio.to_thread(self.engine.load_adapter, body.name, body.path)
            self.router.add_adapter(body.name)
            self.metrics.variant_up.labels(body.name).set(1)
        except (OSError, ValueError) as err:
            raise APIError(400, str(err), param="path") from None
        return {"name": loaded.name, "path": str(loaded.path)}

    async def unload_adapter(self, name: str) -> dict[str, Any]:
        if self.engine is None:
            raise APIError(404, f"no adapter named '{name}' is loaded (backends only)", param="name")
        try:
            self.router.remove_adapter(name)
        except KeyError:
            raise APIError(404, f"no adapter named '{name}' is loaded", param="name") from None
        except ValueError as err:
            raise APIError(409, str(err), param="name", code="adapter_in_use") from None
        await asyncio.to_thread(self.engine.unload_adapter, name)
        return {"unloaded": name}


def _check_backend_body(body: BackendChatRequest | BackendCompletionRequest) -> None:
    """What the built-in engine checks as it reads a prompt, for a backend's request: one prompt
    string; text content parts only, each ``tool`` message answering a call of the turn before."""
    try:
        if isinstance(body, BackendChatRequest):
            template_messages(body.messages)
        else:
            body.prompt_text()
    except ValueError as err:
        raise APIError(400, str(err), param=getattr(err, "param", None) or _prompt_param(body)) from None


async def _parse_body(raw: bytes) -> Any:
    """The body as JSON, parsed off the event loop (megabytes of JSON would stall /health); FastAPI's
    own validation error for a body that is not JSON."""
    try:
        return await asyncio.to_thread(parse_json, raw)
    except ValueError as err:
        pos = getattr(err, "pos", 0)
        error = {"type": "json_invalid", "loc": ("body", pos), "msg": "JSON decode error", "input": {}}
        raise RequestValidationError([{**error, "ctx": {"error": getattr(err, "msg", str(err))}}]) from None


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

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, err: BodyTooLarge) -> JSONResponse:
        return err.response()

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, _: ClientDisconnect) -> Response:
        # Nobody is left to answer; one line, no traceback (it is the client's doing, not a fault).
        log.info(
            "client went away before sending the whole body of %s %s (499)", request.method, request.url.path
        )
        return Response(status_code=499)

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
