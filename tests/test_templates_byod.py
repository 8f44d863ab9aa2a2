"""Bring-your-own-data templates: tools, reasoning, weights, per-turn sequences, built-ins, GGUF.

Golden masks are written out by hand from the template's documented shape, so a change in what
carries loss (or in how a built-in renders) fails here with the exact difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from tunelab.data.templates import (
    BUILTIN_TEMPLATES,
    IGNORE_INDEX,
    Encoded,
    TemplateError,
    assistant_spans,
    encode_chat,
    encode_conversation,
    encode_prompt,
    render,
    select_template,
)
from tunelab.models.tiny import build_tiny_tokenizer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TOOL_CHAT = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "Is it warm in Paris today?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "name": "get_weather", "content": "sunny, 21 degrees"},
    {"role": "assistant", "content": "Yes: sunny and 21 degrees."},
]
TWO_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "blue"},
    {"role": "user", "content": "Another one?"},
    {"role": "assistant", "content": "dark green"},
]


def tokenizer_with(name: str | None):
    tok = build_tiny_tokenizer()
    if name is not None:
        select_template(tok, name)
    return tok


def loss_text(tok, enc: Encoded) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def text_of(tok, enc: Encoded) -> str:
    return tok.decode(enc.input_ids)


def loss_chars(tok, text: str, enc: Encoded) -> set[int]:
    """Character positions of ``text`` covered by tokens that carry loss."""
    retok = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert retok["input_ids"] == enc.input_ids
    return {
        c
        for (s, e), lab in zip(retok["offset_mapping"], enc.labels)
        if lab != IGNORE_INDEX
        for c in range(s, e)
    }


# --- tools -----------------------------------------------------------------------------------


def test_chatml_tool_conversation_trains_only_tool_calls_and_answer():
    tok = tokenizer_with("chatml")
    [enc] = encode_conversation(tok, TOOL_CHAT, tools=TOOLS)
    text = render(tok, TOOL_CHAT, generation_prompt=False, tools=TOOLS)
    assert text_of(tok, enc) == text
    # the tool schema is in the system turn, the result in a user turn as <tool_response>
    assert '"name": "get_weather", "description": "Current weather in a city"' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21 degrees\n</tool_response><|im_end|>\n" in text
    assert loss_text(tok, enc) == f"{CALL_TEXT}<|im_end|>\nYes: sunny and 21 degrees.<|im_end|>\n"
    trained = loss_chars(tok, text, enc)
    for message in TOOL_CHAT:
        if message["role"] != "assistant":
            start = text.index(message["content"])
            assert not trained & set(range(start, start + len(message["content"])))
    schema = text.index("<tools>")
    assert not trained & set(range(schema, text.index("</tools>")))


def test_weight_zero_turn_is_rendered_but_not_trained():
    tok = tokenizer_with("chatml")
    chat = [dict(m) for m in TOOL_CHAT]
    chat[2]["weight"] = 0
    [enc] = encode_conversation(tok, chat, tools=TOOLS)
    assert CALL_TEXT in text_of(tok, enc)
    assert loss_text(tok, enc) == "Yes: sunny and 21 degrees.<|im_end|>\n"
    chat[4]["weight"] = 0
    with pytest.raises(TemplateError, match="weight 0"):
        encode_conversation(tok, chat, tools=TOOLS)


def test_last_assistant_with_weight_zero_trains_nothing():
    tok = tokenizer_with("chatml")
    chat = [*TWO_TURNS[:4], {**TWO_TURNS[4], "weight": 0}]
    assert loss_text(tok, encode_chat(tok, chat)) == "blue<|im_end|>\n"
    with pytest.raises(TemplateError, match="weight 0"):
        encode_chat(tok, chat, train_on="last_assistant")


@pytest.mark.parametrize("name", ["llama-3", "gemma", "mistral", "phi", "alpaca", "plain"])
def test_templates_without_tool_support_refuse_tool_data(name):
    tok = tokenizer_with(name)
    with pytest.raises(TemplateError, match=f"built-in '{name}' template cannot render.*chatml or qwen3"):
        encode_conversation(tok, TOOL_CHAT[:3], tools=TOOLS)
    with pytest.raises(TemplateError, match="cannot render assistant tool calls"):
        render(tok, TOOL_CHAT[:3], generation_prompt=False)


def test_tokenizer_template_that_ignores_tools_is_refused_with_the_fix():
    tok = build_tiny_tokenizer()  # its own ChatML renders roles generically, tool calls not at all
    with pytest.raises(TemplateError, match="tokenizer's chat template cannot render the tool definitions"):
        encode_conversation(tok, TWO_TURNS, tools=TOOLS)
    with pytest.raises(TemplateError, match="cannot render tool results.*data.template: chatml or qwen3"):
        encode_conversation(tok, [TOOL_CHAT[1], TOOL_CHAT[3], TOOL_CHAT[4]])


def test_prompt_with_tools_ends_with_the_generation_prompt():
    tok = tokenizer_with("chatml")
    ids = encode_prompt(tok, TOOL_CHAT[:4], tools=TOOLS)
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a weather bot.\n\n# Tools")
    assert text.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")


# --- reasoning -------------------------------------------------------------------------------

REASONING_CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6", "reasoning_content": "Three plus three is six."},
]


def test_qwen3_multi_turn_reasoning_gives_one_sequence_per_turn():
    tok = tokenizer_with("qwen3")
    first, second = encode_conversation(tok, REASONING_CHAT)
    # turn 1 as the template renders it when it is the last turn: with its reasoning
    assert text_of(tok, first) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        "<think>\nTwo plus two is four.\n</think>\n\n4<|im_end|>\n"
    )
    assert loss_text(tok, first) == "<think>\nTwo plus two is four.\n</think>\n\n4<|im_end|>\n"
    # turn 2 in its position: turn 1's reasoning is dropped there, and turn 1 carries no loss
    assert "Two plus two" not in text_of(tok, second)
    assert "<|im_start|>assistant\n4<|im_end|>\n" in text_of(tok, second)
    assert loss_text(tok, second) == "<think>\nThree plus three is six.\n</think>\n\n6<|im_end|>\n"
    with pytest.raises(TemplateError, match="one sequence per assistant turn"):
        encode_chat(tok, REASONING_CHAT)
    with pytest.raises(TemplateError, match="Qwen3 drops past reasoning"):
        assistant_spans(tok, REASONING_CHAT)


def test_qwen3_last_assistant_is_one_sequence_of_the_whole_conversation():
    tok = tokenizer_with("qwen3")
    enc = encode_chat(tok, REASONING_CHAT, train_on="last_assistant")
    assert loss_text(tok, enc) == "<think>\nThree plus three is six.\n</think>\n\n6<|im_end|>\n"
    assert text_of(tok, enc) == render(tok, REASONING_CHAT, generation_prompt=False)


def test_qwen3_agent_trace_after_the_last_query_is_one_sequence():
    tok = tokenizer_with("qwen3")
    chat = [dict(m) for m in TOOL_CHAT]
    chat[2]["reasoning_content"] = "I need the weather."
    chat[4]["reasoning_content"] = "21 is warm."
    [enc] = encode_conversation(tok, chat, tools=TOOLS)
    assert loss_text(tok, enc) == (
        f"<think>\nI need the weather.\n</think>\n\n{CALL_TEXT}<|im_end|>\n"
        "<think>\n21 is warm.\n</think>\n\nYes: sunny and 21 degrees.<|im_end|>\n"
    )
    [no_think] = encode_conversation(tok, chat, tools=TOOLS, train_on_reasoning=False)
    assert no_think.input_ids == enc.input_ids
    assert loss_text(tok, no_think) == f"{CALL_TEXT}<|im_end|>\nYes: sunny and 21 degrees.<|im_end|>\n"


def test_train_on_reasoning_false_masks_the_think_block():
    tok = tokenizer_with("qwen3")
    first, second = encode_conversation(tok, REASONING_CHAT, train_on_reasoning=False)
    assert "<think>\nTwo plus two is four.\n</think>" in text_of(tok, first)
    assert loss_text(tok, first) == "4<|im_end|>\n"
    assert loss_text(tok, second) == "6<|im_end|>\n"


def test_think_in_content_is_kept_as_written_and_maskable():
    tok = tokenizer_with("chatml")
    chat = [REASONING_CHAT[0], {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}]
    enc = encode_chat(tok, chat)
    assert loss_text(tok, enc) == "<think>\nadd them\n</think>\n\n4<|im_end|>\n"
    assert loss_text(tok, encode_chat(tok, chat, train_on_reasoning=False)) == "4<|im_end|>\n"


@pytest.mark.parametrize("name", ["chatml", "llama-3", "plain"])
def test_reasoning_goes_into_content_when_the_template_has_no_reasoning_support(name):
    tok = tokenizer_with(name)
    text = render(tok, REASONING_CHAT[:2], generation_prompt=False)
    assert "<think>\nTwo plus two is four.\n</think>\n\n4" in text
    # prefix-stable: the earlier reasoning stays, so one sequence trains both turns
    [enc] = encode_conversation(tok, REASONING_CHAT)
    assert "Two plus two" in loss_text(tok, enc) and "Three plus three" in loss_text(tok, enc)
    [masked] = encode_conversation(tok, REASONING_CHAT, train_on_reasoning=False)
    assert "think" not in loss_text(tok, masked) and "4" in loss_text(tok, masked)


# --- built-ins -------------------------------------------------------------------------------

EXPECTED_LOSS = {
    "chatml": "blue<|im_end|>\ndark green<|im_end|>\n",
    # each turn is the last of its own sequence, so each gets Qwen3's (empty) think block
    "qwen3": "<think>\n\n</think>\n\nblue<|im_end|>\n<think>\n\n</think>\n\ndark green<|im_end|>\n",
    "llama-3": "blue<|eot_id|>dark green<|eot_id|>",
    "gemma": "blue<end_of_turn>\ndark green<end_of_turn>\n",
    "mistral": " blue<|im_end|> dark green<|im_end|>",
    "phi": "blue<|end|>\ndark green<|end|>\n",
    "alpaca": "blue<|im_end|>\n\ndark green<|im_end|>\n\n",
    "plain": "blue<|im_end|>dark green<|im_end|>",
}


def test_every_builtin_has_a_golden_mask():
    assert set(EXPECTED_LOSS) == set(BUILTIN_TEMPLATES)


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_generation_prompt_is_a_prefix_and_masks_are_exact(name):
    tok = tokenizer_with(name)
    full = render(tok, TWO_TURNS, generation_prompt=False)
    for message in TWO_TURNS:  # nothing is silently dropped
        assert message["content"] in full
    for i in (2, 4):
        prompt = render(tok, TWO_TURNS[:i], generation_prompt=True)
        assert render(tok, TWO_TURNS[: i + 1], generation_prompt=False).startswith(prompt)
    encoded = encode_conversation(tok, TWO_TURNS)
    if name == "qwen3":  # turn 1 loses its think block once turn 2 follows: one sequence per turn
        assert len(encoded) == 2
        assert "".join(loss_text(tok, e) for e in encoded) == EXPECTED_LOSS[name]
    else:
        [enc] = encoded
        assert text_of(tok, enc) == full
        assert loss_text(tok, enc) == EXPECTED_LOSS[name]


def test_plain_is_prompt_then_completion_then_eos():
    tok = tokenizer_with("plain")
    chat = [
        {"role": "user", "content": "The capital of France is"},
        {"role": "assistant", "content": " Paris."},
    ]
    enc = encode_chat(tok, chat)
    assert text_of(tok, enc) == "<|endoftext|>The capital of France is Paris.<|im_end|>"
    assert loss_text(tok, enc) == " Paris.<|im_end|>"
    assert tok.decode(encode_prompt(tok, chat[:1])) == "<|endoftext|>The capital of France is"


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_selected_builtin_is_what_the_saved_tokenizer_carries(name, tmp_path: Path):
    tok = build_tiny_tokenizer()
    select_template(tok, name)
    tok.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == BUILTIN_TEMPLATES[name]


def test_no_template_error_lists_every_builtin():
    tok = build_tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(TemplateError) as err:
        select_template(tok, None)
    for name in BUILTIN_TEMPLATES:
        assert name in str(err.value)
    assert "'plain'" in str(err.value)


def test_template_that_cannot_give_exact_masks_is_refused():
    tok = build_tiny_tokenizer()
    # the generation prompt announces the assistant differently from how its turn is rendered
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT: ' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="cannot give exact loss masks"):
        encode_conversation(tok, TWO_TURNS)


# --- GGUF ------------------------------------------------------------------------------------


def _tiny_gguf(path: Path, template: str | None) -> Path:
    from tunelab.models.gguf_write import write_llama_gguf
    from tunelab.models.tiny import build_tiny_llama

    tok = build_tiny_tokenizer()
    tok.chat_template = template
    return write_llama_gguf(build_tiny_llama(tok, num_layers=1), tok, path)


def test_gguf_template_is_read_from_the_file_metadata(tmp_path: Path):
    from tunelab.models.load import load_tokenizer

    path = _tiny_gguf(tmp_path / "qwen3.gguf", BUILTIN_TEMPLATES["qwen3"])
    assert load_tokenizer(path, cache=False).chat_template == BUILTIN_TEMPLATES["qwen3"]


def test_gguf_base_model_without_template_needs_a_builtin(tmp_path: Path):
    from tunelab.models.load import load_tokenizer

    tok = load_tokenizer(_tiny_gguf(tmp_path / "base.gguf", None), cache=False)
    assert tok.chat_template is None
    with pytest.raises(TemplateError, match="no chat template.*chatml, qwen3, llama-3.*plain"):
        select_template(tok, None)
    assert select_template(tok, "plain") == []
    chat = [{"role": "user", "content": "Two plus two is"}, {"role": "assistant", "content": " four."}]
    assert loss_text(tok, encode_chat(tok, chat)) == " four." + tok.eos_token
    tok.save_pretrained(tmp_path / "final")
    assert AutoTokenizer.from_pretrained(tmp_path / "final").chat_template == BUILTIN_TEMPLATES["plain"]


# --- property: the loss characters are exactly the trained assistant turns --------------------

TEXT = st.text(alphabet="abcxyz ABC 0123.,?!'\n é東🙂", min_size=0, max_size=12)
ROLES = st.sampled_from(["user", "assistant", "tool"])
ARGS = st.dictionaries(st.sampled_from(["city", "n", "q"]), st.one_of(TEXT, st.integers(-5, 99)), max_size=2)


def assistant_message(draw, *, tool_calls: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": draw(TEXT)}
    if tool_calls:
        message["tool_calls"] = [
            {"type": "function", "function": {"name": draw(st.sampled_from(["f", "get"])), "arguments": a}}
            for a in draw(st.lists(ARGS, min_size=1, max_size=2))
        ]
    if draw(st.booleans()):
        message["reasoning_content"] = draw(TEXT)
    if draw(st.booleans()):
        message["weight"] = draw(st.sampled_from([0, 1]))
    return message


@st.composite
def conversations(draw) -> list[dict[str, Any]]:
    """Exchanges (user; agent steps of tool calls and results; an answer), then a few random turns
    so that odd shapes (two assistant turns in a row, a trailing user turn) come up too."""
    chat: list[dict[str, Any]] = []
    if draw(st.booleans()):
        chat.append({"role": "system", "content": draw(TEXT)})
    for _ in range(draw(st.integers(1, 3))):
        chat.append({"role": "user", "content": draw(TEXT)})
        for _ in range(draw(st.integers(0, 2))):
            chat.append(assistant_message(draw, tool_calls=True))
            chat.extend({"role": "tool", "content": draw(TEXT)} for _ in range(draw(st.integers(1, 2))))
        chat.append(assistant_message(draw, tool_calls=draw(st.booleans())))
    for role in draw(st.lists(ROLES, max_size=2)):
        if role == "assistant":
            chat.append(assistant_message(draw, tool_calls=draw(st.booleans())))
        else:
            chat.append({"role": role, "content": draw(TEXT)})
    return chat


def _assistant_text(m: dict[str, Any], template: str, with_block: bool) -> tuple[str, int]:
    """An assistant turn's rendered body (after ``<|im_start|>assistant\\n``) and the length of its
    leading think block (0 if none): chatml moves reasoning into the content, qwen3 renders it."""
    reasoning, content = m.get("reasoning_content", ""), m["content"]
    if template == "chatml":
        block = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n" if reasoning.strip("\n") else ""
        content = block + content
        body = content
    else:
        block = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n" if with_block else ""
        body = block + content.lstrip("\n") if with_block else content
    for j, call in enumerate(m.get("tool_calls", [])):
        fn, args = call["function"], json.dumps(call["function"]["arguments"], ensure_ascii=False)
        body += "\n" if j or content else ""
        body += f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {args}}}\n</tool_call>'
    return body + "<|im_end|>\n", len(block)


def oracle(
    chat: list[dict[str, Any]], template: str, train_on_reasoning: bool
) -> tuple[str, dict[int, tuple]]:
    """ChatML / Qwen3 rendering written out in Python, with the loss span of every assistant turn."""
    last_query = max(k for k, m in enumerate(chat) if m["role"] == "user")
    out, spans = "", {}
    for k, m in enumerate(chat):
        if m["role"] in ("system", "user"):
            out += f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
        elif m["role"] == "tool":
            out += "<|im_start|>user" if chat[k - 1]["role"] != "tool" else ""
            out += f"\n<tool_response>\n{m['content']}\n</tool_response>"
            out += "<|im_end|>\n" if k == len(chat) - 1 or chat[k + 1]["role"] != "tool" else ""
        else:
            # Qwen3: a think block only after the last user query, on the last turn or one with reasoning
            with_block = k > last_query and (k == len(chat) - 1 or bool(m.get("reasoning_content")))
            body, block = _assistant_text(m, template, with_block)
            out += "<|im_start|>assistant\n"
            start = len(out)
            out += body
            if block and not train_on_reasoning:
                start = len(out) - len(body[block:].lstrip())
            spans[k] = (start, len(out))
    return out, spans


def expected_sequences(chat, template, train_on_reasoning) -> list[tuple[str, list[tuple[int, int]]]] | None:
    """One sequence if every trained turn renders in the whole conversation as in its own position,
    else one per trained turn (the render up to that turn); None when no exact mask exists (Qwen3
    with two assistant turns in a row: the first gets an empty think block only while it is last)."""
    trained = [k for k, m in enumerate(chat) if m["role"] == "assistant" and m.get("weight", 1) != 0]
    if not trained:
        return []
    full, _ = oracle(chat, template, train_on_reasoning)
    own = [(oracle(chat[: k + 1], template, train_on_reasoning), k) for k in trained]
    for (text, _), k in own:  # the prompt at inference must be how the turn starts, else no exact mask
        if not text.startswith(oracle(chat[:k], template, True)[0] + "<|im_start|>assistant\n"):
            return None
    if all(full.startswith(text) for (text, _), _ in own):
        return [(full, [spans[k] for (_, spans), k in own])]
    return [(text, [spans[k]]) for (text, spans), k in own]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chat=conversations(), template=st.sampled_from(["chatml", "qwen3"]), train_on_reasoning=st.booleans())
def test_loss_characters_are_exactly_the_trained_assistant_turns(chat, template, train_on_reasoning):
    tok = tokenizer_with(template)
    expected = expected_sequences(chat, template, train_on_reasoning)
    if expected is None:
        event(f"{template}: no exact mask")
        with pytest.raises(TemplateError, match="cannot give exact loss masks"):
            encode_conversation(tok, chat, train_on_reasoning=train_on_reasoning)
        return
    if not expected:
        reason = "weight 0" if any(m["role"] == "assistant" for m in chat) else "no assistant turn"
        with pytest.raises(TemplateError, match=reason):
            encode_conversation(tok, chat, train_on_reasoning=train_on_reasoning)
        return
    if template == "chatml":  # ChatML never rewrites earlier turns
        assert len(expected) == 1
    assert render(tok, chat, generation_prompt=False) == oracle(chat, template, train_on_reasoning)[0]
    encoded = encode_conversation(tok, chat, train_on_reasoning=train_on_reasoning)
    assert len(encoded) == len(expected)
    event(f"{template}: {'one sequence' if len(expected) == 1 else 'per-turn sequences'}")
    for enc, (text, spans) in zip(encoded, expected):
        want = {c for s, e in spans for c in range(s, e)}
        trained = loss_chars(tok, text, enc)
        assert trained <= want  # never a character of system, user or tool text, nor markup outside
        # a trained-turn character without loss can only be in a token that crosses the turn's edge
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        crossing = {
            c for s, e in offsets if any(s < a < e or s < b < e for a, b in spans) for c in range(s, e)
        }
        assert want - trained <= crossing


def test_a_template_refusing_the_conversation_is_a_template_error():
    tok = tokenizer_with("gemma")
    chat = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}, TWO_TURNS[2]]
    with pytest.raises(TemplateError, match="built-in 'gemma' template refused.*must alternate"):
        encode_conversation(tok, chat)


def test_qwen3_two_assistant_turns_in_a_row_are_refused_with_the_reason():
    tok = tokenizer_with("qwen3")
    chat = [TWO_TURNS[1], TWO_TURNS[2], {"role": "assistant", "content": "or red"}]
    with pytest.raises(TemplateError, match="turn 2: .*Qwen3 with two assistant turns in a row.*merge"):
        encode_conversation(tok, chat)


# Training a template-less GGUF with data.template: plain, and final/ carrying it: tests/test_byod.py.
