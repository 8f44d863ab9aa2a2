"""One generation client for every command that makes data: a local model or an OpenAI-compatible endpoint.

``open_generator(model)`` loads any tunelab model spec (hub id, directory, ``.gguf``, ``asset:NAME``,
``tiny:llama``, a run directory or its ``final/``) and generates in left-padded batches;
``open_generator(model, endpoint=URL)`` talks to any OpenAI-compatible server (``tunelab serve``,
vLLM, llama.cpp, Ollama) through the official ``openai`` client, ``concurrency`` requests at a time,
retrying connection errors, 429 and 5xx with exponential back-off (never another 4xx: the request
itself is wrong and would fail again).

Both sit behind one cache: an answer is stored under the sha256 of (generator name, conversation,
settings), so a re-run with the same inputs costs no model call and gives the same rows. Candidates
that must differ for one prompt use different ``GenSettings.seed`` values.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console

from tunelab.console import make_console, progress

Conversation = list[dict[str, str]]
CACHE_FILE = "generations.sqlite"
MAX_API_STOPS = 4  # the OpenAI API takes at most four stop strings; the rest are applied here


@dataclass(frozen=True)
class GenSettings:
    """Sampling settings; part of the cache key. ``temperature`` 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}


class Generator(Protocol):
    name: str

    def chat(
        self, conversations: list[Conversation], settings: GenSettings, *, desc: str = "generating"
    ) -> list[str]: ...


class GenerationError(RuntimeError):
    """Generation cannot go on for a reason the user can fix (bad model spec, unreachable endpoint)."""


def default_cache_dir() -> Path:
    from tunelab.assets import tunelab_home  # noqa: PLC0415

    return tunelab_home() / "cache" / "generate"


def cache_key(name: str, conversation: Conversation, settings: GenSettings) -> str:
    payload = {"model": name, "messages": conversation, "settings": settings.to_dict()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class GenerationCache:
    """Answers by cache key in one sqlite file (safe for several processes sharing a cache dir)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / CACHE_FILE
        self._db = sqlite3.connect(self.path, timeout=30)
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, answer TEXT NOT NULL)")
        self._db.commit()

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        unique = sorted(set(keys))
        for start in range(0, len(unique), 500):  # sqlite caps the number of bound parameters
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, answer FROM answers WHERE key IN ({marks})", chunk)
            found.update(dict(rows.fetchall()))
        return found

    def put_many(self, items: dict[str, str]) -> None:
        self._db.executemany("INSERT OR REPLACE INTO answers VALUES (?, ?)", list(items.items()))
        self._db.commit()  # after every batch, so an interrupted run keeps what it paid for


class Backend(Protocol):
    """Yields (positions, answers) as batches finish, for ``conversations`` in order of position."""

    def generate(
        self, conversations: list[Conversation], settings: GenSettings
    ) -> Iterator[tuple[list[int], list[str]]]: ...


def model_fingerprint(spec: str) -> str:
    """What the cache keys a local model by: its spec, plus the size and time of its files when it is a
    path, so a directory retrained in place (a run re-run under the same name) misses the cache."""
    path = Path(spec).expanduser()
    if not path.exists():
        return spec
    files = [path] if path.is_file() else [*path.glob("*"), *path.glob("final/*")]
    stats = sorted(
        (str(f.relative_to(path.parent)), f.stat().st_size, f.stat().st_mtime_ns)
        for f in files
        if f.is_file()
    )
    return f"{spec}@{hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]}"


class CachedGenerator:
    """A backend behind the cache, with a progress bar (plain lines off a terminal) and a rows/s line."""

    def __init__(
        self,
        name: str,
        backend: Backend,
        cache: GenerationCache | None,
        console: Console,
        *,
        key_name: str = "",
    ) -> None:
        self.name, self.backend, self.cache, self.console = name, backend, cache, console
        self.key_name = key_name or name
        self.model_calls = 0  # conversations actually sent to the model (cache hits excluded)

    def chat(
        self, conversations: list[Conversation], settings: GenSettings, *, desc: str = "generating"
    ) -> list[str]:
        keys = [cache_key(self.key_name, c, settings) for c in conversations]
        answers = self.cache.get_many(keys) if self.cache else {}
        todo = list({k: i for i, k in reversed(list(enumerate(keys))) if k not in answers}.items())
        todo.sort(key=lambda item: item[1])
        start, hits = time.monotonic(), sum(k in answers for k in keys)
        with progress(self.console, f"{desc} ({self.name})", len(conversations)) as advance:
            advance(hits)
            pending = [conversations[i] for _, i in todo]
            for positions, texts in self.backend.generate(pending, settings):
                fresh = {todo[p][0]: text for p, text in zip(positions, texts, strict=True)}
                answers.update(fresh)
                if self.cache is not None:
                    self.cache.put_many(fresh)
                self.model_calls += len(fresh)
                advance(sum(1 for k in keys if k in fresh))
        self._summary(desc, len(conversations), hits, len(todo), time.monotonic() - start)
        return [answers[k] for k in keys]

    def _summary(self, desc: str, total: int, hits: int, generated: int, seconds: float) -> None:
        rate = generated / seconds if seconds > 0 else 0.0
        self.console.print(
            f"{desc}: {total} rows, {hits} from the cache, {generated} generated in {seconds:.1f} s "
            f"({rate:.1f} rows/s)"
        )


def _finish_text(text: str, stops: tuple[str, ...]) -> str:
    from tunelab.serve.engine import truncate_at_stop  # noqa: PLC0415

    return truncate_at_stop(text, list(stops))[0].strip()


def _batch_seed(seed: int, conversations: list[Conversation]) -> int:
    """A seed per batch that depends on its contents, so a batch samples the same whatever ran before."""
    digest = hashlib.sha256(json.dumps([seed, conversations], sort_keys=True).encode()).hexdigest()
    return int(digest[:15], 16)


class LocalBackend:
    """A transformers model (or a tunelab run) generating in left-padded batches, seeded per batch."""

    def __init__(self, spec: str, *, batch_size: int, device: str, dtype: str) -> None:
        from tunelab.evaluate.efficiency import stop_token_ids  # noqa: PLC0415
        from tunelab.evaluate.run import load_for_eval  # noqa: PLC0415

        try:
            self.model, self.tokenizer = load_for_eval(spec, device=device, dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise GenerationError(f"cannot load model {spec!r}: {err}") from err
        self.model.eval()
        self.batch_size = max(1, batch_size)
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.context = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None

    def generate(
        self, conversations: list[Conversation], settings: GenSettings
    ) -> Iterator[tuple[list[int], list[str]]]:
        for start in range(0, len(conversations), self.batch_size):
            batch = conversations[start : start + self.batch_size]
            yield list(range(start, start + len(batch))), self._batch(batch, settings)

    def _prompt_ids(self, conversation: Conversation, max_new: int) -> list[int]:
        from tunelab.data.templates import encode_prompt  # noqa: PLC0415

        ids = encode_prompt(self.tokenizer, conversation)
        budget = max(1, self.context - max_new) if self.context else len(ids)
        return ids[-budget:]  # keep the end: the generation prompt and the request itself

    def _batch(self, batch: list[Conversation], settings: GenSettings) -> list[str]:
        import torch  # noqa: PLC0415

        max_new = min(settings.max_tokens, max(1, (self.context or settings.max_tokens + 1) - 1))
        prompts = [self._prompt_ids(c, max_new) for c in batch]
        width, pad = max(map(len, prompts)), self.tokenizer.pad_token_id or 0
        device = next(self.model.parameters()).device
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        sampling: dict[str, Any] = {"do_sample": False}
        if settings.temperature > 0:
            sampling = {
                "do_sample": True,
                "temperature": settings.temperature,
                "top_p": settings.top_p,
                "top_k": 0,
            }
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(_batch_seed(settings.seed, batch))
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new, pad_token_id=pad,
                eos_token_id=self.stop_ids or None, **sampling,
            )  # fmt: skip
        return [self._decode(row[width:].tolist(), settings) for row in out]

    def _decode(self, new: list[int], settings: GenSettings) -> str:
        for i, token in enumerate(new):
            if token in self.stop_ids:
                new = new[:i]
                break
        return _finish_text(self.tokenizer.decode(new, skip_special_tokens=True), settings.stop)


RETRYABLE_STATUS = 500  # and 429: overload and server faults pass; any other 4xx is the request's fault
DEFAULT_TIMEOUT_S = (
    120.0  # seconds one request may take (--timeout); a long CPU answer fits, a dead server fails
)


class EndpointBackend:
    """An OpenAI-compatible chat endpoint, ``concurrency`` requests at a time, with retries and back-off.

    Every answer is read from the raw response and checked: one that is not JSON (an HTML page, a
    proxy's error text) or has no message is a :class:`GenerationError` naming the endpoint and what
    it sent. A request that takes longer than ``timeout_s`` fails at once (the user's own limit is
    not retried); workers are daemon threads, so Ctrl-C never waits for requests in flight."""

    def __init__(
        self,
        url: str,
        model: str | None,
        *,
        api_key: str | None,
        concurrency: int,
        retries: int,
        sleep: Callable[[float], None] = time.sleep,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        from openai import OpenAI  # noqa: PLC0415

        self.url, self.retries, self.sleep, self.timeout_s = url, max(0, retries), sleep, timeout_s
        self.concurrency = max(1, concurrency)
        key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"  # local servers often take none
        self.client = OpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout_s)
        self.model = model or self._first_model()

    def _first_model(self) -> str:
        raw = self._with_retries(lambda: self.client.models.with_raw_response.list())
        data = self._json(raw, "the model list")
        listed = data.get("data") if isinstance(data, dict) else None
        models = [m["id"] for m in listed or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        if not isinstance(listed, list):
            raise GenerationError(
                f"the endpoint {self.url} answered the model list without a 'data' list "
                f"({_snippet(json.dumps(data))}); name the model with --model"
            )
        if not models:
            raise GenerationError(f"the endpoint {self.url} lists no models; name one with --model")
        return models[0]

    def _with_retries(self, call: Callable[[], Any]) -> Any:
        import openai  # noqa: PLC0415

        for attempt in range(self.retries + 1):
            try:
                return call()
            except openai.APITimeoutError as err:
                raise GenerationError(
                    f"the endpoint {self.url} did not answer within {self.timeout_s:g} s (--timeout); "
                    "check that the server is up, or raise --timeout for a slow model"
                ) from err
            except (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError) as err:
                if attempt == self.retries:
                    raise GenerationError(_endpoint_failure(self.url, err, attempt + 1)) from err
                self.sleep(min(30.0, 0.5 * 2**attempt))
            except openai.APIStatusError as err:
                raise GenerationError(_endpoint_failure(self.url, err, attempt + 1)) from err
        raise AssertionError("unreachable")

    def _json(self, raw: Any, what: str) -> Any:
        """The JSON body of a successful answer, or an error naming the endpoint and what it sent."""
        try:
            return json.loads(raw.text)
        except ValueError:
            kind = (raw.headers.get("content-type") or "no content type").split(";")[0].strip()
            raise GenerationError(
                f"the endpoint {self.url} answered {what} with {kind}, not JSON ({_snippet(raw.text)}); "
                "--endpoint must be an OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1"
            ) from None

    def _content(self, data: Any) -> str:
        """The first choice's message text of a chat completion (checked, never assumed)."""
        choices = data.get("choices") if isinstance(data, dict) else None
        first = choices[0] if isinstance(choices, list) and choices else None
        message = first.get("message") if isinstance(first, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(message, dict) or not isinstance(content, (str, type(None))):
            raise GenerationError(
                f"the endpoint {self.url} answered a chat completion without a message "
                f"({_snippet(json.dumps(data, ensure_ascii=False))}); check that --model names a chat "
                "model it serves"
            )
        return content or ""

    def _one(self, conversation: Conversation, settings: GenSettings) -> str:
        def call() -> Any:
            return self.client.chat.completions.with_raw_response.create(
                model=self.model,
                messages=conversation,  # type: ignore[arg-type]
                max_tokens=settings.max_tokens,
                temperature=settings.temperature,
                top_p=settings.top_p,
                seed=settings.seed,
                stop=list(settings.stop[:MAX_API_STOPS]) or None,
            )

        data = self._json(self._with_retries(call), "a chat completion")
        return _finish_text(self._content(data), settings.stop)

    def generate(
        self, conversations: list[Conversation], settings: GenSettings
    ) -> Iterator[tuple[list[int], list[str]]]:
        jobs: queue.SimpleQueue = queue.SimpleQueue()
        results: queue.SimpleQueue = queue.SimpleQueue()
        for item in enumerate(conversations):
            jobs.put(item)

        def work() -> None:
            while True:
                try:
                    i, conversation = jobs.get_nowait()
                except queue.Empty:
                    return
                try:
                    results.put((i, self._one(conversation, settings), None))
                except Exception as err:  # handed to the caller's thread, raised there
                    results.put((i, "", err))

        for _ in range(min(self.concurrency, len(conversations))):
            threading.Thread(target=work, daemon=True, name="tunelab-endpoint").start()
        try:
            for _ in conversations:
                i, text, err = results.get()
                if err is not None:
                    raise err
                yield [i], [text]
        finally:
            while not jobs.empty():  # no new requests after an error or Ctrl-C
                try:
                    jobs.get_nowait()
                except queue.Empty:
                    break


def _snippet(text: str, width: int = 80) -> str:
    """The start of what an endpoint sent, on one line, control characters escaped."""
    flat = " ".join(text[: width * 4].split())
    flat = flat.encode("unicode_escape").decode("ascii") if any(ord(c) < 32 for c in flat) else flat
    return repr(flat[:width] + ("..." if len(flat) > width else ""))


def _endpoint_failure(url: str, err: Exception, attempts: int) -> str:
    status = getattr(err, "status_code", None)
    what = f"HTTP {status}" if status else type(err).__name__
    detail = " ".join(str(err).split())[:300]
    tries = f" after {attempts} attempt(s)" if attempts > 1 else ""
    return f"the endpoint {url} failed{tries}: {what}: {detail}; check --endpoint, --model and --api-key"


def normalise_endpoint(url: str) -> str:
    """``http://host:port`` means the usual ``/v1`` root; any other path is taken as given."""
    from urllib.parse import urlparse  # noqa: PLC0415

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise GenerationError(f"--endpoint {url!r} is not an http(s) URL; e.g. http://127.0.0.1:8000/v1")
    return url.rstrip("/") + "/v1" if parsed.path in ("", "/") else url.rstrip("/")


def open_generator(
    model: str | None = None,
    *,
    endpoint: str | None = None,
    api_key: str | None = None,
    concurrency: int = 4,
    cache_dir: Path | None = None,
    retries: int = 4,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
    use_cache: bool = True,
    console: Console | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> CachedGenerator:
    """A local model (``model``) or an endpoint (``endpoint``, ``model`` naming the served model;
    ``timeout_s`` bounds each request)."""
    console = console or make_console(stderr=True)
    backend: Backend
    key_name = ""
    if endpoint:
        url = normalise_endpoint(endpoint)
        backend = EndpointBackend(
            url, model, api_key=api_key, concurrency=concurrency, retries=retries, timeout_s=timeout_s
        )
        name = f"endpoint:{url}#{backend.model}"
    elif model:
        backend = LocalBackend(model, batch_size=batch_size, device=device, dtype=dtype)
        name, key_name = model, model_fingerprint(model)
    else:
        raise GenerationError("no model to generate with: give --model SPEC or --endpoint URL")
    cache = GenerationCache(cache_dir or default_cache_dir()) if use_cache else None
    return CachedGenerator(name, backend, cache, console, key_name=key_name)
