"""Tool calling in `tunelab serve`: request tools and tool messages, the prompt the template renders
from them, the parser for Hermes/Qwen `<tool_call>` blocks, and the OpenAI-shaped answer (streamed
or not). Generation is replaced by a stub returning canned text, so the tests are exact and fast;
the prompt is rendered by the tiny model's real tokenizer."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tunelab.models.load import load_model
from tunelab.models.tiny import build_tiny_tokenizer
from tunelab.serve.app import ServeSettings, create_app
from tunelab.serve.engine import Delta, Done, Engine, make_decoder
from tunelab.serve.routing import Router, WatchPolicy
from tunelab.serve.schemas import ChatCompletionRequest
from tunelab.serve.tools import (
    OPEN,
    ToolCallStream,
    ToolRequestError,
    check_template,
    parse_tool_calls,
    template_messages,
)

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOCAL = "http://127.0.0.1:8000"  # a Host the server answers (it refuses names it was not given)

# Qwen2.5's template, trimmed of its default system prompt: tools as JSON lines inside <tools>,
# calls as <tool_call> blocks, tool results as <tool_response> in a user turn.
QWEN_TEMPLATE = """\
{%- if tools %}{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags.<|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or \
(message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}{%- set tool_call = tool_call.function %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + (tool_call.arguments | tojson) + '}\\n</tool_call>' }}
{%- endfor %}{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
GENERATED = f"Let me look that up.\n{CALL}\n" + CALL.replace("Paris", "Nice")


# ---- the parser -------------------------------------------------------------------------------


def test_parser_returns_each_call_and_the_content_outside_the_blocks() -> None:
    content, calls = parse_tool_calls(GENERATED)
    assert content == "Let me look that up."
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Nice"}),
    ]
    shaped = calls[0].openai()
    assert shaped["type"] == "function" and shaped["id"].startswith("call_")
    assert json.loads(shaped["function"]["arguments"]) == {"city": "Paris"}
    assert calls[0].id != calls[1].id


def test_parser_content_is_none_when_only_calls_and_text_when_no_calls() -> None:
    assert parse_tool_calls(f"\n{CALL}\n")[0] is None
    assert parse_tool_calls("just words ") == ("just words", [])


def test_parser_reads_arguments_given_as_a_json_string() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert [(c.name, c.arguments) for c in calls] == [("f", {"x": 1})]


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>\n{name: get_weather}\n</tool_call>",  # not JSON
        '<tool_call>\n{"arguments": {}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',  # arguments not an object
        '<tool_call>\n["f"]\n</tool_call>',  # not an object
        '<tool_call>\n{"name": "f", "arguments": {"x": ',  # cut off by max_tokens: unclosed
    ],
)
def test_a_malformed_block_stays_in_the_content_as_written(bad: str) -> None:
    content, calls = parse_tool_calls(f"{bad}\n{CALL}")
    assert content == bad.strip() or content == f"{bad}\n{CALL}"  # unclosed: the later block is inside it
    assert all(c.name == "get_weather" for c in calls)
    if bad.endswith("</tool_call>"):
        assert len(calls) == 1 and content == bad


def test_streamed_content_plus_the_final_rest_equals_the_unstreamed_content() -> None:
    texts = [
        GENERATED,
        f"  \n{CALL}",
        "no calls at all  ",
        "ends in <tool",
        f"a <tool_call>bad</tool_call> b\n{CALL}",
    ]
    for text in texts:
        content, calls = parse_tool_calls(text)
        for size in (1, 2, 3, 7, len(text)):
            stream = ToolCallStream()
            sent = "".join(stream.feed(text[i : i + size]) for i in range(0, len(text), size))
            rest, streamed_calls = stream.finish(text)
            assert sent + rest == (content or ""), (text, size)
            assert [c.arguments for c in streamed_calls] == [c.arguments for c in calls]
            assert "<" not in sent or OPEN not in text, "a piece of a call marker was streamed"


def test_tool_call_markers_survive_decoding_when_the_tokenizer_marks_them_special() -> None:
    """Otherwise skip_special_tokens would strip them and the parser would silently find no call."""
    tokenizer = build_tiny_tokenizer()
    text = f"<|im_start|>{CALL}<|im_end|>"
    plain_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert make_decoder(tokenizer)(plain_ids) == tokenizer.decode(plain_ids, skip_special_tokens=True) == CALL
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(plain_ids)  # the markers are single special tokens now
    assert OPEN not in tokenizer.decode(ids, skip_special_tokens=True)
    decoded = make_decoder(tokenizer)(ids)
    assert decoded == CALL  # markers kept, the other special tokens still skipped
    assert [c.arguments for c in parse_tool_calls(decoded)[1]] == [{"city": "Paris"}]


# ---- request schema and message conversion ----------------------------------------------------

HISTORY = [
    *ASK,
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
]


def test_the_schema_accepts_tools_tool_calls_and_tool_messages() -> None:
    body = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": HISTORY, "tools": [WEATHER], "tool_choice": "auto"}
    )
    assert body.active_tools() == [WEATHER]
    messages = template_messages(body.messages)
    assert messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    }
    assert messages[2] == {"role": "tool", "content": '{"temp_c": 21}', "tool_call_id": "call_1"}


def test_a_call_echoed_from_a_streamed_response_keeps_working() -> None:
    """Clients that accumulate streamed deltas send the call back with its ``index``."""
    echoed = json.loads(json.dumps(HISTORY))
    echoed[1]["tool_calls"][0]["index"] = 0
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": echoed})
    assert template_messages(body.messages)[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_tool_choice_none_and_an_empty_tool_list_mean_no_tools() -> None:
    for extra in ({"tools": [WEATHER], "tool_choice": "none"}, {"tools": []}):
        assert (
            ChatCompletionRequest.model_validate({"model": "m", "messages": ASK, **extra}).active_tools()
            is None
        )


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "tool", "tool_call_id": "call_1", "content": "21"}], "messages.0"),
        ([*ASK, {"role": "tool", "content": "21"}], "messages.1"),
        (
            [*HISTORY[:2], {"role": "tool", "tool_call_id": "call_9", "content": "21"}],
            "messages.2.tool_call_id",
        ),
    ],
)
def test_a_tool_result_without_its_call_is_refused_naming_the_message(messages: list, param: str) -> None:
    body = ChatCompletionRequest.model_validate({"model": "m", "messages": messages})
    with pytest.raises(ToolRequestError) as caught:
        template_messages(body.messages)
    assert caught.value.param == param


def test_check_template_refuses_what_a_template_would_drop() -> None:
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(ToolRequestError, match="cannot render tools") as caught:
        check_template(plain, ASK, [WEATHER], "'tiny'")
    assert caught.value.param == "tools"
    messages = template_messages(
        ChatCompletionRequest.model_validate({"model": "m", "messages": HISTORY}).messages
    )
    with pytest.raises(ToolRequestError) as caught:
        check_template(plain, messages, None, "'tiny'")
    assert caught.value.param == "messages.1.tool_calls"
    check_template(QWEN_TEMPLATE, messages, [WEATHER], "'qwen'")  # renders both: no error


def test_a_schema_error_in_a_tool_call_names_the_field() -> None:
    bad = json.loads(json.dumps(HISTORY))
    bad[1]["tool_calls"][0]["function"]["arguments"] = '{"city": Paris}'
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate({"model": "m", "messages": bad})
    (error,) = caught.value.errors()
    assert error["loc"] == ("messages", 1, "tool_calls", 0, "function", "arguments")
    assert "not valid JSON" in error["msg"]


# ---- through the app --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Engine:
    model, tokenizer = load_model("tiny:llama", device="cpu", dtype="auto", seed=0)
    return Engine(model.eval(), tokenizer, base_name="tiny:llama", max_tokens_limit=64)


@pytest.fixture
def app_client(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app over the tiny engine; its template is Qwen's, and generation returns ``engine.canned``."""
    monkeypatch.setattr(engine, "base_template", QWEN_TEMPLATE)
    monkeypatch.setattr(engine, "canned", GENERATED, raising=False)
    monkeypatch.setattr(engine, "seen", [], raising=False)

    def generate(rows: list) -> None:  # the engine decodes a batch of rows; each is answered here
        for row in rows:
            job = row.job
            engine.seen.append(job)
            if job.stream:
                for i in range(0, len(engine.canned), 5):  # deltas of 5 characters, as tokens would arrive
                    job.emit(Delta(engine.canned[i : i + 5]))
            row.finished = True
            job.emit(Done(engine.canned, "stop", len(job.prompt_ids), 9))

    monkeypatch.setattr(engine, "generate", generate)
    router = Router(engine.base_name, [], WatchPolicy(min_samples=3, max_latency_ratio=1e6))
    with TestClient(create_app(engine, router, ServeSettings(api_key=KEY)), base_url=LOCAL) as client:
        yield client


def prompt_text(engine: Engine) -> str:
    return engine.tokenizer.decode(engine.seen[-1].prompt_ids)


def test_tools_are_rendered_into_the_prompt_by_the_template(app_client: TestClient, engine: Engine) -> None:
    body = {"model": "tiny:llama", "messages": HISTORY, "tools": [WEATHER]}
    assert app_client.post("/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    prompt = prompt_text(engine)
    assert json.dumps(WEATHER) in prompt  # the whole schema, as the template's `tojson` writes it
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_a_generated_tool_call_comes_back_as_openai_tool_calls(app_client: TestClient) -> None:
    client = openai.OpenAI(base_url=f"{LOCAL}/v1", api_key=KEY, http_client=app_client, max_retries=0)
    reply = client.chat.completions.create(model="tiny:llama", messages=ASK, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me look that up."
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris"}),
        ("function", "get_weather", {"city": "Nice"}),
    ]
    assert all(c.id.startswith("call_") for c in calls) and calls[0].id != calls[1].id


def test_streamed_tool_calls_come_in_one_final_delta(app_client: TestClient) -> None:
    client = openai.OpenAI(base_url=f"{LOCAL}/v1", api_key=KEY, http_client=app_client, max_retries=0)
    chunks = list(
        client.chat.completions.create(model="tiny:llama", messages=ASK, tools=[WEATHER], stream=True)
    )
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Let me look that up."
    with_calls = [d.tool_calls for d in deltas if d.tool_calls]
    assert len(with_calls) == 1
    assert [(t.index, t.function.name, json.loads(t.function.arguments)) for t in with_calls[0]] == [
        (0, "get_weather", {"city": "Paris"}),
        (1, "get_weather", {"city": "Nice"}),
    ]
    assert all(OPEN not in (d.content or "") for d in deltas)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_text_is_returned_as_written(app_client: TestClient, engine: Engine) -> None:
    for extra in ({}, {"tools": [WEATHER], "tool_choice": "none"}):
        response = app_client.post(
            "/v1/chat/completions", json={"model": "tiny:llama", "messages": ASK, **extra}, headers=AUTH
        )
        choice = response.json()["choices"][0]
        assert choice["message"]["content"] == GENERATED and choice["message"]["tool_calls"] is None
        assert choice["finish_reason"] == "stop"
        assert "get_weather" not in prompt_text(engine)  # tool_choice none: the model is told of no tools


def test_a_malformed_generated_call_is_content_not_a_crash(app_client: TestClient, engine: Engine) -> None:
    engine.canned = "<tool_call>\n{get_weather(Paris)}\n</tool_call>"
    response = app_client.post(
        "/v1/chat/completions",
        json={"model": "tiny:llama", "messages": ASK, "tools": [WEATHER]},
        headers=AUTH,
    )
    choice = response.json()["choices"][0]
    assert response.status_code == 200 and choice["finish_reason"] == "stop"
    assert choice["message"] == {"role": "assistant", "content": engine.canned, "tool_calls": None}


def test_a_template_that_cannot_render_tools_is_a_400_naming_tools(
    app_client: TestClient, engine: Engine
) -> None:
    engine.base_template = engine.tokenizer.chat_template  # the tiny model's own ChatML: no tools
    response = app_client.post(
        "/v1/chat/completions",
        json={"model": "tiny:llama", "messages": ASK, "tools": [WEATHER]},
        headers=AUTH,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (
        error["param"] == "tools"
        and "cannot render tools" in error["message"]
        and "'tiny:llama'" in error["message"]
    )
    assert not engine.seen


@pytest.mark.parametrize(
    ("change", "param", "message"),
    [
        (
            lambda b: b["messages"][1]["tool_calls"][0]["function"].update(arguments="{city: Paris}"),
            "messages.1.tool_calls.0.function.arguments",
            "not valid JSON",
        ),
        (
            lambda b: b["messages"][1]["tool_calls"][0]["function"].update(arguments="[1, 2]"),
            "messages.1.tool_calls.0.function.arguments",
            "JSON object",
        ),
        (
            lambda b: b["messages"][1]["tool_calls"][0]["function"].update(arguments=7),
            "messages.1.tool_calls.0.function.arguments",
            "valid",
        ),
        (
            lambda b: b["tools"][0]["function"].update(parameters="an object"),
            "tools.0.function.parameters",
            "dictionary",
        ),
        (lambda b: b["tools"][0]["function"].update(name="get weather!"), "tools.0.function.name", "pattern"),
        (
            lambda b: b["tools"][0]["function"].update(strict=True),
            "tools.0.function.strict",
            "constrained decoding",
        ),
        (lambda b: b["tools"].append(WEATHER), "tools", "two tools are named get_weather"),
        (lambda b: b["tools"][0].update(type="retrieval"), "tools.0.type", "function"),
        (lambda b: b.update(tool_choice="required"), "tool_choice", "constrained decoding"),
        (
            lambda b: b.update(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
            "tool_choice",
            "'none'",
        ),
        (
            lambda b: b["messages"][0].update(tool_calls=b["messages"][1]["tool_calls"]),
            "messages.0.tool_calls",
            "only an assistant",
        ),
        (lambda b: b["messages"][2].update(tool_call_id="call_7"), "messages.2.tool_call_id", "call_1"),
        (lambda b: b["messages"].pop(1), "messages.1", "must follow an assistant message"),
    ],
)
def test_hostile_tool_requests_are_400s_naming_the_field(
    app_client: TestClient, engine: Engine, change: object, param: str, message: str
) -> None:
    body = json.loads(json.dumps({"model": "tiny:llama", "messages": HISTORY, "tools": [WEATHER]}))
    change(body)
    response = app_client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert "Value error" not in error["message"] and not engine.seen


def _memorise(model: torch.nn.Module, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """Train the tiny model on one (prompt with tools → tool call) example until it repeats it."""
    ids = torch.tensor([prompt_ids + answer_ids])
    labels = torch.tensor([[-100] * len(prompt_ids) + answer_ids])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(200):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        if loss.item() < 0.02:  # every answer token is the argmax by a wide margin
            break
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@pytest.mark.slow
def test_a_model_trained_on_a_tool_call_answers_with_it_through_real_generation() -> None:
    """No stub: the tiny model learns to answer the tool-rendered prompt with a call; the server's own
    generation, decoding and parsing turn it into tool_calls, streamed or not."""
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny:llama", device="cpu", dtype="auto", seed=0)
    engine = Engine(model, tokenizer, base_name="tiny:llama", max_tokens_limit=64)
    engine.base_template = QWEN_TEMPLATE
    prompt_ids = engine.encode_chat(ASK, None, tools=[WEATHER])
    assert (
        _memorise(model, prompt_ids, tokenizer(CALL + "<|im_end|>", add_special_tokens=False)["input_ids"])
        < 0.02
    )
    router = Router(engine.base_name, [], WatchPolicy(min_samples=3, max_latency_ratio=1e6))
    with TestClient(create_app(engine, router, ServeSettings(api_key=KEY)), base_url=LOCAL) as http:
        client = openai.OpenAI(base_url=f"{LOCAL}/v1", api_key=KEY, http_client=http, max_retries=0)
        ask = {"model": "tiny:llama", "messages": ASK, "tools": [WEATHER], "temperature": 0, "max_tokens": 64}
        choice = client.chat.completions.create(**ask).choices[0]
        chunks = list(client.chat.completions.create(**ask, stream=True))
        without_tools = client.chat.completions.create(**{**ask, "tool_choice": "none"}).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    (streamed,) = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert (streamed.function.name, streamed.function.arguments) == (
        call.function.name,
        call.function.arguments,
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert without_tools.message.tool_calls is None  # a different prompt, and nothing parsed
