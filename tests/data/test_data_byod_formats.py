"""Issue 15, "bring your own data": files shaped as the peers document them (LLaMA-Factory's
Alpaca/ShareGPT, OpenAI's fine-tuning JSONL, TRL's dataset types) detected and canonicalised to
exactly the shared canonical rows; hostile rows rejected with a reason that names the problem."""

from __future__ import annotations

import json

import pytest

from tunelab.data.canonical import read_canonical
from tunelab.data.formats import (
    FORMATS,
    KIND,
    FormatError,
    canonical_text,
    detect_format,
    prompt_text,
    target_text,
    to_canonical,
    used_columns,
)
from tunelab.data.loaders import DataError


def _file(tmp_path, rows, name="data.jsonl"):
    """Write rows as JSONL, or as one JSON array (LLaMA-Factory's shape) for a .json name."""
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read(tmp_path, rows, name="data.jsonl", columns=None):
    """(detected format, canonical rows) through the same path training reads files by."""
    out, _, fmt = read_canonical(str(_file(tmp_path, rows, name)), columns=columns)
    return fmt, [c for _, c in out]


def U(content):  # noqa: N802 - short message builders keep the expected rows readable
    return {"role": "user", "content": content}


def A(content, **kw):  # noqa: N802
    return {"role": "assistant", "content": content, **kw}


def S(content):  # noqa: N802
    return {"role": "system", "content": content}


def call(name, arguments, **kw):
    return {"type": "function", "function": {"name": name, "arguments": arguments}, **kw}


WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TOOLS = [{"type": "function", "function": WEATHER}]


# ---- Alpaca (LLaMA-Factory data/README.md shapes, a JSON array) -----------------------------------


def test_alpaca_with_system_and_history(tmp_path):
    rows = [
        {
            "instruction": "And in Rome?",
            "input": "",
            "output": "Sunny, 24 C.",
            "system": "You are a weather bot.",
            "history": [["Weather in Oslo?", "Rain, 9 C."]],
        }
    ]
    fmt, canon = _read(tmp_path, rows, "alpaca.json")
    assert fmt == "instruction" and KIND[fmt] == "chat"
    assert canon == [
        {
            "messages": [
                S("You are a weather bot."),
                U("Weather in Oslo?"),
                A("Rain, 9 C."),
                U("And in Rome?"),
                A("Sunny, 24 C."),
            ]
        }
    ]


def test_alpaca_preference_and_kto(tmp_path):
    pref = [{"instruction": "Name a prime.", "input": "below 10", "chosen": "7", "rejected": "9"}]
    fmt, canon = _read(tmp_path, pref, "pref.json")
    assert fmt == "preference"
    assert canon == [{"prompt": [U("Name a prime.\n\nbelow 10")], "chosen": [A("7")], "rejected": [A("9")]}]
    kto = [{"instruction": "Name a prime.", "input": "", "output": "9", "kto_tag": False}]
    fmt, canon = _read(tmp_path, kto, "kto.json")
    assert fmt == "unpaired"  # the tag is used, never dropped into plain SFT on a bad answer
    assert canon == [{"prompt": [U("Name a prime.")], "completion": [A("9")], "label": False}]


# ---- ShareGPT (LLaMA-Factory), incl. tools, function_call/observation, preference, KTO ---------------


def test_sharegpt_tool_use(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "Weather in Rome?"},
                {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
                {"from": "observation", "value": '{"temp_c": 24}'},
                {"from": "gpt", "value": "It is 24 C in Rome."},
            ],
            "system": "Use tools when needed.",
            "tools": json.dumps([WEATHER]),
        }
    ]
    fmt, canon = _read(tmp_path, rows, "sharegpt.json")
    assert fmt == "chat"
    assert canon == [
        {
            "messages": [
                S("Use tools when needed."),
                U("Weather in Rome?"),
                A("", tool_calls=[call("get_weather", {"city": "Rome"})]),
                {"role": "tool", "content": '{"temp_c": 24}'},
                A("It is 24 C in Rome."),
            ],
            "tools": TOOLS,
        }
    ]


def test_sharegpt_parallel_function_calls():
    value = json.dumps([{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"x": 1}}])
    row = {
        "conversations": [
            {"from": "human", "value": "q"},
            {"from": "function_call", "value": value},
            {"from": "observation", "value": "r1"},
            {"from": "observation", "value": "r2"},
            {"from": "gpt", "value": "done"},
        ]
    }
    msgs = to_canonical(row, "chat")["messages"]
    assert msgs[1] == A("", tool_calls=[call("a", {}), call("b", {"x": 1})])
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool", "assistant"]


def test_sharegpt_preference_and_kto(tmp_path):
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "Hi"},
                {"from": "gpt", "value": "Hello!"},
                {"from": "human", "value": "Capital of France?"},
            ],
            "chosen": {"from": "gpt", "value": "Paris."},
            "rejected": {"from": "gpt", "value": "Lyon."},
        }
    ]
    fmt, canon = _read(tmp_path, rows, "dpo.json")
    assert fmt == "preference"
    assert canon == [
        {
            "prompt": [U("Hi"), A("Hello!"), U("Capital of France?")],
            "chosen": [A("Paris.")],
            "rejected": [A("Lyon.")],
        }
    ]
    kto = [
        {
            "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "5"}],
            "kto_tag": False,
        }
    ]
    fmt, canon = _read(tmp_path, kto, "kto.json")
    assert fmt == "unpaired"
    assert canon == [{"prompt": [U("2+2?")], "completion": [A("5")], "label": False}]


# ---- OpenAI fine-tuning JSONL ------------------------------------------------------------------------


def test_openai_chat_with_weights_tool_calls_and_parts(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are terse."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Rome?"}],
                },
                {"role": "assistant", "content": "Let me guess: cold.", "weight": 0},
                {"role": "user", "content": "Check it."},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "24 C"},
                {"role": "assistant", "content": "24 C.", "weight": 1},
            ],
            "tools": TOOLS,
        }
    ]
    fmt, canon = _read(tmp_path, rows)
    assert fmt == "chat"
    assert canon == [
        {
            "messages": [
                S("You are terse."),
                U("Weather in Rome?"),
                A("Let me guess: cold.", weight=0),
                U("Check it."),
                A("", tool_calls=[call("get_weather", {"city": "Rome"}, id="call_1")]),
                {"role": "tool", "content": "24 C", "tool_call_id": "call_1"},
                A("24 C.", weight=1),
            ],
            "tools": TOOLS,
        }
    ]


def test_openai_preference(tmp_path):
    rows = [
        {
            "input": {"messages": [U("Is it cold in Oslo?")], "tools": [], "parallel_tool_calls": True},
            "preferred_output": [A("Yes, about 2 C today.")],
            "non_preferred_output": [A("No idea.")],
        },
        {
            "input": {"messages": [U("Weather in Rome?")], "tools": TOOLS},
            "preferred_output": [A("", tool_calls=[call("get_weather", '{"city": "Rome"}')])],
            "non_preferred_output": [A("It is sunny.")],
        },
    ]
    fmt, canon = _read(tmp_path, rows)
    assert fmt == "preference"
    assert canon == [
        {
            "prompt": [U("Is it cold in Oslo?")],
            "chosen": [A("Yes, about 2 C today.")],
            "rejected": [A("No idea.")],
        },
        {
            "prompt": [U("Weather in Rome?")],
            "chosen": [A("", tool_calls=[call("get_weather", {"city": "Rome"})])],
            "rejected": [A("It is sunny.")],
            "tools": TOOLS,
        },
    ]


# ---- TRL dataset types -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, fmt, expected",
    [
        ({"text": "The sky is blue."}, "text", {"text": "The sky is blue."}),
        ({"messages": [U("Sky colour?"), A("Blue.")]}, "chat", {"messages": [U("Sky colour?"), A("Blue.")]}),
        ({"prompt": "The sky is"}, "prompt", {"prompt": [U("The sky is")]}),
        ({"prompt": [U("Sky colour?")]}, "prompt", {"prompt": [U("Sky colour?")]}),
        (
            {"prompt": "The sky is", "completion": " blue."},
            "prompt_completion",
            {"messages": [U("The sky is"), A(" blue.")]},
        ),
        (
            {"prompt": [U("Sky colour?")], "completion": [A("Blue.")]},
            "prompt_completion",
            {"messages": [U("Sky colour?"), A("Blue.")]},
        ),
        (
            {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
            "preference",
            {"prompt": [U("The sky is")], "chosen": [A(" blue.")], "rejected": [A(" green.")]},
        ),
        (
            {"chosen": [U("Sky?"), A("Blue.")], "rejected": [U("Sky?"), A("Green.")]},
            "preference",
            {"prompt": [U("Sky?")], "chosen": [A("Blue.")], "rejected": [A("Green.")]},
        ),
        (
            {"prompt": "The sky is", "completion": " green.", "label": False},
            "unpaired",
            {"prompt": [U("The sky is")], "completion": [A(" green.")], "label": False},
        ),
        (
            {"prompt": [U("Sky?")], "completion": [A("Blue.")], "label": True},
            "unpaired",
            {"prompt": [U("Sky?")], "completion": [A("Blue.")], "label": True},
        ),
        (
            {"messages": [U("Hi"), A("Hey"), U("Sky?"), A("Green.")], "label": False},
            "unpaired",
            {"prompt": [U("Hi"), A("Hey"), U("Sky?")], "completion": [A("Green.")], "label": False},
        ),
        (
            {"text": "great film", "label": "positive"},
            "classification",
            {"text": "great film", "label": "positive"},
        ),
    ],
)
def test_trl_types(tmp_path, row, fmt, expected):
    got_fmt, canon = _read(tmp_path, [row])
    assert (got_fmt, canon) == (fmt, [expected])


def test_chosen_rejected_messages(tmp_path):
    rows = [
        {"prompt": "Sky?", "chosen_messages": [A("Blue.")], "rejected_messages": [A("Green.")]},
    ]
    fmt, canon = _read(tmp_path, rows)
    assert fmt == "preference"
    assert canon == [{"prompt": [U("Sky?")], "chosen": [A("Blue.")], "rejected": [A("Green.")]}]
    implicit = {"chosen_messages": [U("Sky?"), A("Blue.")], "rejected_messages": [U("Sky?"), A("Green.")]}
    assert to_canonical(implicit, detect_format(implicit)) == canon[0]


# ---- loss weights, reasoning, column mapping -----------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, weight",
    [("weight", 0, 0), ("weight", 1.0, 1), ("loss_weight", 0, 0), ("train", False, 0), ("training", True, 1)],
)
def test_weight_spellings(key, value, weight):
    row = {"messages": [U("q"), {"role": "assistant", "content": "a", key: value}]}
    assert to_canonical(row, "chat")["messages"][1] == A("a", weight=weight)


def test_weight_on_other_roles():
    # Axolotl-style `train: false` on user turns says what happens anyway: accepted, dropped.
    quiet = {
        "conversations": [{"from": "human", "value": "q", "train": False}, {"from": "gpt", "value": "a"}]
    }
    assert to_canonical(quiet, "chat")["messages"] == [U("q"), A("a")]
    with pytest.raises(
        FormatError, match=r"messages\[0\].weight asks for loss on a user message, which has no effect"
    ):
        to_canonical({"messages": [{**U("q"), "weight": 1}, A("a")]}, "chat")
    with pytest.raises(FormatError, match=r"weight must be 0 or 1"):
        to_canonical({"messages": [U("q"), A("a", weight=0.5)]}, "chat")


def test_column_mapping_of_message_keys():
    row = {"dialog": [{"speaker": "user", "text": "q"}, {"speaker": "assistant", "text": "a", "my_flag": 0}]}
    cols = {"messages": "dialog", "role": "speaker", "content": "text", "weight": "my_flag"}
    assert detect_format(row, cols) == "chat"
    assert to_canonical(row, "chat", cols) == {"messages": [U("q"), A("a", weight=0)]}
    assert used_columns(row, "chat", cols) == {"dialog"}


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning", "thinking"])
def test_reasoning_spellings_kept(key):
    row = {"messages": [U("2+2?"), {"role": "assistant", "content": "<think>add</think>4", key: "2 plus 2"}]}
    msg = to_canonical(row, "chat")["messages"][1]
    assert msg == A("<think>add</think>4", reasoning_content="2 plus 2")  # <think> left as written


def test_bool_label_never_becomes_a_class():
    with pytest.raises(FormatError, match="field 'label' is true \\(a boolean\\)"):
        to_canonical({"text": "t", "label": True}, "classification")
    # with a conversation, a label means unpaired preference, not a dropped column
    assert detect_format(["messages", "label"]) == "unpaired"
    assert detect_format(["prompt", "completion", "label"]) == "unpaired"


@pytest.mark.parametrize("value, label", [(1, True), (0, False), ("true", True), ("False", False)])
def test_unpaired_label_spellings(value, label):
    row = {"prompt": "p", "completion": "c", "label": value}
    assert to_canonical(row, "unpaired")["label"] is label


# ---- hostile rows ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row, fmt, reason",
    [
        (
            {"messages": [{"role": "narrator", "content": "x"}, A("a")]},
            "chat",
            r"messages\[0\] has unknown role 'narrator'",
        ),
        (
            {"conversations": [{"from": "alien", "value": "x"}]},
            "chat",
            r"conversations\[0\] has unknown ShareGPT speaker 'alien'",
        ),
        (
            {
                "messages": [
                    U("q"),
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "get_weather", "arguments": "{city: Rome}"}}],
                    },
                ]
            },
            "chat",
            r"messages\[1\]\.tool_calls\[0\] \(get_weather\): the arguments must be valid JSON, got .\{city: Rome\}. \(Expecting property name",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "function_call", "value": "get_weather(Rome)"},
                ]
            },
            "chat",
            r"conversations\[1\]: the function_call value must be valid JSON",
        ),
        (
            {"messages": [U("q"), {"role": "tool", "content": "24 C"}, A("a")]},
            "chat",
            r"messages\[1\] is a tool result with no preceding assistant tool call",
        ),
        (
            {
                "messages": [
                    U("q"),
                    A("", tool_calls=[call("f", {}, id="c1")]),
                    {"role": "tool", "tool_call_id": "c2", "content": "r"},
                ]
            },
            "chat",
            r"messages\[2\] answers tool call id 'c2'",
        ),
        ({"messages": [U("q"), A("  \n")]}, "chat", r"messages\[1\] is an empty assistant turn"),
        ({"instruction": "q", "output": ""}, "instruction", r"output\[0\] is an empty assistant turn"),
        (
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            "preference",
            r"'chosen' and 'rejected' are identical",
        ),
        (
            {"prompt": "q", "completion": "c", "label": "good"},
            "unpaired",
            r"field 'label' must be true or false",
        ),
        ({"prompt": "q", "completion": "c", "label": 2}, "unpaired", r"must be true or false .* got 2"),
        (
            {"messages": [U("q"), A("a")], "label": True, "tools": "not json"},
            "unpaired",
            r"tools: the tool list must be valid JSON",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "chat",
            r"content part of type 'image_url'",
        ),
        (
            {
                "conversations": [
                    {"from": "human", "value": "q"},
                    {"from": "gpt", "value": ""},
                    {"from": "human", "value": "q2"},
                ],
                "chosen": {"from": "gpt", "value": "a"},
                "rejected": {"from": "gpt", "value": "b"},
            },
            "preference",
            r"conversations\[1\] is an empty assistant turn",
        ),
        (
            {"instruction": "q", "chosen": "same", "rejected": "same"},
            "preference",
            r"'chosen' and 'rejected' are identical",
        ),
        (
            {"chosen_messages": [U("q"), A("x")], "rejected_messages": [U("q"), A("x")]},
            "preference",
            r"'chosen_messages' and 'rejected_messages' are identical",
        ),
        ({"messages": [U("q"), A("a")], "label": True}, "unpaired", None),  # control: fits
    ],
)
def test_hostile_rows_rejected_with_reason(row, fmt, reason):
    assert detect_format(row) == fmt
    if reason is None:
        to_canonical(row, fmt)
        return
    with pytest.raises(FormatError, match=reason) as exc:
        to_canonical(row, fmt)
    assert "\n" not in str(exc.value)


def test_hostile_row_in_a_file_names_file_and_line(tmp_path):
    rows = [{"messages": [U("q"), A("a")]}, {"messages": [U("q"), A("")]}]
    path = _file(tmp_path, rows)
    with pytest.raises(DataError, match=rf"{path}:2: messages\[1\] is an empty assistant turn"):
        read_canonical(str(path))


# ---- used columns, text helpers, canonical fixed point -------------------------------------------------


def test_used_columns_reports_unused():
    row = {"id": 7, "messages": [U("q"), A("a")], "weight": 1, "tools": TOOLS}
    assert used_columns(row, "chat") == {"messages", "tools"}
    inst = {"instruction": "q", "output": "a", "label": "x", "source": "web"}
    assert set(inst) - used_columns(inst, "instruction") == {"label", "source"}
    pref = {"prompt": "q", "chosen": "a", "rejected": "b", "input": "unused here", "score": 3}
    assert set(pref) - used_columns(pref, "preference") == {"input", "score"}
    # a row that does not fit still names the columns its format reads
    assert used_columns({"prompt": "q", "completion": "c", "label": "?", "id": 1}, "unpaired") == {
        "prompt",
        "completion",
        "label",
    }


def test_text_helpers_cover_tool_calls_reasoning_and_new_kinds():
    chat = {
        "messages": [
            U("q"),
            A("", tool_calls=[call("get_weather", {"city": "Rome"})], reasoning_content="hmm"),
        ]
    }
    assert 'get_weather {"city": "Rome"}' in canonical_text(chat) and "hmm" in canonical_text(chat)
    assert target_text(chat).strip()  # a tool-call turn is not an empty target
    assert prompt_text(chat) == "q"
    unpaired = {"prompt": [U("q")], "completion": [A("c")], "label": False}
    assert (canonical_text(unpaired), prompt_text(unpaired), target_text(unpaired)) == ("q\nc", "q", "c")
    prompt = {"prompt": [S("s"), U("q")]}
    assert (canonical_text(prompt), prompt_text(prompt), target_text(prompt)) == ("s\nq", "s\nq", None)


FIXED_POINT_ROWS = [
    {"text": "t"},
    {"text": "t", "label": "l"},
    {
        "messages": [
            S("s"),
            U("q"),
            A("", tool_calls=[call("f", {"a": 1}, id="c")]),
            {"role": "tool", "content": "r", "tool_call_id": "c", "name": "f"},
            A("x", weight=0, reasoning_content="r"),
        ],
        "tools": TOOLS,
    },
    {"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")], "tools": TOOLS},
    {"prompt": [U("q")], "completion": [A("a")], "label": True},
    {"prompt": [S("s"), U("q")], "tools": TOOLS},
]


@pytest.mark.parametrize("canon", FIXED_POINT_ROWS)
def test_canonical_rows_are_a_fixed_point(canon):
    fmt = detect_format(canon)
    assert to_canonical(canon, fmt) == canon
    assert used_columns(canon, fmt) == set(canon)


def test_formats_and_kinds_listed():
    assert set(FORMATS) == set(KIND)
    assert set(KIND.values()) == {"text", "chat", "preference", "unpaired", "prompt", "classification"}
    for fmt in FORMATS:
        assert f"{fmt}: needs" in str(pytest.raises(FormatError, detect_format, ["nothing"]).value)


def test_openai_legacy_function_calling():
    # OpenAI's older function-calling fine-tuning shape: `functions`, and `function_call` on a message.
    row = {
        "messages": [
            U("Weather in Rome?"),
            {"role": "assistant", "function_call": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            {"role": "function", "name": "get_weather", "content": "24 C"},
            A("24 C."),
        ],
        "functions": [WEATHER],
    }
    assert detect_format(row) == "chat"
    assert to_canonical(row, "chat") == {
        "messages": [
            U("Weather in Rome?"),
            A("", tool_calls=[call("get_weather", {"city": "Rome"})]),
            {"role": "tool", "content": "24 C", "name": "get_weather"},
            A("24 C."),
        ],
        "tools": TOOLS,
    }
    assert used_columns(row, "chat") == {"messages", "functions"}
