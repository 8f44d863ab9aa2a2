"""Hostile cases for `tunelab data` and the data-making commands (issue 26, section 4: data and synth).

Endpoint cases run against a small OpenAI-shaped server on loopback (:class:`FakeEndpoint`) whose
first path segment picks its behaviour: ``ok`` answers like a model, ``dirty`` answers with U+FFFD
and control characters, ``html`` / ``nochoices`` / ``notjson`` answer 200 with something that is
not a chat completion, ``silent`` never answers, ``stall`` answers ``stall_after`` requests and
then stops answering (for Ctrl-C).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hostile import Case, Outcome, refused, tunelab, user_env

AREA = "data"
WORDS = [
    "describe",
    "explain",
    "compare",
    "summarise",
    "list",
    "translate",
    "rewrite",
    "classify",
    "rivers",
    "volcanoes",
    "owls",
    "bridges",
    "tea",
    "comets",
    "glaciers",
    "violins",
    "tides",
    "markets",
    "poems",
    "recipes",
    "engines",
    "forests",
    "deserts",
    "cities",
    "songs",
    "planets",
    "fossils",
    "storms",
    "gardens",
    "bicycles",
    "lanterns",
    "harbours",
    "mirrors",
    "puzzles",
    "castles",
    "islands",
    "clocks",
    "maps",
]
GOOD = {"instruction": "name a colour please", "output": "blue is a colour"}


def write_rows(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def good_then(scratch: Path, bad_line: str, name: str = "t.jsonl") -> Path:
    return write_rows(scratch / name, [json.dumps(GOOD), bad_line])


def located(ran, path: Path, line: int, *words: str) -> Outcome:
    """Refused with one line naming ``path:line`` and ``words``."""
    return refused(ran, mentions=(f"{path}:{line}:", *words))


# ---- values and JSON that are not what they look like --------------------------------------------


def typed_value(scratch: Path) -> Outcome:
    """A number in a text field once trained as "42": now a row error that the audit lists and
    convert drops with its reason (training refuses it the same way)."""
    path = good_then(scratch, '{"instruction": "q q q", "output": 42}')
    report = json.loads(tunelab("data", "audit", str(path), "--json", cwd=scratch).out)
    listed = report["format_errors"]["examples"]
    if not listed or listed[0]["row"] != 2 or "is a number (42)" not in listed[0]["error"]:
        return Outcome("silent", f"audit format_errors {report['format_errors']}")
    return _dropped_with_reason(scratch, path, 2, "is a number (42)")


def _dropped_with_reason(scratch: Path, path: Path, line: int, words: str) -> Outcome:
    """`data convert` writes the good rows and the bad one to OUT.rejects.jsonl with its reason."""
    ran = tunelab("data", "convert", str(path), "-o", "out.jsonl", cwd=scratch)
    if ran.code != 0:
        return refused(ran, code=0)
    rejects = scratch / "out.jsonl.rejects.jsonl"
    entries = [json.loads(x) for x in rejects.read_text().splitlines()] if rejects.exists() else []
    if [(e["line"], words in e["reason"]) for e in entries] != [(line, True)] or "1 rejected" not in ran.out:
        return Outcome("silent", f"convert: {ran.out.strip()[:120]}; rejects {entries}")
    return Outcome("ok", f"line {line} dropped and counted: {entries[0]['reason'][:100]}")


def duplicate_key(scratch: Path) -> Outcome:
    path = good_then(scratch, '{"instruction": "a b c", "instruction": "d e f", "output": "g"}')
    return located(
        tunelab("data", "convert", str(path), "-o", "o.jsonl", cwd=scratch), path, 2, "appears twice"
    )


def nan_constant(scratch: Path) -> Outcome:
    path = good_then(scratch, '{"instruction": "q q q", "output": NaN}')
    ran = tunelab("data", "convert", str(path), "-o", "o.jsonl", cwd=scratch)
    return located(ran, path, 2, "field 'output' is NaN")


def lone_surrogate(scratch: Path) -> Outcome:
    """It passed the audit, then convert/clean failed naming no file or line."""
    path = good_then(scratch, '{"instruction": "q q q", "output": "a\\ud800b"}')
    report = json.loads(tunelab("data", "audit", str(path), "--json", cwd=scratch).out)
    if report["unreadable"]["rows"] != 1:
        return Outcome("silent", "the audit did not list the row")
    for command in ("convert", "clean"):
        outcome = located(
            tunelab("data", command, str(path), "-o", "o.jsonl", cwd=scratch), path, 2, "lone surrogate"
        )
        if outcome.verdict != "ok":
            return outcome
    return outcome


# ---- the audit lists every bad row ------------------------------------------------------------------


def audit_lists_every_bad_row(scratch: Path) -> Outcome:
    """2,088 rows with 10 empty answers: the audit once stopped at the first (exit 2)."""
    rows = [
        json.dumps({"instruction": f"question {i} about things", "output": f"answer {i} here"})
        for i in range(2088)
    ]
    for i in range(100, 2088, 200):
        rows[i] = json.dumps({"instruction": f"question {i} with no answer", "output": ""})
    path = write_rows(scratch / "big.jsonl", rows)
    ran = tunelab("data", "audit", str(path), "--json", cwd=scratch)
    if "Traceback" in ran.err:
        return Outcome("traceback", ran.err.strip().splitlines()[-1][:160])
    if ran.code != 0:
        return Outcome("silent", f"exit {ran.code}: {ran.err.strip()[:160]}")
    listed = json.loads(ran.out)["format_errors"]
    if listed["rows"] != 10 or len(listed["examples"]) != 10:
        return Outcome("silent", f"listed {listed['rows']} rows, {len(listed['examples'])} examples")
    strict = tunelab("data", "audit", str(path), "--strict", cwd=scratch)
    if strict.code != 1:
        return Outcome("silent", f"--strict exit {strict.code}")
    return Outcome("ok", "10 rows listed with reasons; --strict exits 1")


# ---- PII ---------------------------------------------------------------------------------------------


def bare_double_colon(scratch: Path) -> Outcome:
    """`lol :: http…` became `lol <IP> http…`; the audit counted 1 IP row, clean changed 2."""
    rows = [
        {"instruction": "what did they say", "output": "lol :: http://x.example"},
        {"instruction": "where from", "output": "from 2001:db8::ff00:42:8329 today"},
    ]
    path = write_rows(scratch / "p.jsonl", [json.dumps(r) for r in rows])
    audit = json.loads(tunelab("data", "audit", str(path), "--json", cwd=scratch).out)
    ran = tunelab("data", "clean", str(path), "-o", "c.jsonl", "--json", cwd=scratch)
    changed = json.loads(ran.out)["changed"].get("pii_redacted", 0)
    text = (scratch / "c.jsonl").read_text(encoding="utf-8")
    if "lol :: http" not in text:
        return Outcome("loss", "user text changed: " + text.splitlines()[0][:80])
    if audit["pii"]["ip"]["rows"] != changed:
        return Outcome(
            "silent", f"audit counted {audit['pii']['ip']['rows']} IP rows, clean changed {changed}"
        )
    return Outcome("ok", f"'::' kept; audit and clean agree ({changed} row)")


# ---- LLaMA-Factory v1 -------------------------------------------------------------------------------


def llamafactory_v1(scratch: Path) -> Outcome:
    def msg(role: str, text: str, weight: float) -> dict:
        return {"role": role, "content": [{"type": "text", "value": text}], "loss_weight": weight}

    sft = {
        "messages": [
            msg("user", "hi", 0.0),
            msg("assistant", "hello", 0.0),
            msg("user", "and?", 0.0),
            msg("assistant", "bye", 1.0),
        ]
    }
    path = write_rows(scratch / "v1.jsonl", [json.dumps(sft)])
    ran = tunelab("data", "convert", str(path), "-o", "c.jsonl", cwd=scratch)
    if ran.code != 0:
        return (
            refused(ran) if "Traceback" in ran.err else Outcome("silent", f"refused: {ran.err.strip()[:160]}")
        )
    messages = json.loads((scratch / "c.jsonl").read_text())["messages"]
    if messages[1].get("weight") != 0 or messages[1]["content"] != "hello":
        return Outcome("silent", f"read as {messages[1]}")
    half = {"messages": [msg("user", "q", 0.0), msg("assistant", "a", 0.5)]}
    bad = write_rows(scratch / "half.jsonl", [json.dumps(sft), json.dumps(half)])
    return _dropped_with_reason(scratch, bad, 2, "must be 0 or 1 (0: no loss on this message), got 0.5")


# ---- data show ---------------------------------------------------------------------------------------


def show_unknown_tiny(scratch: Path) -> Outcome:
    path = write_rows(scratch / "s.jsonl", [json.dumps(GOOD)])
    return refused(
        tunelab("data", "show", str(path), "--model", "tiny:nosuch", cwd=scratch), mentions=("tiny:nosuch",)
    )


def show_escapes_controls(scratch: Path) -> Outcome:
    row = {"instruction": "say \x1b]0;pwned\x07 hi \x1b[2J", "output": "ok\r done"}
    path = write_rows(scratch / "e.jsonl", [json.dumps(row)])
    ran = tunelab("data", "show", str(path), "--model", "tiny:llama", cwd=scratch)
    if ran.code != 0:
        return refused(ran, code=0)
    raw = [c for c in ("\x1b", "\x07", "\r") if c in ran.out]
    if raw:
        return Outcome("leak", f"raw {raw!r} written to the terminal")
    return Outcome("ok", "ESC, BEL and CR printed as \\x1b, \\x07, \\r")


def show_huge_row(scratch: Path) -> Outcome:
    """One 10 MB row: `data show` ran 129–150 s and 5.6 GB; audit takes seconds."""
    path = write_rows(
        scratch / "big.jsonl", [json.dumps({"instruction": "summarise", "output": "word " * 2_000_000})]
    )
    times = {}
    for command in ("audit", "show"):
        extra = ("--model", "tiny:llama") if command == "show" else ()
        start = time.perf_counter()
        ran = tunelab("data", command, str(path), *extra, cwd=scratch)
        times[command] = time.perf_counter() - start
        if ran.code != 0:
            return refused(ran, code=0)
    small = write_rows(scratch / "small.jsonl", [json.dumps(GOOD)])
    start = time.perf_counter()
    tunelab("data", "show", str(small), "--model", "tiny:llama", cwd=scratch)
    base = time.perf_counter() - start
    detail = f"show {times['show']:.1f}s (small row {base:.1f}s), audit {times['audit']:.1f}s"
    return Outcome("ok" if times["show"] < base + max(10.0, times["audit"]) else "silent", detail)


# ---- endpoints ---------------------------------------------------------------------------------------


class FakeEndpoint:
    """An OpenAI-shaped chat server on loopback; behaviour by the first path segment (module doc)."""

    def __init__(self, stall_after: int = 10**9) -> None:
        self.requests = 0
        self.stall_after = stall_after
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:  # /v1/models
                self._send(json.dumps({"data": [{"id": "m"}]}).encode(), "application/json")

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)) or b"{}")
                owner.answer(self, self.path.strip("/").split("/")[0], body)

            def _send(self, body: bytes, ctype: str) -> None:
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{mode}/v1"

    def __enter__(self) -> FakeEndpoint:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()

    def answer(self, handler, mode: str, body: dict) -> None:
        with self.lock:
            self.requests += 1
            n = self.requests
        if mode == "silent" or (mode == "stall" and n > self.stall_after):
            time.sleep(30)
            return
        if mode == "html":
            return handler._send(b"<html><body>Welcome to nginx!</body></html>", "text/html")
        if mode == "notjson":
            return handler._send(b"Internal proxy hiccup", "application/json")
        choices = (
            []
            if mode == "nochoices"
            else [{"index": 0, "message": {"role": "assistant", "content": self.text(mode, body, n)}}]
        )
        handler._send(
            json.dumps({"id": str(n), "object": "chat.completion", "choices": choices}).encode(),
            "application/json",
        )

    @staticmethod
    def text(mode: str, body: dict, n: int) -> str:
        prompt = body.get("messages", [{}])[-1].get("content", "")
        if "Write new tasks" in prompt:  # four tasks of words drawn at random: ROUGE-L keeps them apart
            return "\n".join(
                f"{k}. " + " ".join(random.Random(n * 10 + k).sample(WORDS, 7)) for k in range(4, 8)
            )
        if "Classification:" in prompt:
            return "No"
        dirty = " \ufffd\ufffd" if mode == "dirty" and n % 2 else (" \x07" if mode == "dirty" else "")
        return f"Input: <none>\nOutput: a careful answer in several words, number {n}{dirty}"


def _seeds(scratch: Path) -> Path:
    return write_rows(
        scratch / "seeds.jsonl", [json.dumps({"instruction": "Name a colour you like", "output": "blue"})]
    )


def endpoint_answers(mode: str, kind: str, *said: str) -> Case:
    """One command against an endpoint that answers ``mode``: one line naming the endpoint."""

    def run(scratch: Path) -> Outcome:
        with FakeEndpoint() as fake:
            url = fake.url(mode)
            common = ["--cache-dir", str(scratch / "cache"), "--timeout", "1", "-o", str(scratch / "o.jsonl")]
            if kind == "synth":
                args = ["data", "synth", str(_seeds(scratch)), "--endpoint", url, "--model", "m", "--n", "2"]
            else:
                prompts = write_rows(
                    scratch / "p.jsonl",
                    [json.dumps({"prompt": "Say hi", "chosen": "hi there", "rejected": "go away"})],
                )
                args = ["data", kind, str(prompts)] + (
                    ["--judge", f"{url}#m"] if kind == "judge" else ["--endpoint", url, "--model", "m"]
                )
            return refused(tunelab(*args, *common, cwd=scratch), mentions=(f"the endpoint {url} ", *said))

    return Case(AREA, f"{kind} against an endpoint answering {mode}", run)


def synth_dirty_model(scratch: Path) -> Outcome:
    """tiny:llama once kept rows full of U+FFFD and control characters: the closing audit drops them."""
    with FakeEndpoint() as fake:
        out = scratch / "o.jsonl"
        args = [
            "data",
            "synth",
            str(_seeds(scratch)),
            "--endpoint",
            fake.url("dirty"),
            "--model",
            "m",
            "--n",
            "4",
        ]
        ran = tunelab(
            *args,
            "--max-rounds",
            "2",
            "--cache-dir",
            str(scratch / "c"),
            "-o",
            str(out),
            "--json",
            cwd=scratch,
        )
    if ran.code != 0:
        return refused(ran, code=0)
    text = out.read_text(encoding="utf-8")
    if "\ufffd" in text or "\\u0007" in text or "\x07" in text:
        return Outcome("silent", "flagged rows were kept")
    return Outcome("ok", f"kept {len(text.splitlines())}; dropped {json.loads(ran.out)['dropped']}")


def synth_ctrl_c(scratch: Path) -> Outcome:
    """SIGINT once exited 130 with no word and no partial file."""
    out = scratch / "o.jsonl"
    env = user_env()
    with FakeEndpoint(stall_after=20) as fake:
        args = [
            "data",
            "synth",
            str(_seeds(scratch)),
            "--endpoint",
            fake.url("stall"),
            "--model",
            "m",
            "--n",
            "500",
        ]
        args += ["--prompts-per-round", "4", "--cache-dir", str(scratch / "c"), "-o", str(out)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "tunelab", *args],
            cwd=scratch,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 240
        while fake.requests <= fake.stall_after and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            return Outcome("silent", "still running 60 s after Ctrl-C")
    if "Traceback" in err:
        return Outcome("traceback", err.strip().splitlines()[-1][:160])
    said = [line for line in err.splitlines() if line.startswith("interrupted:")]
    if proc.returncode != 130 or not said or not out.exists():
        return Outcome("silent", f"exit {proc.returncode}; {err.strip()[-160:]}")
    return Outcome("ok", said[0][:160])


# ---- keep: outputs never overwrite inputs ------------------------------------------------------------


def output_is_the_input(scratch: Path) -> Outcome:
    path = write_rows(scratch / "t.jsonl", [json.dumps(GOOD)])
    before = path.read_bytes()
    outcome = refused(tunelab("data", "convert", str(path), "-o", str(path), "--overwrite", cwd=scratch))
    return outcome if path.read_bytes() == before else Outcome("loss", "the input was rewritten")


CASES = [
    Case(AREA, "number in a text field (trained as '42')", typed_value),
    Case(AREA, "duplicate JSON key", duplicate_key),
    Case(AREA, "NaN in a JSON field (trained as 'nan')", nan_constant),
    Case(AREA, "lone surrogate: audit lists, convert/clean name the line", lone_surrogate),
    Case(AREA, "audit lists all 10 empty answers of 2,088 rows", audit_lists_every_bad_row),
    Case(AREA, "clean keeps 'lol :: http' and agrees with the audit", bare_double_colon),
    Case(AREA, "LLaMA-Factory v1 parts and loss_weight read; 0.5 refused", llamafactory_v1),
    Case(AREA, "data show --model tiny:nosuch", show_unknown_tiny),
    Case(AREA, "data show prints ESC/BEL/CR escaped", show_escapes_controls),
    Case(AREA, "data show on one 10 MB row", show_huge_row),
    endpoint_answers("html", "synth", "text/html, not JSON"),
    endpoint_answers("nochoices", "judge", "without a message"),
    endpoint_answers("notjson", "constitute", "not JSON ('Internal proxy hiccup')"),
    endpoint_answers("silent", "synth", "did not answer within 1 s (--timeout)"),
    Case(AREA, "synth keeps no row the audit flags (U+FFFD, control chars)", synth_dirty_model),
    Case(AREA, "Ctrl-C in data synth writes the rows made so far", synth_ctrl_c),
    Case(AREA, "keep: convert -o INPUT --overwrite is refused", output_is_the_input),
]
