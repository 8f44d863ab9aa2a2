"""Chat templates and loss masks: exactly which tokens a model sees and which carry loss.

The template used in training must be the one the tokenizer applies at inference, so by default
we render with the tokenizer's own ``chat_template``. Built-in templates exist only for
tokenizers that have none.

How the loss mask is found, for any template: render the conversation once and tokenize it with
character offsets; for each assistant turn ``i`` the assistant span is the text between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])``. Tokens whose
characters fall in an assistant span carry loss. This needs no ``{% generation %}`` markers (few
templates have them) and survives BPE merges across the boundary.

A template that rewrites earlier turns once later ones follow (Qwen3 drops past reasoning) gets one
sequence per trained assistant turn, each rendered up to that turn, so every turn is trained as the
template renders it in its position. docs/templates.md has the whole story (tools, reasoning,
weights, built-ins).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # objectives import this module, and their config classes load without transformers
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# The built-ins follow the real templates of each family (Qwen2.5/Qwen3, Llama-3, Gemma-3,
# Mistral-7B-Instruct-v0.3, Phi-3.5-mini, Alpaca) with the differences docs/templates.md lists:
# no default system prompt, and no construct that would make a template rewrite earlier turns
# except Qwen3's reasoning rule, which is kept because Qwen3 models are trained with it.

# Qwen2.5/Qwen3-style tools block: the tool schemas go into the system turn.
_QWEN_TOOLS_HEADER = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages and messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages and messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
)

# An assistant turn's tool calls (after its content), then the end of the turn.
_QWEN_TOOL_CALLS = (
    "{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- set call = tool_call.function if tool_call.function is defined else tool_call %}"
    '{{- \'<tool_call>\\n{"name": "\' + call.name + \'", "arguments": \' }}'
    "{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
)

# Consecutive tool results share one user turn, each in <tool_response> tags.
_QWEN_TOOL_RESULT = (
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
)

_QWEN_OTHER_TURNS = (
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
)

_CHATML = (
    _QWEN_TOOLS_HEADER + "{%- for message in messages %}" + _QWEN_OTHER_TURNS + ""
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + content }}" + _QWEN_TOOL_CALLS + _QWEN_TOOL_RESULT + ""
    "{%- elif message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3: reasoning is rendered as <think>...</think> only on assistant turns after the last user
# query (the last turn always gets a block, empty if need be); earlier reasoning is dropped.
_QWEN3_ASSISTANT = (
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
)

_QWEN3 = (
    _QWEN_TOOLS_HEADER
    + "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and not "
    "(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    + _QWEN_OTHER_TURNS
    + _QWEN3_ASSISTANT
    + _QWEN_TOOL_CALLS
    + _QWEN_TOOL_RESULT
    + ""
    "{%- elif message.role != 'system' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

# Gemma-3: no system role (the system text opens the first user turn), the assistant is `model`.
_GEMMA = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- if messages and messages[0].role == 'system' %}"
    "{%- set first_user_prefix = messages[0].content + '\\n\\n' %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set first_user_prefix = '' %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- set role = 'model' if message.role == 'assistant' else message.role %}"
    "{{- '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message.content | trim }}{{- '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# Mistral-7B-Instruct-v0.3 markup; the system text opens the first user turn (v0.3 puts it in the
# last one, which would rewrite earlier turns as a conversation grows).
_MISTRAL = (
    "{%- if messages and messages[0].role == 'system' %}"
    "{%- set system_message = messages[0].content %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in loop_messages %}"
    "{%- if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate "
    "user/assistant/user/assistant/...') }}"
    "{%- endif %}"
    "{%- if message.role == 'user' and loop.first and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message.content + '[/INST]' }}"
    "{%- elif message.role == 'user' %}{{- '[INST] ' + message.content + '[/INST]' }}"
    "{%- else %}{{- ' ' + message.content + (eos_token if eos_token else '') }}{%- endif %}"
    "{%- endfor %}"
)

# Phi-3 / Phi-3.5-mini, without the trailing eos_token the original adds after the last turn (it
# would rewrite the end of every turn once another follows; `<|end|>` already ends each turn).
_PHI = (
    "{%- for message in messages %}"
    "{%- if message.role in ['system', 'user', 'assistant'] %}"
    "{{- '<|' + message.role + '|>\\n' + message.content + '<|end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

# No chat markup, for base models: the prompt messages joined by a blank line, the answer straight
# after them (put any separator you want at the end of the prompt), then EOS.
_PLAIN = (
    "{%- if bos_token %}{{- bos_token }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- message.content }}{%- if eos_token %}{{- eos_token }}{%- endif %}"
    "{%- else %}"
    "{%- if not loop.first and messages[loop.index0 - 1].role != 'assistant' %}{{- '\\n\\n' }}{%- endif %}"
    "{{- message.content }}"
    "{%- endif %}{%- endfor %}"
)

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML,
    "qwen3": _QWEN3,
    "llama-3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "gemma": _GEMMA,
    "mistral": _MISTRAL,
    "phi": _PHI,
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
    "plain": _PLAIN,
}

TrainOn = Literal["all_assistant", "last_assistant"]


class TemplateError(ValueError):
    """The tokenizer/template cannot render this data the way training needs."""


@dataclass
class Encoded:
    """One tokenized example: ids, per-token labels (``IGNORE_INDEX`` = no loss) and truncation facts."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    full_length: int = 0

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def select_template(tokenizer: PreTrainedTokenizerBase, name: str | None) -> list[str]:
    """Install the template the run will use and return warnings worth showing the user.

    ``name`` None keeps the tokenizer's own template (required to exist). A built-in name
    replaces it as ``tokenizer.chat_template``, so ``save_pretrained`` writes it into ``final/``
    and eval, serve and export use exactly the template the run trained with. If the tokenizer
    had its own, we warn: inference with the original template would not match training.
    """
    notes: list[str] = []
    if name is None:
        if not tokenizer.chat_template:
            raise TemplateError(
                "the tokenizer has no chat template (a base model?); set data.template (--template) to one "
                f"of {', '.join(BUILTIN_TEMPLATES)} ('plain' adds no chat markup: prompt, then answer, then EOS)"
            )
        return notes
    if name not in BUILTIN_TEMPLATES:
        raise TemplateError(
            f"data.template: unknown template {name!r}; use one of {', '.join(BUILTIN_TEMPLATES)}"
        )
    own = tokenizer.chat_template
    if own and own != BUILTIN_TEMPLATES[name]:
        notes.append(
            f"data.template={name!r} differs from the tokenizer's own chat template: inference with the "
            "tokenizer's template will not match training (the saved tokenizer will carry the training template)"
        )
    tokenizer.chat_template = BUILTIN_TEMPLATES[name]
    return notes


_TOOL_ROLE = re.compile(r"""['"]tool['"]""")
_TOOL_TEMPLATES = "chatml or qwen3"


def _template_source(tokenizer: PreTrainedTokenizerBase, tools: list[dict[str, Any]] | None) -> str:
    """The template text ``apply_chat_template`` will use (a dict of named templates picks
    ``tool_use`` when tools are given, as transformers does)."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("tool_use" if tools else "default") or template.get("default")
    if not template:
        raise TemplateError(
            f"the tokenizer has no chat template; set data.template to one of {', '.join(BUILTIN_TEMPLATES)}"
        )
    return template


def _template_label(source: str) -> str:
    builtin = next((name for name, text in BUILTIN_TEMPLATES.items() if text == source), None)
    return f"the built-in {builtin!r} template" if builtin else "the tokenizer's chat template"


def _unrendered_tool_parts(source: str, messages: list[dict[str, Any]], tools: Any) -> str | None:
    """What of the tool data the template would silently leave out, judged from its source: a
    template that never reads ``tools``/``tool_calls`` or never names the ``tool`` role drops them."""
    if tools and "tools" not in source:
        return "the tool definitions (top-level 'tools'), since it never reads 'tools'"
    if any(m.get("tool_calls") for m in messages) and "tool_calls" not in source:
        return "assistant tool calls, since it never reads 'tool_calls'"
    if any(m.get("role") == "tool" for m in messages) and not _TOOL_ROLE.search(source):
        return "tool results, since it has no 'tool' role"
    return None


def _with_reasoning_in_content(message: dict[str, Any]) -> dict[str, Any]:
    """For a template with no reasoning support: the reasoning goes before the answer as a
    ``<think>`` block (the Qwen3/DeepSeek-R1 spelling) instead of being dropped."""
    rest = {k: v for k, v in message.items() if k != "reasoning_content"}
    reasoning = message["reasoning_content"].strip("\n")
    if reasoning:
        rest["content"] = f"<think>\n{reasoning}\n</think>\n\n{message.get('content', '')}"
    return rest


def renderable_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: Any = None
) -> list[dict[str, Any]]:
    """The messages as the template gets them; TemplateError if it would silently drop tool data.

    ``reasoning_content`` is passed through when the template reads it, else moved into the content
    (see ``_with_reasoning_in_content``).
    """
    source = _template_source(tokenizer, tools)
    missing = _unrendered_tool_parts(source, messages, tools)
    if missing:
        raise TemplateError(
            f"{_template_label(source)} cannot render {missing}: they would be left out of the training "
            f"text; set data.template: {_TOOL_TEMPLATES} (both render tools, tool calls and tool results), "
            "or use a model whose chat template supports tools"
        )
    if "reasoning_content" in source:
        return messages
    return [_with_reasoning_in_content(m) if "reasoning_content" in m else m for m in messages]


def render(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render messages to text with the tokenizer's chat template (``tools`` passed only when given)."""
    import jinja2  # transformers renders with it; imported here so the recipe schema does not load it

    prepared = renderable_messages(tokenizer, messages, tools)
    extra = {} if tools is None else {"tools": tools}
    try:
        return tokenizer.apply_chat_template(
            prepared, tokenize=False, add_generation_prompt=generation_prompt, **extra
        )
    except jinja2.TemplateError as err:  # e.g. raise_exception('roles must alternate'): bad data, not a bug
        source = _template_source(tokenizer, tools)
        raise TemplateError(f"{_template_label(source)} refused this conversation: {err}") from err


def _trained_turns(messages: list[dict[str, Any]], train_on: TrainOn) -> list[int]:
    """Indices of the assistant turns that carry loss: all (or the last), less those with weight 0."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise TemplateError("the conversation has no assistant turn, so nothing would carry loss")
    if train_on == "last_assistant":
        turns = turns[-1:]
    trained = [i for i in turns if messages[i].get("weight", 1) != 0]
    if not trained:
        raise TemplateError("every assistant turn to train on has weight 0, so nothing would carry loss")
    return trained


def _turn_in_position(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], i: int, tools: Any
) -> tuple[str, int, int]:
    """``render(messages[:i+1])`` and the character span of turn ``i`` in it: the text after
    ``render(messages[:i], generation_prompt=True)``."""
    upto = render(tokenizer, messages[: i + 1], generation_prompt=False, tools=tools)
    before = render(tokenizer, messages[:i], generation_prompt=True, tools=tools) if i else ""
    if not upto.startswith(before):
        raise TemplateError(
            f"the chat template cannot give exact loss masks for assistant turn {i}: the prompt it renders "
            "for that turn at inference is not how the turn starts once rendered (e.g. Qwen3 with two "
            "assistant turns in a row); merge consecutive assistant turns, or set data.template to one of "
            f"{', '.join(BUILTIN_TEMPLATES)}"
        )
    return upto, len(before), len(upto)


def _layouts(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], trained: list[int], tools: Any
) -> list[tuple[str, list[tuple[int, int]]]]:
    """The sequences to train on, each with its loss spans: the whole conversation once when every
    trained turn renders in it exactly as in its own position (prefix-stable), else one sequence
    per trained turn, ending with that turn."""
    turns = [_turn_in_position(tokenizer, messages, i, tools) for i in trained]
    full = render(tokenizer, messages, generation_prompt=False, tools=tools)
    if all(full.startswith(text) for text, _, _ in turns):
        return [(full, [(start, end) for _, start, end in turns])]
    return [(text, [(start, end)]) for text, start, end in turns]


def _without_reasoning(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each span less a leading ``<think>...</think>`` block and the whitespace around it."""
    kept = []
    for start, end in spans:
        body = text[start:end]
        opened = body.lstrip()
        if opened.startswith("<think>") and "</think>" in opened:
            after = opened[opened.index("</think>") + len("</think>") :].lstrip()
            start = end - len(after)
        if end > start:
            kept.append((start, end))
    return kept


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    train_on: TrainOn = "all_assistant",
    *,
    tools: list[dict[str, Any]] | None = None,
    train_on_reasoning: bool = True,
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans that carry loss, one per trained
    assistant turn; TemplateError when the conversation needs several sequences (use
    ``encode_conversation``)."""
    layouts = _layouts(tokenizer, messages, _trained_turns(messages, train_on), tools)
    if len(layouts) > 1:
        raise TemplateError(_NOT_PREFIX_STABLE)
    text, spans = layouts[0]
    return text, spans if train_on_reasoning else _without_reasoning(text, spans)


_NOT_PREFIX_STABLE = (
    "the chat template renders earlier turns differently once later turns follow (e.g. Qwen3 drops "
    "past reasoning), so this conversation cannot be one sequence with exact masks; it needs one "
    "sequence per assistant turn, which this objective does not support"
)


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """A token carries loss when its characters lie inside an assistant span."""
    mask = []
    for start, end in offsets:
        inside = end > start and any(s <= start and end <= e for s, e in spans)
        mask.append(inside)
    return mask


def _encode_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]] | None, max_length: int | None
) -> Encoded:
    """Tokenize ``text``; loss on tokens inside ``spans`` (every token when ``spans`` is None)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [True] * len(ids) if spans is None else _mask_from_spans(enc["offset_mapping"], spans)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return _truncate(Encoded(ids, _no_loss_on_first(labels), full_length=len(ids)), max_length)


def encode_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    max_length: int | None = None,
    train_on: TrainOn = "all_assistant",
    completion_only: bool = True,
    train_on_reasoning: bool = True,
) -> list[Encoded]:
    """Tokenize a conversation for training: loss only on the assistant turns that are trained.

    One sequence when the template is prefix-stable for this conversation; otherwise one per
    trained assistant turn (``render(messages[:i+1])``, loss on turn ``i`` only), so each turn is
    trained exactly as the template renders it in its position. ``completion_only`` off trains on
    every token of the whole conversation (weights and ``train_on`` then do not apply).
    """
    if not completion_only:
        if not any(m["role"] == "assistant" for m in messages):
            raise TemplateError("the conversation has no assistant turn, so nothing would carry loss")
        text = render(tokenizer, messages, generation_prompt=False, tools=tools)
        return [_encode_spans(tokenizer, text, None, max_length)]
    layouts = _layouts(tokenizer, messages, _trained_turns(messages, train_on), tools)
    return [
        _encode_spans(
            tokenizer, text, spans if train_on_reasoning else _without_reasoning(text, spans), max_length
        )
        for text, spans in layouts
    ]


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
    max_length: int | None = None,
    train_on: TrainOn = "all_assistant",
    completion_only: bool = True,
    train_on_reasoning: bool = True,
) -> Encoded:
    """``encode_conversation`` for callers that need exactly one sequence; TemplateError when the
    template is not prefix-stable for this conversation and more than one turn is trained."""
    encoded = encode_conversation(
        tokenizer,
        messages,
        tools=tools,
        max_length=max_length,
        train_on=train_on,
        completion_only=completion_only,
        train_on_reasoning=train_on_reasoning,
    )
    if len(encoded) > 1:
        raise TemplateError(_NOT_PREFIX_STABLE)
    return encoded[0]


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, *, max_length: int | None = None) -> Encoded:
    """Plain text (continued pretraining): every token carries loss; EOS appended to mark the end."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return _truncate(Encoded(list(ids), _no_loss_on_first(list(ids)), full_length=len(ids)), max_length)


def _no_loss_on_first(labels: list[int]) -> list[int]:
    """The first token has nothing before it to predict it from. Marking it here keeps the loss the
    same however the batch is padded (with left padding it would otherwise be 'predicted' from a pad)."""
    return [IGNORE_INDEX, *labels[1:]] if labels else labels


def _truncate(encoded: Encoded, max_length: int | None) -> Encoded:
    if max_length is None or len(encoded.input_ids) <= max_length:
        return encoded
    return Encoded(
        encoded.input_ids[:max_length],
        encoded.labels[:max_length],
        truncated=True,
        full_length=encoded.full_length,
    )


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Token ids of a prompt ready for generation (everything up to the assistant's answer)."""
    text = render(tokenizer, messages, generation_prompt=True, tools=tools)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_prompt_answer(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Separate the conversation before the last assistant turn from that turn's text."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise TemplateError("example has no assistant turn to evaluate against")
    return messages[:last], messages[last]["content"]
