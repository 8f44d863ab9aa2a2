"""Request and response bodies in OpenAI's shapes (chat, completions, models) plus the admin bodies.

Requests forbid unknown fields: a parameter tunelab does not implement (``logprobs``,
``presence_penalty``, ...) is a 400 naming it, not a silently different answer.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, field_validator

# OpenAI's seed is a signed 64-bit integer; torch takes any of them, and nothing larger.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


class _Strict(BaseModel):
    # JSON from Python clients may carry NaN/Infinity; no sampling parameter means anything with them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _utf8(value: Any) -> Any:
    """Strings (also inside lists and content parts) must be encodable text: JSON's \\ud800 escapes
    decode to lone surrogates, which the tokenizer rejects with an internal TypeError."""
    texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    for text in texts:
        if isinstance(text, dict):
            text = text.get("text")
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    "the text holds a lone UTF-16 surrogate (e.g. \\ud800), which is not a character; "
                    "send valid Unicode text"
                ) from None
    return value


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The fields chat and text completions share."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return _utf8(value)

    @field_validator("temperature", "top_p", "n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: object, info: ValidationInfo) -> object:
        """OpenAI treats an explicit null as 'use the default'; some clients send it."""
        return cls.model_fields[info.field_name].default if value is None else value

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return [s for s in stops if s]


class ToolFunction(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("strict")
    @classmethod
    def _no_strict(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError(
                "strict=true needs constrained decoding, which this server does not do; omit it or send false "
                "(the calls returned are parsed from free generation and may not match the schema)"
            )
        return value


class Tool(_Strict):
    """A tool the model may call, in OpenAI's shape; the chat template renders it into the prompt."""

    type: Literal["function"]
    function: ToolFunction

    def template(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class _History(BaseModel):
    """Calls sent back as history echo our own or another server's responses, which may carry extra
    keys (a streamed call's ``index``); like messages, they ignore what they do not use."""

    model_config = ConfigDict(extra="ignore")


class ToolCallFunction(_History):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any]

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        """OpenAI sends arguments as a JSON string; templates need the object (they write it ``| tojson``)."""
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"not valid JSON ({err.msg} at character {err.pos}); send a JSON object as a string"
            ) from None
        if not isinstance(parsed, dict):
            raise ValueError(f"must be a JSON object, got {type(parsed).__name__}")
        return parsed


class ToolCall(_History):
    """A call an earlier assistant turn made (conversation history sent back by the client)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction

    def template(self) -> dict[str, Any]:
        call = {
            "type": "function",
            "function": {"name": self.function.name, "arguments": self.function.arguments},
        }
        return {**({"id": self.id} if self.id else {}), **call}


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # clients add e.g. "refusal"; harmless

    role: Literal["system", "user", "assistant", "developer", "tool"]
    # Declared before content: the content check reads them (pydantic validates in field order).
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    # Checked when absent too: a missing content is the same mistake as a null one.
    content: str | list[dict[str, Any]] | None = Field(default=None, validate_default=True)

    _valid_text = field_validator("content")(_utf8)

    @field_validator("tool_calls")
    @classmethod
    def _assistant_only(cls, value: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if value and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message can carry tool_calls")
        return value

    @field_validator("content", mode="after")
    @classmethod
    def _required(cls, value: object, info: ValidationInfo) -> object:
        """OpenAI allows a null content only on an assistant turn that makes tool calls."""
        if "tool_calls" not in info.data:
            return value  # tool_calls itself was invalid; that error is the one to report
        if value is None and not (info.data.get("role") == "assistant" and info.data["tool_calls"]):
            raise ValueError("content is required (null only for an assistant message with tool_calls)")
        return value

    def text(self) -> str:
        """OpenAI's content parts → plain text; only text parts exist for a text-only model."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part of type {part.get('type')!r}: this model reads text only")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["auto", "none"] | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _honest_choice(cls, value: object) -> object:
        if value == "required" or isinstance(value, dict):
            raise ValueError(
                "'required' and a named function need constrained decoding, which this server does not do; "
                "send 'auto' (the model decides) or 'none'"
            )
        return value

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, value: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in value or []]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"two tools are named {', '.join(dupes)}; each tool needs its own name")
        return value

    def active_tools(self) -> list[dict[str, Any]] | None:
        """The tools to render and parse for: none when absent, empty, or ``tool_choice`` is 'none'."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.template() for tool in self.tools]


class ResponseFormat(_Strict):
    type: Literal["text", "json_object"]


class _Passthrough(_Strict):
    """Parameters the built-in engine does not implement that a backend gets as sent, once their
    types and ranges are checked here: an upstream that fails on a bad value answers 500 (llama.cpp's
    server does), and that must be the client's 400, not a fault of the variant."""

    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repeat_penalty: float | None = Field(default=None, ge=0)
    logit_bias: (
        dict[
            Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")],
            Annotated[float, Field(ge=-100, le=100)],
        ]
        | None
    ) = None
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    response_format: ResponseFormat | None = None


class BackendChatRequest(_Passthrough, ChatCompletionRequest):
    """A chat request for a backend: the built-in schema and limits plus the typed pass-through."""

    logprobs: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    _valid_text = field_validator("prompt")(_utf8)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError(
                "prompt: give one string (batched prompts are not supported; send one request each)"
            )
        return self.prompt[0]


class BackendCompletionRequest(_Passthrough, CompletionRequest):
    """A text completion for a backend: the built-in schema and limits plus the typed pass-through."""

    logprobs: int | None = Field(default=None, ge=0, le=5)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseFunction(BaseModel):
    name: str
    arguments: str  # a JSON object as a string, as OpenAI returns it


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaToolCall(ResponseToolCall):
    index: int


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class TextChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    """A text completion; streamed chunks have the same shape with ``finish_reason`` null until the end."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunelab"
    kind: Literal["base", "adapter", "backend", "alias"]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FeedbackRequest(_Strict):
    """A score for one response (by its ``id``) or directly for a variant (``adapter``: a base,
    adapter or backend name); higher is better. ``user`` is kept in the feedback log."""

    id: str | None = None
    adapter: str | None = None
    score: float = Field(ge=-1, le=1)
    user: str | None = None


class AdapterLoadRequest(_Strict):
    name: str = Field(pattern=r"^[\w-]+$", max_length=64)
    path: str


class AliasRequest(_Strict):
    shares: dict[str, float]
    baseline: str | None = None
    rollout: list[float] | None = None
    rollout_every: int = Field(default=50, ge=1)
    rollout_every_seconds: float | None = Field(default=None, gt=0)
