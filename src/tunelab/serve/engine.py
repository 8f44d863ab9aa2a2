"""The model, its adapters, and the one worker thread that generates with them.

One thread owns the model: requests wait in a bounded queue, so switching adapters
(``set_adapter``) is never interleaved with another request's forward pass, and a full queue is an
immediate 429 instead of an unbounded pile-up. Loading and unloading adapters take the same lock
the worker holds while generating.

When the worker wakes it takes the oldest job and up to ``max_batch - 1`` more that can share its
forward passes (same adapter and sampling; see ``batching.take_batch``) and decodes them together:
one transformers ``generate`` call on the left-padded prompts. A stopping criterion sees every
row's newest token each step; it decodes and streams it, holds back text that might be the start
of a stop string (so a stop string is never sent), and answers each row as soon as its own stop
string, ``max_tokens``, deadline or client cancellation ends it. Greedy rows get the same tokens
as the job served alone: the model derives each row's positions from its attention mask."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

from tunelab.serve.batching import left_pad, take_batch
from tunelab.serve.errors import APIError, internal_error, queue_full, timed_out
from tunelab.serve.tools import CLOSE as TOOL_CLOSE
from tunelab.serve.tools import OPEN as TOOL_OPEN
from tunelab.serve.tools import check_template

log = logging.getLogger("tunelab.serve")
DEFAULT_MAX_TOKENS = 256


def truncate_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """``text`` cut before the earliest stop string, and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class StopScanner:
    """Turns a growing decoded text into deltas that are safe to send: nothing past a stop string,
    and no tail that could still become one (it is held until the next token decides)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.sent = 0
        self.stopped = False
        self.text = ""

    def feed(self, text: str) -> str:
        """The full text so far → the new part that can be sent now."""
        if self.stopped:
            return ""
        cut, self.stopped = truncate_at_stop(text, self.stops)
        safe = len(cut) if self.stopped else len(text) - self._held_tail(text)
        self.text = cut
        delta = text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta

    def flush(self) -> str:
        """Generation ended: whatever was held back is final text now."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta

    def _held_tail(self, text: str) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


def check_max_tokens(requested: int | None, limit: int) -> int:
    """The new tokens a request may have under ``--max-tokens-limit`` (the default when it asks for
    none: :data:`DEFAULT_MAX_TOKENS`, capped), or a 400; the router applies it to backends too."""
    if requested is not None and requested > limit:
        raise APIError(
            400, f"max_tokens={requested} is over this server's limit of {limit}", param="max_tokens"
        )
    return requested if requested is not None else min(DEFAULT_MAX_TOKENS, limit)


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    error: APIError


Event = Delta | Done | Failed


@dataclass
class Job:
    """One generation request; ``emit`` is called from the worker thread with each event."""

    adapter: str | None
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    stream: bool = False
    timeout_s: float = 60.0
    created: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def deadline(self) -> float:
        return self.created + self.timeout_s


def make_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """Token ids → text without special tokens, except the tool-call markers.

    Some tokenizers mark ``<tool_call>``/``</tool_call>`` as special tokens; skipping them like the
    other specials would leave a call's JSON in the text with nothing to tell it from prose, so the
    tool-call parser would silently find no calls."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    markers = {i for i, token in added.items() if token.special and token.content in (TOOL_OPEN, TOOL_CLOSE)}

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    if not markers:
        return decode
    specials = ({i for i, token in added.items() if token.special} | set(tokenizer.all_special_ids)) - markers

    def decode_keeping_markers(ids: list[int]) -> str:
        kept = [i for i in ids if i not in specials]
        return tokenizer.decode(kept, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return decode_keeping_markers


class _Row:
    """One job's state while it decodes inside a batch: its tokens, its stop scanner, and whether it
    has already been answered (a finished row's later tokens are padding and are ignored)."""

    def __init__(self, job: Job, decode: Callable[[list[int]], str], lock: threading.Lock) -> None:
        self.job, self.decode, self.lock = job, decode, lock
        self.scanner = StopScanner(list(job.params.stop))
        self.ids: list[int] = []
        self.finished = False

    def advance(self, token: int, eos_ids: set[int]) -> None:
        """Take the row's next token: stream what is safe to send, and finish the row when its own
        limits say so; the other rows of the batch go on."""
        self.ids.append(token)
        with self.lock:
            text = self.decode(self.ids)
        if not text.endswith("\ufffd"):  # else a multi-byte character is half decoded; wait for the rest
            delta = self.scanner.feed(text)
            if delta and self.job.stream:
                self.emit(Delta(delta))
        if self.finished:  # the client could not take the delta
            return
        if self.job.cancelled.is_set():
            self.fail(timed_out(self.job.timeout_s))
        elif self.scanner.stopped or token in eos_ids:
            self.complete("stop")
        elif len(self.ids) >= self.job.params.max_tokens:
            self.complete("length")
        elif time.monotonic() > self.job.deadline:
            self.fail(timed_out(self.job.timeout_s))

    def complete(self, finish_reason: str) -> None:
        """Send the text held back for a possible stop string, then the answer."""
        self.finished = True
        tail = self.scanner.flush()
        if tail and self.job.stream:
            self.emit(Delta(tail))
        self.emit(Done(self.scanner.text, finish_reason, len(self.job.prompt_ids), len(self.ids)))

    def fail(self, error: APIError) -> None:
        self.finished = True
        self.emit(Failed(error))

    def emit(self, event: Event) -> None:
        """A client whose event loop is gone must not stop the rows decoding beside it."""
        try:
            self.job.emit(event)
        except Exception:  # noqa: BLE001
            log.warning("could not deliver an event for a request; dropping that request", exc_info=True)
            self.finished = True
            self.job.cancelled.set()


class _BatchHalt(StoppingCriteria):
    """Called by ``generate`` after each step with every row's newest token: feeds the unfinished
    rows and tells ``generate`` which rows are done (it stops when all are)."""

    def __init__(self, rows: list[_Row], eos_ids: set[int]) -> None:
        self.rows, self.eos_ids = rows, eos_ids

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):
            if not row.finished:
                row.advance(token, self.eos_ids)
        return torch.tensor([row.finished for row in self.rows], dtype=torch.bool, device=input_ids.device)


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    chat_template: str | None


class Engine:
    """A base model, its named adapters, a bounded job queue and the worker thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        base_name: str,
        base_key: tuple[str, int | None] | None = None,
        queue_size: int = 64,
        max_tokens_limit: int = 1024,
        max_batch: int = 16,
        batch_wait_s: float = 0.05,
        device: str = "auto",
        dtype: str = "auto",
    ) -> None:
        from tunelab.data.templates import BUILTIN_TEMPLATES  # noqa: PLC0415

        self.model, self.tokenizer, self.base_name = model, tokenizer, base_name
        self.decode = make_decoder(tokenizer)
        self.base_key = base_key or (base_name, None)
        self.base_template = tokenizer.chat_template or BUILTIN_TEMPLATES["chatml"]
        self.queue_size, self.max_tokens_limit = queue_size, max_tokens_limit
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch}: a batch holds at least one request")
        self.max_batch, self.batch_wait_s = max_batch, batch_wait_s if max_batch > 1 else 0.0
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        # No prompt longer than this can fit the context, so it is refused before it is tokenised.
        self.max_prompt_chars = self.context * longest_token_chars(tokenizer) if self.context else None
        self.device = next(model.parameters()).device
        self._load_opts = {"device": device, "dtype": dtype}
        self.adapters: dict[str, LoadedAdapter] = {}
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._paused = False
        self._stopping = False
        self._model_lock = threading.Lock()
        # A fast tokenizer is one Rust object; encoding (event loop) and decoding (worker) at the same
        # time can fail with "Already borrowed", so they take turns.
        self.tokenizer_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def load(
        cls,
        base: str | None,
        adapters: dict[str, str | Path],
        *,
        device: str = "auto",
        dtype: str = "auto",
        **kwargs: Any,
    ) -> Engine:
        """Load the base (from ``base``, else the adapters' own ``base_model``) and every adapter."""
        from tunelab.adapters import adapter_info  # noqa: PLC0415
        from tunelab.models.load import load_model  # noqa: PLC0415

        infos = {name: adapter_info(path) for name, path in adapters.items()}
        keys = {info.base_key for info in infos.values()}
        if base is None and not keys:
            raise ValueError("nothing to serve: give --base, or at least one --adapter NAME=RUN")
        if base is None and len(keys) > 1:
            raise ValueError(
                f"the adapters were trained on different bases {sorted(keys, key=str)}; give --base"
            )
        spec, seed = (base, 0) if base is not None else next(iter(keys))
        if base is not None and keys:
            seed = next(iter(keys))[1] or 0
        model, tokenizer = load_model(spec, device=device, dtype=dtype, seed=seed)
        model.eval()
        key = (spec, seed if spec.startswith("tiny:") else None)
        engine = cls(model, tokenizer, base_name=spec, base_key=key, device=device, dtype=dtype, **kwargs)
        for name, path in adapters.items():
            engine.load_adapter(name, path)
        return engine

    def load_adapter(self, name: str, path: str | Path) -> LoadedAdapter:
        """Add an adapter run under ``name``; refused if it was trained on another base."""
        from peft import PeftModel  # noqa: PLC0415

        from tunelab.adapters import adapter_info  # noqa: PLC0415

        info = adapter_info(path)
        if info.base_key != self.base_key:
            raise ValueError(
                f"adapter '{name}' ({info.path}) was trained on {_describe_key(info.base_key)}, but this server "
                f"serves {_describe_key(self.base_key)}; an adapter only works on its own base"
            )
        with self._model_lock:
            if name in self.adapters:
                raise ValueError(
                    f"an adapter named '{name}' is already loaded; unload it first or pick a new name"
                )
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(info.path), adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(info.path), adapter_name=name)
            self.model.eval()
            loaded = LoadedAdapter(name, info.path, _chat_template_of(info.path))
            self.adapters[name] = loaded
        log.info("loaded adapter '%s' from %s", name, info.path)
        return loaded

    def unload_adapter(self, name: str) -> None:
        with self._model_lock:
            if name not in self.adapters:
                raise KeyError(name)
            self.model.delete_adapter(name)
            del self.adapters[name]
        log.info("unloaded adapter '%s'", name)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        adapter: str | None,
        *,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Prompt ids with the chat template the adapter was trained with (the base's own otherwise);
        ``tools`` (OpenAI function dicts) are rendered by that template, or refused if it cannot."""
        from jinja2 import TemplateError  # noqa: PLC0415

        loaded = self.adapters.get(adapter) if adapter is not None else None
        template = (loaded.chat_template if loaded else None) or self.base_template
        check_template(template, messages, tools, f"'{adapter or self.base_name}'")
        with self.tokenizer_lock:
            try:
                text = self.tokenizer.apply_chat_template(
                    messages, chat_template=template, tools=tools, tokenize=False, add_generation_prompt=True
                )
            except TemplateError as err:  # e.g. a template that requires alternating user/assistant turns
                raise ValueError(f"the model's chat template rejected these messages: {err}") from None
            self._check_length(text)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_text(self, prompt: str) -> list[int]:
        self._check_length(prompt)
        with self.tokenizer_lock:
            return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def _check_length(self, text: str) -> None:
        """A 400 for a prompt too long in characters to fit the context in tokens: tokenising
        megabytes only to count them would cost seconds and a copy of the text per token."""
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise APIError(
                400,
                f"the prompt has {len(text):,} characters; no prompt over {self.max_prompt_chars:,} characters "
                f"fits the model's context of {self.context} tokens. Shorten the prompt.",
                param="messages",
                code="context_length_exceeded",
            )

    def resolve_max_tokens(self, n_prompt: int, requested: int | None) -> int:
        """The number of new tokens to allow, or a 400 that says which limit the request broke."""
        check_max_tokens(requested, self.max_tokens_limit)
        if self.context is not None and n_prompt >= self.context:
            raise APIError(
                400,
                f"the prompt has {n_prompt} tokens; the model's context is {self.context} tokens. Shorten the prompt.",
                param="messages",
                code="context_length_exceeded",
            )
        room = (self.context - n_prompt) if self.context is not None else self.max_tokens_limit
        if requested is not None and requested > room:
            raise APIError(
                400,
                f"the prompt ({n_prompt} tokens) plus max_tokens ({requested}) exceeds the model's context of "
                f"{self.context} tokens; ask for at most {room}",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return requested if requested is not None else min(DEFAULT_MAX_TOKENS, self.max_tokens_limit, room)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 429 when every slot is taken."""
        with self._cond:
            if len(self._jobs) >= self.queue_size:
                raise queue_full(self.queue_size)
            self._jobs.append(job)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        with self._cond:
            return len(self._jobs)

    def pause(self) -> None:
        """Stop taking jobs from the queue (those queued wait); for maintenance and for tests."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="tunelab-serve-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _work(self) -> None:
        ended, expected = float("-inf"), 0  # when the last batch ended; jobs worth waiting for then
        while True:
            with self._cond:
                while not self._stopping and (self._paused or not self._jobs):
                    self._cond.wait()
                if self._stopping:
                    return
                if not self._gathered(ended, expected):
                    continue
                batch = take_batch(self._jobs, self.max_batch, self.context)
                # Counted now, not when the batch ends: a row answered early may already have sent
                # its client's next request by then, and that job must not count twice.
                expected = len(self._jobs) + len(batch)
            self._run(batch)
            ended = time.monotonic()

    def _gathered(self, ended: float, expected: int) -> bool:
        """Right after a batch, wait up to ``batch_wait_s`` for the clients it answered to send their
        next requests (until ``expected`` jobs wait: those left waiting plus one per row), so
        they join the batch that waits now instead of forming the next one behind it; otherwise
        closed-loop clients split into two half-sized groups that take turns. A lone client never
        waits (its own next request is all that is expected), nor does an idle server. False when
        paused or stopping meanwhile: the caller starts over. (The caller holds the condition.)"""
        until, wanted = ended + self.batch_wait_s, min(expected, self.max_batch)
        while len(self._jobs) < wanted and not (self._paused or self._stopping):
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        return not (self._paused or self._stopping) and bool(self._jobs)

    def _run(self, jobs: list[Job]) -> None:
        """Answer a batch; a job that cannot run (gone, late, adapter unloaded) is answered alone and
        an engine fault fails only the rows it left unanswered."""
        rows = [_Row(job, self.decode, self.tokenizer_lock) for job in jobs if not job.cancelled.is_set()]
        for row in rows:
            if time.monotonic() > row.job.deadline:
                row.fail(timed_out(row.job.timeout_s))
        rows = [row for row in rows if not row.finished]
        if not rows:
            return
        try:
            with self._model_lock:
                self.generate(rows)
        except APIError as err:
            for row in rows:
                if not row.finished:
                    row.fail(err)
        except Exception:  # noqa: BLE001  (one bad request must not kill the worker)
            ref = uuid.uuid4().hex[:12]
            log.exception("generation failed (reference %s, adapter %s)", ref, rows[0].job.adapter or "base")
            for row in rows:
                if not row.finished:
                    row.fail(internal_error(ref))

    def generate(self, rows: list[_Row]) -> None:
        """Decode a batch of compatible jobs (same adapter and sampling; see ``take_batch``) in one
        ``generate`` call; each row is answered as soon as it stops (the caller holds the model lock)."""
        adapter, params = rows[0].job.adapter, rows[0].job.params
        if adapter is not None and adapter not in self.adapters:
            raise APIError(404, f"adapter '{adapter}' was unloaded while this request waited", param="model")
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids, mask = left_pad([row.job.prompt_ids for row in rows], pad_id, self.device)
        eos_ids = self._eos_ids()
        with self._adapter(adapter), _seeded(params.seed, self.device), torch.inference_mode():
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(row.job.params.max_tokens for row in rows),
                stopping_criteria=StoppingCriteriaList([_BatchHalt(rows, eos_ids)]),
                pad_token_id=pad_id,
                **_sampling_kwargs(params),
            )
        for row in rows:  # generate also stops on its own limits; nothing may go unanswered
            if not row.finished:
                row.complete("length" if len(row.ids) >= row.job.params.max_tokens else "stop")

    def _eos_ids(self) -> set[int]:
        eos = self.model.generation_config.eos_token_id
        return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    @contextlib.contextmanager
    def _adapter(self, name: str | None) -> Iterator[None]:
        """Activate one adapter, or none (the base) through PEFT's own ``disable_adapter``."""
        from peft import PeftModel  # noqa: PLC0415

        if not isinstance(self.model, PeftModel) or not self.adapters:
            yield
        elif name is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(name)
            yield


def _sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """temperature 0 means greedy; passing temperature/top_p with greedy only earns warnings."""
    if params.temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Same seed → same sample; the global RNG is restored after, so other requests are unaffected."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def longest_token_chars(tokenizer: Any) -> int:
    """The most characters one token can stand for: its longest vocabulary entry (a byte-level BPE or
    SentencePiece entry is at least as long as the text it decodes to)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def _chat_template_of(final: Path) -> str | None:
    """The chat template saved with the run (training may have installed a built-in one)."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    try:
        return AutoTokenizer.from_pretrained(str(final)).chat_template
    except (OSError, ValueError):
        return None


def _describe_key(key: tuple[str, int | None]) -> str:
    spec, seed = key
    return f"'{spec}' (seed {seed})" if seed is not None else f"'{spec}'"
