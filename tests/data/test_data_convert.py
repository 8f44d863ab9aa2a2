"""`tunelab data convert`: round trips between formats give identical canonical rows; rows a target
cannot express, and hostile rows, are counted and written to OUT.rejects.jsonl with file/line/reason."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from tunelab.data.canonical import read_canonical
from tunelab.data.cli import app
from tunelab.data.convert import convert, from_canonical
from tunelab.data.formats import detect_format, to_canonical
from tunelab.data.loaders import DataError

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
OPENAI_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Rome?"},
            {
                "role": "assistant",
                "content": "",
                "reasoning_content": "I should look it up.",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "24 C"},
            {"role": "assistant", "content": "24 C.", "weight": 1},
            {"role": "user", "content": "Thanks"},
            {"role": "assistant", "content": "Bye.", "weight": 0},
        ],
        "tools": TOOLS,
    },
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
]
SHAREGPT_ROWS = [
    {
        "conversations": [
            {"from": "human", "value": "Weather in Rome?"},
            {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
            {"from": "observation", "value": "24 C"},
            {"from": "gpt", "value": "24 C."},
        ],
        "system": "Use tools.",
        "tools": json.dumps([TOOLS[0]["function"]]),
    },
    {
        "conversations": [{"from": "human", "value": "Capital of France?"}],
        "chosen": {"from": "gpt", "value": "Paris."},
        "rejected": {"from": "gpt", "value": "Lyon."},
    },
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _canon(path):
    rows, _, _ = read_canonical(str(path))
    return [c for _, c in rows]


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize(
    "rows, via",
    [
        (OPENAI_ROWS, "sharegpt"),
        (OPENAI_ROWS, "openai"),
        (SHAREGPT_ROWS[:1], "openai"),
        (SHAREGPT_ROWS, "sharegpt"),
    ],
)
def test_round_trip_gives_identical_canonical_rows(tmp_path, rows, via):
    src = _jsonl(tmp_path / "in.jsonl", rows)
    s1 = convert(src, tmp_path / "canon.jsonl")
    assert (s1["rows_written"], s1["rows_rejected"]) == (len(rows), 0)
    canon = _lines(tmp_path / "canon.jsonl")
    assert canon == _canon(src)  # canonical output is what training reads
    s2 = convert(tmp_path / "canon.jsonl", tmp_path / f"as_{via}.jsonl", to=via)
    assert s2["rows_rejected"] == 0
    convert(tmp_path / f"as_{via}.jsonl", tmp_path / "back.jsonl")
    assert _lines(tmp_path / "back.jsonl") == canon


def test_openai_and_sharegpt_shapes_written(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", OPENAI_ROWS[:1])
    convert(src, tmp_path / "o.jsonl", to="openai")
    call = _lines(tmp_path / "o.jsonl")[0]["messages"][2]["tool_calls"][0]
    assert call == {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
    }
    convert(src, tmp_path / "s.jsonl", to="sharegpt")
    row = _lines(tmp_path / "s.jsonl")[0]
    assert row["system"] == "Be brief." and json.loads(row["tools"]) == TOOLS
    assert [t["from"] for t in row["conversations"]] == [
        "human",
        "function_call",
        "observation",
        "gpt",
        "human",
        "gpt",
    ]
    assert json.loads(row["conversations"][1]["value"]) == {
        "id": "c1",
        "name": "get_weather",
        "arguments": {"city": "Rome"},
    }


def test_alpaca_round_trip_and_kto(tmp_path):
    rows = [
        {
            "instruction": "And Rome?",
            "input": "",
            "output": "Sunny.",
            "system": "Weather bot.",
            "history": [["Oslo?", "Rain."]],
        },
    ]
    src = _jsonl(tmp_path / "a.jsonl", rows)
    convert(src, tmp_path / "c.jsonl")
    convert(tmp_path / "c.jsonl", tmp_path / "a2.jsonl", to="alpaca")
    assert _lines(tmp_path / "a2.jsonl") == rows
    kto = _jsonl(
        tmp_path / "k.jsonl",
        [
            {
                "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
                "label": False,
            }
        ],
    )
    convert(kto, tmp_path / "k_alpaca.jsonl", to="alpaca")
    assert _lines(tmp_path / "k_alpaca.jsonl") == [
        {"instruction": "2+2?", "input": "", "output": "5", "kto_tag": False}
    ]
    convert(kto, tmp_path / "k_sharegpt.jsonl", to="sharegpt")
    for p in ("k_alpaca.jsonl", "k_sharegpt.jsonl"):
        assert _canon(tmp_path / p) == _canon(kto)


def test_unconvertible_and_hostile_rows_go_to_rejects(tmp_path):
    rows = [
        OPENAI_ROWS[1],
        OPENAI_ROWS[0],  # tool calls: Alpaca has no place for them
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},  # hostile
    ]
    src = _jsonl(tmp_path / "in.jsonl", rows)
    s = convert(src, tmp_path / "out.jsonl", to="alpaca")
    assert (s["rows_read"], s["rows_written"], s["rows_rejected"]) == (3, 1, 2)
    rejects = _lines(tmp_path / "out.jsonl.rejects.jsonl")
    assert s["rejects"] == str(tmp_path / "out.jsonl.rejects.jsonl")
    assert [(r["file"], r["line"]) for r in rejects] == [(str(src), 2), (str(src), 3)]
    assert "Alpaca has no tools column" in rejects[0]["reason"] and rejects[0]["record"] == rows[1]
    assert "messages[1] is an empty assistant turn" in rejects[1]["reason"]
    pref = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    s = convert(pref, tmp_path / "p_out.jsonl", to="openai")
    assert s["rows_rejected"] == 0
    unpaired = _jsonl(tmp_path / "u.jsonl", [{"prompt": "q", "completion": "a", "label": True}])
    s = convert(unpaired, tmp_path / "u_out.jsonl", to="openai")
    assert s["rows_rejected"] == 1
    assert (
        "OpenAI fine-tuning has no unpaired format"
        in _lines(tmp_path / "u_out.jsonl.rejects.jsonl")[0]["reason"]
    )


def test_outputs_checked_and_written_atomically(tmp_path):
    src = _jsonl(tmp_path / "in.jsonl", OPENAI_ROWS)
    with pytest.raises(DataError, match="is the input file"):
        convert(src, src, overwrite=True)
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n", encoding="utf-8")
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        convert(src, out)
    assert out.read_text() == "keep me\n"
    stale = tmp_path / "out.jsonl.rejects.jsonl"
    stale.write_text("old\n", encoding="utf-8")
    s = convert(src, out, overwrite=True)
    assert s["rows_written"] == 2 and s["rejects"] is None and not stale.exists()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="no data rows"):
        convert(empty, tmp_path / "e_out.jsonl")
    assert not (tmp_path / "e_out.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


def test_skip_bad_unreadable_lines_in_rejects(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(
        json.dumps({"text": "one"}) + "\n{oops\n" + json.dumps({"text": "two"}) + "\n", encoding="utf-8"
    )
    with pytest.raises(DataError, match="in.jsonl:2: invalid JSON"):
        convert(src, tmp_path / "o.jsonl")
    s = convert(src, tmp_path / "o.jsonl", skip_bad=True)
    assert (s["rows_read"], s["rows_written"], s["rows_rejected"]) == (3, 2, 1)
    (entry,) = _lines(tmp_path / "o.jsonl.rejects.jsonl")
    assert entry["line"] == 2 and entry["raw"] == "{oops" and "invalid JSON" in entry["reason"]


def test_cli_convert_summary_and_errors(tmp_path):
    runner = CliRunner()
    src = _jsonl(tmp_path / "in.jsonl", [OPENAI_ROWS[1], {"prompt": "q", "completion": "a", "label": True}])
    out = tmp_path / "out.jsonl"
    res = runner.invoke(app, ["convert", str(src), "-o", str(out), "--to", "sharegpt", "--format", "chat"])
    assert res.exit_code == 0, res.output
    assert res.stdout == (
        f"wrote 1 of 2 rows to {out} (chat -> sharegpt); 1 rejected, each in {out}.rejects.jsonl with its reason\n"
    )
    res = runner.invoke(app, ["convert", str(src), "-o", str(out)])
    assert (
        res.exit_code == 2 and res.stderr == f"error: {out}: already exists; pass --overwrite to replace it\n"
    )
    res = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "x.jsonl"), "--to", "axolotl"])
    assert res.exit_code == 2 and "--to must be one of canonical, sharegpt, openai, alpaca" in res.stderr
    res = runner.invoke(app, ["convert", str(src), "-o", str(tmp_path / "y.jsonl"), "--format", "unpaired"])
    assert res.exit_code == 0 and "wrote 1 of 2 rows" in res.stdout


def _random_conversation(rng) -> dict:
    """A canonical chat row: optional system, user turns, assistant answers with optional
    reasoning and weight, and tool-call turns answered by tool results."""
    messages = [{"role": "system", "content": f"sys {rng.random():.3f}"}] if rng.random() < 0.5 else []
    for turn in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": f"question {turn} {rng.random():.3f}"})
        if rng.random() < 0.5:
            n = rng.randint(1, 2)
            calls = [
                {
                    "type": "function",
                    "function": {"name": f"f{i}", "arguments": {"x": rng.randint(0, 9), "s": "a b"}},
                }
                for i in range(n)
            ]
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            messages += [{"role": "tool", "content": f"result {i}"} for i in range(n)]
        answer = {"role": "assistant", "content": f"answer {turn} <think>kept</think>"}
        if rng.random() < 0.3:
            answer["reasoning_content"] = "because"
        if rng.random() < 0.3:
            answer["weight"] = rng.randint(0, 1)
        messages.append(answer)
    row = {"messages": messages}
    if rng.random() < 0.5:
        row["tools"] = [{"type": "function", "function": {"name": "f0", "parameters": {"type": "object"}}}]
    return row


@pytest.mark.parametrize("to", ["openai", "sharegpt"])
def test_random_conversations_round_trip(to):
    rng = random.Random(15)
    for _ in range(200):
        canon = _random_conversation(rng)
        written = json.loads(json.dumps(from_canonical(canon, "chat", to)))  # through JSON, as on disk
        fmt = detect_format(written)
        assert to_canonical(written, fmt) == canon, written
