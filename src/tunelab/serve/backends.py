"""OpenAI-compatible upstreams (llama.cpp's server, vLLM, Ollama, TGI, another tunelab serve) as variants.

A backend is a name, the upstream's OpenAI base URL and the model name to send it. :class:`Backends`
holds one shared ``httpx.AsyncClient`` (pooled connections, so a proxied request costs no new TCP
handshake), counts each backend's consecutive faults and marks it down after ``max_failures`` of
them; a probe of ``/health`` (or ``/v1/models`` where the upstream has no ``/health``) brings it back.
Only the upstream's own faults count: no connection (``connect``), a connection dropped mid-request
or mid-answer (``disconnect``), a timeout, a 5xx, or a 2xx that is no completion (``bad_response``). A 4xx is the client's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import httpx

log = logging.getLogger("tunelab.serve")
DEFAULT_MAX_FAILURES = 3
FAULT_REASONS = ("connect", "disconnect", "timeout", "http_5xx", "bad_response")


@dataclass(frozen=True)
class BackendSpec:
    """One upstream: ``url`` is its OpenAI base URL ending in ``/v1``; ``model`` the name to send it
    (None: the first id its ``/v1/models`` lists); ``api_key_env`` names the variable holding its key."""

    name: str
    url: str
    model: str | None = None
    api_key_env: str | None = None

    @property
    def root(self) -> str:
        """The server's root (where ``/health`` lives): the URL without its ``/v1``."""
        return self.url.removesuffix("/v1")


def normalise_url(url: str, *, where: str) -> str:
    """``http://host:8000``, ``http://host:8000/``, ``http://host:8000/v1/`` → ``http://host:8000/v1``."""
    url = url.strip()
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1].strip("/")) == 0:
        raise ValueError(f"{where}: {url!r} is not an http(s) URL; write e.g. http://127.0.0.1:8080/v1")
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def parse_backend(text: str) -> BackendSpec:
    """``NAME=URL`` or ``NAME=MODEL@URL`` (the model name may itself hold ``/`` or ``@``)."""
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name or not rest:
        raise ValueError(
            f"--backend {text!r}: write NAME=URL or NAME=MODEL@URL, e.g. tuned=http://127.0.0.1:8080/v1"
        )
    model = None
    for scheme in ("@http://", "@https://"):
        if scheme in rest:
            model, _, url = rest.rpartition(scheme)
            rest = scheme[1:] + url
            break
    if model is not None and not model:
        raise ValueError(f"--backend {text!r}: the model name before '@' is empty; write NAME=MODEL@URL")
    return BackendSpec(name, normalise_url(rest, where=f"--backend {text!r}"), model)


class UpstreamFault(Exception):
    """A fault of the upstream's own: ``reason`` is one of :data:`FAULT_REASONS`; ``unsent`` when the
    request surely never reached it (the connection was refused), so another variant may take it."""

    def __init__(self, reason: str, detail: str, *, unsent: bool = False) -> None:
        super().__init__(detail)
        self.reason, self.detail, self.unsent = reason, detail, unsent


@dataclass
class BackendState:
    spec: BackendSpec
    upstream_model: str | None = None
    up: bool = True
    failures: int = 0
    last_error: str | None = None
    has_health: bool = True
    """False once ``/health`` answered 404/405: probes go to ``/v1/models`` instead."""
    key: str | None = field(default=None, repr=False)


class Backends:
    """Every backend's state and the one HTTP client they share."""

    def __init__(
        self, specs: list[BackendSpec], *, timeout_s: float = 60.0, max_failures: int = DEFAULT_MAX_FAILURES
    ) -> None:
        self.timeout_s, self.max_failures = timeout_s, max_failures
        self.states = {s.name: BackendState(s, s.model, key=_key_of(s)) for s in specs}
        self._client: httpx.AsyncClient | None = None

    @property
    def names(self) -> list[str]:
        return sorted(self.states)

    def __contains__(self, name: object) -> bool:
        return name in self.states

    @property
    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # Connect fast (a dead upstream is found in seconds), read as long as a request may take.
            timeout = httpx.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s))
            limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
            # No Nagle: a request's headers and body go out as separate small writes, and waiting for
            # the upstream's delayed ACK of the first would add ~40 ms to every proxied request.
            nodelay = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
            transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=nodelay)
            self._client = httpx.AsyncClient(timeout=timeout, transport=transport)
        return self._client

    async def start(self) -> None:
        """Learn the upstream model name of every backend that was given none (in parallel)."""
        await asyncio.gather(*(self.discover(n) for n, s in self.states.items() if s.upstream_model is None))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def headers(self, name: str) -> dict[str, str]:
        key = self.states[name].key
        return {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}

    async def discover(self, name: str) -> bool:
        """Fetch ``/v1/models`` and take its first id as the model to send; False if unreachable."""
        state = self.states[name]
        try:
            response = await self.client.get(f"{state.spec.url}/models", headers=self.headers(name))
            response.raise_for_status()
            state.upstream_model = response.json()["data"][0]["id"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as err:
            log.warning("backend '%s': could not list models at %s/models: %s", name, state.spec.url, err)
            return False
        log.info("backend '%s': %s serves model '%s'", name, state.spec.url, state.upstream_model)
        return True

    def body(self, name: str, data: dict[str, Any]) -> bytes:
        """The request as the upstream gets it: only ``model`` differs from what the client sent."""
        return json.dumps({**data, "model": self.states[name].upstream_model}).encode()

    async def send(self, name: str, path: str, data: dict[str, Any], *, stream: bool) -> httpx.Response:
        """POST to the upstream; a connection error or timeout raises :class:`UpstreamFault`.

        With ``stream`` the body is left unread: the caller reads it and closes the response."""
        state = self.states[name]
        if state.upstream_model is None and not await self.discover(name):
            raise UpstreamFault("connect", f"backend '{name}' did not list its models", unsent=True)
        request = self.client.build_request(
            "POST", f"{state.spec.url}{path}", content=self.body(name, data), headers=self.headers(name)
        )
        try:
            return await self.client.send(request, stream=stream)
        except httpx.TimeoutException as err:
            raise UpstreamFault("timeout", f"backend '{name}' timed out ({type(err).__name__})") from None
        except httpx.ConnectError as err:  # refused before anything was sent
            detail = f"backend '{name}' unreachable ({type(err).__name__})"
            raise UpstreamFault("connect", detail, unsent=True) from None
        except httpx.TransportError as err:  # the connection broke once the request was on its way
            detail = f"backend '{name}' dropped the connection ({type(err).__name__})"
            raise UpstreamFault("disconnect", detail) from None

    def fault(self, name: str, detail: str) -> bool:
        """Count one fault; True when this one marks the backend down."""
        state = self.states[name]
        state.failures += 1
        state.last_error = detail
        if state.up and state.failures >= self.max_failures:
            state.up = False
            log.warning("backend '%s' is down after %d faults in a row: %s", name, state.failures, detail)
            return True
        return False

    def success(self, name: str) -> bool:
        """A good answer or probe; True when it brings a down backend back."""
        state = self.states[name]
        state.failures = 0
        if not state.up:
            state.up = True
            log.info("backend '%s' is up again", name)
            return True
        return False

    async def probe(self, name: str) -> tuple[bool, str | None, str]:
        """(ok, fault reason, detail) of one health probe: ``/health``, else ``/v1/models``."""
        state = self.states[name]
        try:
            response = None
            if state.has_health:
                response = await self.client.get(f"{state.spec.root}/health", headers=self.headers(name))
            if response is None or response.status_code in (404, 405):
                # No /health here (llama-cpp-python's server): ask /v1/models from now on, one request
                # per probe instead of a 404 and a retry every few seconds in both servers' logs.
                state.has_health = False
                response = await self.client.get(f"{state.spec.url}/models", headers=self.headers(name))
        except httpx.TimeoutException:
            return False, "timeout", f"backend '{name}' health probe timed out"
        except httpx.TransportError as err:
            return False, "connect", f"backend '{name}' unreachable: {err or type(err).__name__}"
        if response.status_code >= 500:
            return False, "http_5xx", f"backend '{name}' health probe answered {response.status_code}"
        if state.upstream_model is None and response.is_success:
            await self.discover(name)
        return response.is_success, None, f"health probe answered {response.status_code}"

    def describe(self, name: str) -> dict[str, Any]:
        """What unauthenticated ``/health`` may show: no URL, model path or error text (they can name
        internal hosts and files; the server log has them)."""
        return {"consecutive_faults": self.states[name].failures}


def _key_of(spec: BackendSpec) -> str | None:
    if spec.api_key_env is None:
        return None
    key = os.environ.get(spec.api_key_env)
    if not key:
        raise ValueError(
            f"backend '{spec.name}': api_key_env names ${spec.api_key_env}, which is not set; export it "
            "or drop api_key_env"
        )
    return key
