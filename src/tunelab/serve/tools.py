"""Tool calling for the chat endpoint: request messages → template messages, generated text → tool calls.

The format recognised is the Hermes/Qwen one that the chatml and qwen templates train on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Every well-formed block becomes one OpenAI tool call; a block whose body is not a JSON object with a
string ``name`` and an object ``arguments`` stays in the content as written (a model's malformed
attempt is shown, not lost and not a crash). An unclosed block (generation cut by ``max_tokens``)
is content too.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


class ToolRequestError(ValueError):
    """A request whose tool messages cannot be rendered; ``param`` names the field for the 400."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class ParsedCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        """OpenAI's shape: arguments as a JSON string, as clients ``json.loads`` them."""
        arguments = json.dumps(self.arguments, ensure_ascii=False)
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": arguments}}


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedCall]]:
    """Generated text → (content outside the tool-call blocks, or None when empty; the calls in order)."""
    calls: list[ParsedCall] = []
    kept: list[str] = []
    last = 0
    for match in _BLOCK.finditer(text):
        call = _call_of(match.group(1))
        if call is None:
            continue  # malformed: left in place, so it is part of the content below
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None), calls


def _call_of(body: str) -> ParsedCall | None:
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string, as OpenAI does
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ParsedCall(data["name"], arguments) if isinstance(arguments, dict) else None


class ToolCallStream:
    """Streams the content that precedes the first ``<tool_call>`` as it is generated; the rest (calls,
    and any content after or between them) comes from :meth:`finish` once generation has ended.

    Whitespace at the very start and before a block is held, so the streamed content joined with the
    final remainder equals the non-streamed ``content`` exactly."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = ""

    def feed(self, delta: str) -> str:
        """A new piece of generated text → the content that is safe to send now (maybe "")."""
        self.text += delta
        marker = self.text.find(OPEN)
        end = marker if marker >= 0 else len(self.text) - _partial_marker(self.text)
        safe = self.text[:end].strip()
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        new, self.sent = safe[len(self.sent) :], safe
        return new

    def finish(self, text: str) -> tuple[str, list[ParsedCall]]:
        """The whole generated text → (content not yet sent, the calls)."""
        content, calls = parse_tool_calls(text)
        content = content or ""
        rest = content[len(self.sent) :] if content.startswith(self.sent) else content
        return rest, calls


def _partial_marker(text: str) -> int:
    """Length of the longest end of ``text`` that could still grow into ``<tool_call>``."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:n]):
            return n
    return 0


def template_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Request messages → the dicts a chat template reads (tool-call arguments as parsed objects).

    A ``tool`` message must answer a call made by an earlier assistant turn, as in OpenAI's API: a
    tool result with no call is a 400 naming the message, not a prompt the model never saw in training."""
    out: list[dict[str, Any]] = []
    open_ids: set[str] | None = None  # ids of the latest assistant turn's calls; None = no calls yet
    for i, message in enumerate(messages):
        item: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.tool_calls:
            item["tool_calls"] = [call.template() for call in message.tool_calls]
            open_ids = {call.id for call in message.tool_calls if call.id}
        elif message.role == "tool":
            _check_answers(i, message, open_ids)
            item.update({k: v for k in ("tool_call_id", "name") if (v := getattr(message, k))})
        else:
            open_ids = None
        out.append(item)
    return out


def _check_answers(index: int, message: Any, open_ids: set[str] | None) -> None:
    if open_ids is None:
        raise ToolRequestError(
            f"messages.{index}: a 'tool' message must follow an assistant message with 'tool_calls' "
            "(it is the result of one of those calls)",
            f"messages.{index}",
        )
    if message.tool_call_id and open_ids and message.tool_call_id not in open_ids:
        raise ToolRequestError(
            f"messages.{index}.tool_call_id: '{message.tool_call_id}' is not the id of a call in the "
            f"preceding assistant message ({', '.join(sorted(open_ids))})",
            f"messages.{index}.tool_call_id",
        )


def check_template(
    template: str, messages: list[dict[str, Any]], tools: list[Any] | None, whose: str
) -> None:
    """Refuse tools or tool calls that the template would silently drop: the model would never see them.

    A template that renders tools names the ``tools`` variable, and one that renders calls reads
    ``tool_calls``; one that does neither (the text is all we can check) cannot be asked to."""
    if tools and "tools" not in template:
        raise ToolRequestError(
            f"tools: the chat template of {whose} cannot render tools (it never reads `tools`), so the model "
            "would not see them; serve a model or adapter whose template supports tools (e.g. trained with "
            "data.template: chatml) or send the request without tools",
            "tools",
        )
    if "tool_calls" in template:
        return
    for i, message in enumerate(messages):
        if message.get("tool_calls"):
            raise ToolRequestError(
                f"messages.{i}.tool_calls: the chat template of {whose} cannot render tool calls (it never "
                "reads `tool_calls`), so the model would not see this turn's calls; send the calls as text "
                "in content, or use a model whose template supports tools",
                f"messages.{i}.tool_calls",
            )


def finish_reason(reason: str, calls: list[ParsedCall]) -> str:
    """'tool_calls' when the model called a tool; a cut-off generation stays 'length' (the text after
    the calls is incomplete and the client should know)."""
    return "tool_calls" if calls and reason != "length" else reason
