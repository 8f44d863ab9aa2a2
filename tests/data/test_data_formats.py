"""Format detection and mapping to the canonical shapes."""

from __future__ import annotations

import pytest

from tunelab.data.formats import FORMATS, FormatError, detect_format, rows_to_canonical, to_canonical


@pytest.mark.parametrize(
    "columns, fmt",
    [
        (["text"], "text"),
        (["text", "label"], "classification"),
        (["instruction", "input", "output"], "instruction"),
        (["messages"], "chat"),
        (["conversations", "id"], "chat"),
        (["prompt", "chosen", "rejected"], "preference"),
        (["chosen", "rejected"], "preference"),
    ],
)
def test_detect(columns, fmt):
    assert detect_format(columns) == fmt
    assert fmt in FORMATS


def test_detect_error_lists_columns_and_candidates():
    with pytest.raises(FormatError) as exc:
        detect_format(["question", "input", "answer"])
    msg = str(exc.value)
    assert "answer, input, question" in msg
    for fmt in FORMATS:
        assert f"{fmt}: needs" in msg
    assert "Closest: instruction" in msg and "data.columns" in msg
    assert "\n" not in msg  # printed as one error line


def test_column_renames():
    cols = {"instruction": "question", "output": "answer"}
    assert detect_format(["question", "answer"], cols) == "instruction"
    row = {"question": "What is 2+2?", "answer": "4", "input": "show work"}
    assert to_canonical(row, "instruction", cols) == {
        "messages": [
            {"role": "user", "content": "What is 2+2?\n\nshow work"},
            {"role": "assistant", "content": "4"},
        ]
    }


def test_instruction_with_system_and_empty_input():
    row = {"instruction": "Hi", "input": "", "output": "Hello", "system": "Be brief."}
    assert to_canonical(row, "instruction")["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]


def test_sharegpt_roles_mapped():
    row = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Q"},
            {"from": "gpt", "value": "A"},
        ]
    }
    assert to_canonical(row, "chat") == {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
        ]
    }
    with pytest.raises(FormatError, match="unknown ShareGPT speaker 'alien'"):
        to_canonical({"conversations": [{"from": "alien", "value": "x"}]}, "chat")


def test_preference_plain_and_messages():
    plain = to_canonical({"prompt": "Q", "chosen": "good", "rejected": "bad"}, "preference")
    assert plain == {
        "prompt": [{"role": "user", "content": "Q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    q = {"role": "user", "content": "Q"}
    implicit = {
        "chosen": [q, {"role": "assistant", "content": "good"}],
        "rejected": [q, {"role": "assistant", "content": "bad"}],
    }
    assert to_canonical(implicit, "preference") == plain


def test_classification_label_becomes_string():
    assert to_canonical({"text": "t", "label": 1}, "classification") == {"text": "t", "label": "1"}


@pytest.mark.parametrize(
    "row, fmt, field",
    [
        ({"instruction": "x"}, "instruction", "output"),
        ({"text": "x"}, "classification", "label"),
        ({"prompt": "p", "chosen": "c"}, "preference", "rejected"),
        ({"other": 1}, "text", "text"),
    ],
)
def test_missing_field_named(row, fmt, field):
    with pytest.raises(FormatError, match=f"missing required field '{field}'") as exc:
        to_canonical(row, fmt)
    assert exc.value.field == field


def test_missing_renamed_field_names_the_column():
    with pytest.raises(FormatError, match="'instruction' \\(read from column 'q'\\)"):
        to_canonical({"output": "o"}, "instruction", {"instruction": "q"})


def test_rows_to_canonical_detects_and_reports_row():
    rows = [{"text": "a"}, {"text": "b"}]
    assert rows_to_canonical(rows) == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(FormatError, match="^row 7: missing required field 'output'"):
        rows_to_canonical([(3, {"instruction": "i", "output": "o"}), (7, {"instruction": "i"})])
