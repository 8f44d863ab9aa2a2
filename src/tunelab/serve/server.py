"""Build an engine, router and app from command-line style settings, and run it under uvicorn."""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.backends import DEFAULT_MAX_FAILURES, Backends, BackendSpec
from tunelab.serve.engine import Engine
from tunelab.serve.limits import DEFAULT_MAX_BODY_MB, body_bytes
from tunelab.serve.routing import Router, WatchPolicy
from tunelab.serve.security import allowed_hosts, check_bind


@dataclass
class ServeConfig:
    """Everything ``tunelab serve`` takes, already parsed."""

    base: str | None = None
    adapters: dict[str, str | Path] = field(default_factory=dict)
    aliases: dict[str, dict[str, float]] = field(default_factory=dict)
    rollouts: dict[str, list[float]] = field(default_factory=dict)
    rollout_every: int = 50
    policy: WatchPolicy = field(default_factory=WatchPolicy)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    queue_size: int = 64
    request_timeout_s: float = 60.0
    max_tokens_limit: int = 1024
    max_batch: int = 16
    backends: dict[str, BackendSpec] = field(default_factory=dict)
    backend_failures: int = DEFAULT_MAX_FAILURES
    watch_interval_s: float = 5.0
    log_dir: Path | None = None
    max_body_mb: float = DEFAULT_MAX_BODY_MB
    allow_hosts: list[str] = field(default_factory=list)


def build_app(config: ServeConfig) -> Any:
    """Load the model and adapters (unless only backends are served), set up the aliases, and
    return the FastAPI app."""
    unknown = sorted(set(config.rollouts) - set(config.aliases))
    if unknown:
        raise ValueError(f"--rollout names alias(es) {unknown} that no --alias defines")
    engine = None
    if config.base is not None or config.adapters or not config.backends:
        engine = Engine.load(
            config.base,
            config.adapters,
            device=config.device,
            dtype=config.dtype,
            queue_size=config.queue_size,
            max_tokens_limit=config.max_tokens_limit,
            max_batch=config.max_batch,
        )
    backends = Backends(
        list(config.backends.values()),
        timeout_s=config.request_timeout_s,
        max_failures=config.backend_failures,
    )
    router = Router(
        engine.base_name if engine else None, list(engine.adapters) if engine else [], config.policy,
        backends=backends.names,
    )  # fmt: skip
    for name, shares in config.aliases.items():
        router.set_alias(name, shares, rollout=config.rollouts.get(name), rollout_every=config.rollout_every)
    settings = ServeSettings(
        api_key=config.api_key,
        request_timeout_s=config.request_timeout_s,
        watch_interval_s=config.watch_interval_s,
        log_dir=config.log_dir,
        max_body_bytes=body_bytes(config.max_body_mb),
        allowed_hosts=allowed_hosts(config.host, config.allow_hosts),
        max_tokens_limit=config.max_tokens_limit,
    )
    return create_app(engine, router, settings, backends)


def serve(config: ServeConfig) -> None:
    """Run the server in the foreground until interrupted; refuses a network bind without a key."""
    import uvicorn  # noqa: PLC0415

    check_bind(config.host, config.api_key)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s %(message)s")
    # httpx logs every request at INFO: the watcher's probes alone would be lines a minute per backend.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    uvicorn.run(build_app(config), host=config.host, port=config.port, log_level="info")


class BackgroundServer:
    """A real uvicorn server on 127.0.0.1 and a free port, in a thread: for tests and benchmarks.

    ``with BackgroundServer(app) as server: OpenAI(base_url=server.url + "/v1")``.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        import uvicorn  # noqa: PLC0415

        self.app, self.host = app, host
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((host, 0))
        self.port = self._socket.getsockname()[1]
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
