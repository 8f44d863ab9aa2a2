"""Chat templates and loss masks: exactly which tokens a model sees and which carry loss.

The template used in training must be the one the tokenizer applies at inference, so by default
we render with the tokenizer's own ``chat_template``. Built-in templates exist only for
tokenizers that have none.

How the loss mask is found, for any template: render the conversation once and tokenize it with
character offsets; for each assistant turn ``i`` the assistant span is the text between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i+1])``. Tokens whose
characters fall in an assistant span carry loss. This needs no ``{% generation %}`` markers (few
templates have them) and survives BPE merges across the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama-3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
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
    replaces it; if the tokenizer had its own, we warn: the model will be prompted at inference
    with a template it was not trained on unless the exported tokenizer carries ours.
    """
    notes: list[str] = []
    if name is None:
        if not tokenizer.chat_template:
            raise TemplateError(
                "the tokenizer has no chat template; set data.template to one of "
                f"{', '.join(BUILTIN_TEMPLATES)}"
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


def render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], *, generation_prompt: bool
) -> str:
    """Render messages to text with the tokenizer's chat template."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], train_on: TrainOn = "all_assistant"
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant turns that carry loss."""
    full = render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise TemplateError(
                "the chat template is not prefix-stable (rendering a longer conversation changes earlier "
                "text), so assistant tokens cannot be located; choose data.template explicitly"
            )
        spans.append((len(before), len(upto)))
    if not spans:
        raise TemplateError("the conversation has no assistant turn, so nothing would carry loss")
    if train_on == "last_assistant":
        spans = spans[-1:]
    return full, spans


def _mask_from_spans(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """A token carries loss when its characters lie inside an assistant span."""
    mask = []
    for start, end in offsets:
        inside = end > start and any(s <= start and end <= e for s, e in spans)
        mask.append(inside)
    return mask


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    max_length: int | None = None,
    train_on: TrainOn = "all_assistant",
    completion_only: bool = True,
) -> Encoded:
    """Tokenize a conversation for training; loss only on assistant turns unless ``completion_only`` is off."""
    text, spans = assistant_spans(tokenizer, messages, train_on)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = _mask_from_spans(enc["offset_mapping"], spans) if completion_only else [True] * len(ids)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return _truncate(Encoded(ids, _no_loss_on_first(labels), full_length=len(ids)), max_length)


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


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """Token ids of a prompt ready for generation (everything up to the assistant's answer)."""
    return tokenizer(render(tokenizer, messages, generation_prompt=True), add_special_tokens=False)[
        "input_ids"
    ]


def split_prompt_answer(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    """Separate the conversation before the last assistant turn from that turn's text."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise TemplateError("example has no assistant turn to evaluate against")
    return messages[:last], messages[last]["content"]
