"""Hostile data and endpoints (issue 26, section 4): values that are not text, JSON that is not JSON,
an audit that lists every bad row, PII that is not PII, LLaMA-Factory v1 files, `data show` on huge
or escape-laden rows, and endpoints that answer HTML, no choices, non-JSON or nothing at all.

Each test asserts what a user sees: one located line and exit 2 for refused input, a listed reason
for a row the audit rejects, and no traceback anywhere.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.data import pii
from tunelab.data.canonical import read_canonical
from tunelab.data.formats import FormatError, to_canonical
from tunelab.data.loaders import DataError, iter_records

runner = CliRunner()


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def cli(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": None})


def one_error_line(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    lines = res.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


GOOD = json.dumps({"instruction": "name a colour please", "output": "blue is a colour"})


# ---- values that are not text ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "said"),
    [("42", "is a number (42)"), ("3.5", "is a number (3.5)"), ("true", "is a boolean (true)")],
)
def test_numbers_and_booleans_in_text_fields_are_row_errors(tmp_path, value, said):
    path = write_lines(tmp_path / "t.jsonl", [GOOD, '{"instruction": "q q q", "output": ' + value + "}"])
    with pytest.raises(DataError) as caught:
        read_canonical(str(path))  # what training reads: the row is refused, never trained as "42"
    assert f"{path}:2: field 'output' {said}, not text" in str(caught.value)
    rows, report, _ = read_canonical(str(path), skip_bad=True, rejects_path=tmp_path / "rejects.jsonl")
    assert [r for r, _ in rows] == [1] and report.rows_rejected == 1
    reject = json.loads((tmp_path / "rejects.jsonl").read_text())
    assert reject["line"] == 2 and said in reject["reason"]
    res = cli("data", "audit", str(path), "--json")
    assert res.exit_code == 0
    errors = json.loads(res.stdout)["format_errors"]
    assert (
        errors["rows"] == 1 and errors["examples"][0]["row"] == 2 and said in errors["examples"][0]["error"]
    )


def test_class_ids_stay_labels_and_booleans_in_chat_content_are_refused():
    assert to_canonical({"text": "good film", "label": 1}, "classification")["label"] == "1"
    with pytest.raises(FormatError, match=r"messages\[0\].content' is a boolean \(false\)"):
        to_canonical(
            {"messages": [{"role": "user", "content": False}, {"role": "assistant", "content": "a"}]}, "chat"
        )


# ---- JSON that is not JSON ------------------------------------------------------------------------

NOT_JSON = {
    "duplicate_key": (
        '{"instruction": "a a a", "instruction": "b b b", "output": "c"}',
        "key 'instruction' appears twice",
    ),
    "nested_duplicate": (
        '{"messages": [{"role": "user", "role": "assistant", "content": "x"}]}',
        "key 'role' appears twice in messages[0]",
    ),
    "nan": ('{"instruction": "q q q", "output": NaN}', "field 'output' is NaN, which is not valid JSON"),
    "infinity": ('{"instruction": "q q q", "output": -Infinity}', "field 'output' is -Infinity"),
    "lone_surrogate": (
        '{"instruction": "q q q", "output": "a\\ud800b"}',
        "field 'output' has a lone surrogate \\ud800",
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_JSON))
def test_json_that_python_accepts_but_json_does_not_is_a_row_error(tmp_path, case):
    line, said = NOT_JSON[case]
    path = write_lines(tmp_path / "t.jsonl", [GOOD, line])
    with pytest.raises(DataError, match=f"^{path}:2: " + said.replace("\\", "\\\\").replace("[", "\\[")):
        list(iter_records(path))
    res = cli("data", "audit", str(path), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["unreadable"] == {
        "rows": 1,
        "examples": [{"row": 2, "error": report["unreadable"]["examples"][0]["error"]}],
    }
    assert said in report["unreadable"]["examples"][0]["error"]
    # the good row is not flagged for anything the bad one did
    assert report["hygiene"]["control_chars"]["rows"] == 0 and report["format_errors"]["rows"] == 0


@pytest.mark.parametrize("command", ["convert", "clean"])
def test_lone_surrogate_names_file_and_line_in_convert_and_clean(tmp_path, command):
    path = write_lines(tmp_path / "s.jsonl", [GOOD, NOT_JSON["lone_surrogate"][0]])
    out = tmp_path / "out.jsonl"
    msg = one_error_line(cli("data", command, str(path), "-o", str(out)))
    assert f"{path}:2: field 'output' has a lone surrogate" in msg
    assert not out.exists()
    res = cli("data", command, str(path), "-o", str(out), "--skip-bad")
    assert res.exit_code == 0, res.output
    assert [json.loads(x) for x in out.read_text().splitlines()][0]  # the good row, written
    rejects = [json.loads(x) for x in Path(f"{out}.rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], "lone surrogate" in r["reason"]) for r in rejects] == [(2, True)]


def test_json_array_elements_with_duplicate_keys_or_nan_are_rejected_one_by_one(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"text": "a b c"}, {"text": NaN}, {"text": "x", "text": "y"}]', encoding="utf-8")
    seen: list[tuple[int, str]] = []
    rows = list(
        iter_records(path, skip_bad=True, on_reject=lambda line, reason, raw: seen.append((line, reason)))
    )
    assert [r for r, _ in rows] == [1]
    assert [line for line, _ in seen] == [2, 3]
    assert "NaN" in seen[0][1] and "appears twice" in seen[1][1]


# ---- the audit lists every bad row ----------------------------------------------------------------


def test_audit_never_stops_at_a_row_and_strict_decides_the_exit_code(tmp_path):
    lines = [
        json.dumps({"instruction": f"question number {i} about things", "output": f"answer {i} words"})
        for i in range(2088)
    ]
    empty = list(range(100, 2088, 200))  # 10 empty answers
    for i in empty:
        lines[i] = json.dumps({"instruction": f"question {i} with no answer", "output": ""})
    lines[5] = "{not json"
    lines[7] = '{"instruction": "a b c", "instruction": "d e f", "output": "g"}'
    path = write_lines(tmp_path / "big.jsonl", lines)
    res = cli("data", "audit", str(path), "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["rows_rejected"] == 12
    assert [e["row"] for e in report["unreadable"]["examples"]] == [6, 8]
    assert [e["row"] for e in report["format_errors"]["examples"]] == [i + 1 for i in empty]
    assert all("empty assistant turn" in e["error"] for e in report["format_errors"]["examples"])
    assert report["exact_duplicates"]["rows"] == 0 and report["lengths"]["count"] == 2076  # the rest, audited
    assert cli("data", "audit", str(path), "--strict").exit_code == 1
    text = cli("data", "audit", str(path))
    assert text.exit_code == 0 and "Rejected rows (12)" in text.stdout and "invalid JSON" in text.stdout


# ---- PII: one detector, no false IPv6 --------------------------------------------------------------


def test_a_bare_double_colon_is_not_an_ip_and_audit_and_clean_agree(tmp_path):
    texts = ["lol :: http://x.example", "use std::vector here", "dead::beef", "::1 is loopback"]
    for t in texts:
        assert pii.find_pii(t) == [], t
    assert [f.kind for f in pii.find_pii("from fe80::1 and 2001:db8::ff00:42:8329")] == ["ip", "ip"]
    rows = [{"instruction": f"note {i} here please", "output": t} for i, t in enumerate(texts)]
    rows.append({"instruction": "where from", "output": "it came from 2001:db8::ff00:42:8329 today"})
    path = write_lines(tmp_path / "p.jsonl", [json.dumps(r) for r in rows])
    audit = json.loads(cli("data", "audit", str(path), "--json").stdout)
    out = tmp_path / "clean.jsonl"
    summary = json.loads(cli("data", "clean", str(path), "-o", str(out), "--json", "--no-near").stdout)
    assert audit["pii"]["ip"]["rows"] == summary["changed"]["pii_redacted"] == 1
    cleaned = [json.loads(x)["output"] for x in out.read_text().splitlines()]
    assert cleaned[:4] == texts  # user text untouched
    assert cleaned[4] == "it came from <IP> today"


# ---- LLaMA-Factory v1 ----------------------------------------------------------------------------


def _v1(role: str, text: str, weight: float, **parts: str) -> dict:
    content = [{"type": "text", "value": text}] + [{"type": k, "value": v} for k, v in parts.items()]
    return {"role": role, "content": content, "loss_weight": weight}


def test_llamafactory_v1_sft_rows_are_read_with_their_loss_weights():
    row = {
        "messages": [
            _v1("system", "be brief", 0.0),
            _v1("user", "hi", 0.0),
            _v1("assistant", "hello", 0.0),
            _v1("user", "weather?", 0.0),
            _v1("assistant", "sunny", 1.0, reasoning="look outside"),
        ]
    }
    messages = to_canonical(row, "chat")["messages"]
    assert [m["content"] for m in messages] == ["be brief", "hi", "hello", "weather?", "sunny"]
    assert messages[2]["weight"] == 0 and messages[4]["weight"] == 1  # loss_weight 0: not trained on
    assert messages[4]["reasoning_content"] == "look outside"
    call = {"type": "tool_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}})}
    calls = to_canonical(
        {
            "messages": [
                _v1("user", "weather?", 0.0),
                {"role": "assistant", "content": [call], "loss_weight": 1.0},
            ]
        },
        "chat",
    )["messages"][1]["tool_calls"]
    assert calls == [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]


def test_llamafactory_v1_preference_rows_and_what_is_refused(tmp_path):
    pair = {
        "chosen_messages": [_v1("user", "2+2?", 0.0), _v1("assistant", "4", 1.0)],
        "rejected_messages": [_v1("user", "2+2?", 0.0), _v1("assistant", "5", 1.0)],
    }
    c = to_canonical(pair, "preference")
    assert c["prompt"] == [{"role": "user", "content": "2+2?"}]
    assert [m["content"] for m in c["chosen"] + c["rejected"]] == ["4", "5"]
    with pytest.raises(FormatError, match=r"must be 0 or 1 \(0: no loss on this message\), got 0.5"):
        to_canonical({"messages": [_v1("user", "q", 0.0), _v1("assistant", "a", 0.5)]}, "chat")
    image = {"role": "user", "content": [{"type": "image_url", "value": "x.png"}], "loss_weight": 0.0}
    with pytest.raises(FormatError) as caught:
        to_canonical({"messages": [image, _v1("assistant", "a", 1.0)]}, "chat")
    said = str(caught.value)
    assert "content part of type 'image_url'" in said and "'text'" not in said  # no self-contradiction
    path = write_lines(tmp_path / "v1.jsonl", [json.dumps(pair)])
    assert json.loads(cli("data", "audit", str(path), "--json").stdout)["format"] == "preference"


# ---- data show -------------------------------------------------------------------------------------


def test_data_show_with_an_unknown_tiny_model_is_refused(tmp_path):
    path = write_lines(tmp_path / "s.jsonl", [GOOD])
    msg = one_error_line(cli("data", "show", str(path), "--model", "tiny:nosuch"))
    assert "unknown tiny model 'tiny:nosuch'" in msg


def test_data_show_escapes_control_characters_and_cuts_huge_rows(tmp_path):
    from tunelab.data.show import SHOW_CHARS

    hostile = {"instruction": "say \x1b]0;pwned\x07 hi \x1b[2J", "output": "ok\r done"}
    path = write_lines(tmp_path / "esc.jsonl", [json.dumps(hostile)])
    res = cli("data", "show", str(path), "--model", "tiny:llama")
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.stdout and "\x07" not in res.stdout and "\r" not in res.stdout
    assert "\\x1b]0;pwned\\x07" in res.stdout and "ok\\r done" in res.stdout
    huge = {"instruction": "summarise", "output": "word " * 200_000}
    path = write_lines(tmp_path / "huge.jsonl", [json.dumps(huge)])
    res = cli("data", "show", str(path), "--model", "tiny:llama", "--json")
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)["examples"][0]
    assert len("".join(shown["tokens"])) < SHOW_CHARS + 500  # a preview, not the megabyte
    assert any("cut for this preview" in w for w in shown["warnings"])


# ---- endpoints that answer wrong -------------------------------------------------------------------


class Broken(BaseHTTPRequestHandler):
    """Answers by the first path segment: html, nochoices, notjson, silent (never answers in time)."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        mode = self.path.strip("/").split("/")[0]
        if mode == "silent":
            time.sleep(3)
            return
        if mode == "html":
            self._send(b"<html><body>Welcome to nginx!</body></html>", "text/html")
        elif mode == "nochoices":
            self._send(
                json.dumps({"id": "x", "object": "chat.completion", "choices": []}).encode(),
                "application/json",
            )
        else:
            self._send(b"Internal proxy hiccup", "application/json")

    do_GET = do_POST = _answer


@pytest.fixture(scope="module")
def broken() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Broken)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


SAID = {
    "html": "answered a chat completion with text/html, not JSON ('<html><body>Welcome to nginx!",
    "nochoices": "answered a chat completion without a message",
    "notjson": "answered a chat completion with application/json, not JSON ('Internal proxy hiccup')",
    "silent": "did not answer within 0.5 s (--timeout)",
}


def _command(kind: str, url: str, tmp_path: Path) -> list[str]:
    common = [
        "--cache-dir",
        str(tmp_path / "cache"),
        "--timeout",
        "0.5",
        "-o",
        str(tmp_path / f"{kind}.jsonl"),
    ]
    if kind == "synth":
        seeds = write_lines(
            tmp_path / "seeds.jsonl", [json.dumps({"instruction": "Name a colour", "output": "blue"})]
        )
        return ["data", "synth", str(seeds), "--endpoint", url, "--model", "m", "--n", "2", *common]
    prompts = write_lines(
        tmp_path / "prompts.jsonl",
        [json.dumps({"prompt": "Say hi", "chosen": "hi there", "rejected": "go away"})],
    )
    if kind == "judge":
        return ["data", "judge", str(prompts), "--judge", f"{url}#m", *common]
    return ["data", "constitute", str(prompts), "--endpoint", url, "--model", "m", *common]


@pytest.mark.parametrize("mode", sorted(SAID))
@pytest.mark.parametrize("kind", ["synth", "judge", "constitute"])
def test_endpoint_answers_that_are_not_chat_completions_are_one_line(broken, tmp_path, kind, mode):
    url = f"{broken}/{mode}/v1"
    msg = one_error_line(cli(*_command(kind, url, tmp_path)))
    assert f"the endpoint {url} " in msg and SAID[mode] in msg, msg
    assert "Expecting value" not in msg
    assert not (tmp_path / f"{kind}.jsonl").exists()


# ---- data synth: Ctrl-C and the closing audit --------------------------------------------------------


class InterruptedGenerator:
    """Round 1 answers every request; the second round's first request is a Ctrl-C."""

    name = "scripted"

    def __init__(self) -> None:
        self.model_calls = 0
        self.made = 0

    def chat(self, conversations, settings, *, desc="generating"):
        if desc.startswith("instructions, round 2"):
            raise KeyboardInterrupt
        self.model_calls += len(conversations)
        if desc.startswith("instructions"):
            self.made += 1
            topics = ["rivers", "volcanoes", "owls", "bridges", "tea", "comets", "glaciers", "violins"]
            return [
                f"{self.made}. Explain in a few sentences how {topics[k % 8]} work number {k}"
                for k, _ in enumerate(conversations)
            ]
        if desc.startswith("classification"):
            return ["No"] * len(conversations)
        return [
            f"Input: <none>\nOutput: a careful answer with several words, variant {k}"
            for k, _ in enumerate(conversations)
        ]


def test_ctrl_c_in_synth_writes_the_rows_made_so_far_and_exits_130(tmp_path, monkeypatch):
    from tunelab.synth import cli_common

    monkeypatch.setattr(cli_common.GeneratorOptions, "open", lambda self: InterruptedGenerator())
    seeds = write_lines(
        tmp_path / "seeds.jsonl", [json.dumps({"instruction": "Name a colour you like", "output": "blue"})]
    )
    out = tmp_path / "synth.jsonl"
    res = cli("data", "synth", str(seeds), "--model", "x", "--n", "50", "-o", str(out), "--no-cache")
    assert res.exit_code == 130, res.output
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert 0 < len(rows) < 50
    said = [line for line in res.stderr.splitlines() if line.startswith("interrupted:")]
    assert said == [
        f"interrupted: stopped in round 2: wrote the {len(rows)} rows made so far (of --n 50) to {out}, "
        "a partial run; the answers are cached, so the same command goes on from there"
    ]


def test_the_closing_audit_drops_what_data_audit_flags(tmp_path):
    from tunelab.synth.finish import finish

    rows = [
        {"instruction": "Describe a calm lake at dawn", "output": "Mist rises over still water."},
        {"instruction": "Describe a storm", "output": "Thunder \ufffd\ufffd rolls over the hills."},
        {"instruction": "Describe a forest", "output": "Tall pines \x07 sway in the wind."},
        {"instruction": "Describe a city", "output": "CafÃ© lights glow on every corner."},
    ]
    out = tmp_path / "made.jsonl"
    summary = finish(rows, out, kind="synth")
    assert summary["kept"] == 1
    assert summary["dropped"] == {"control_chars": 1, "mojibake": 1, "replacement_char": 1}
    report = json.loads(cli("data", "audit", str(out), "--json").stdout)
    assert all(report["hygiene"][k]["rows"] == 0 for k in ("control_chars", "replacement_char", "mojibake"))
