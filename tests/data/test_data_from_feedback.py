"""Feedback log (written by `tunelab serve --log-dir`) and `tunelab data from-feedback`."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tunelab.data.canonical import read_canonical
from tunelab.data.cli import app
from tunelab.data.feedback import FEEDBACK_LOG, REQUESTS_LOG, FeedbackLog


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- the writer --------------------------------------------------------------------------------------


def test_feedback_log_writes_flushed_records_with_the_spec_fields(tmp_path):
    log = FeedbackLog(tmp_path / "logs" / "nested")  # the directory is created
    msgs = [{"role": "user", "content": "Héllo [red]x[/]"}]
    log.request(
        id="chatcmpl-1",
        alias="prod",
        variant="a",
        user="u1",
        messages=msgs,
        response="Hi ✓",
        finish_reason="stop",
        sampling={"temperature": 0.0, "max_tokens": 8},
    )
    log.request(
        id="cmpl-2",
        alias=None,
        variant="base",
        user=None,
        prompt="2+2=",
        response="4",
        finish_reason="length",
        sampling={"stop": Path("odd")},  # not JSON: logged as text, never failing the request
    )
    log.feedback(id="chatcmpl-1", alias="prod", variant="a", score=1.0, user="u1")
    # Read back while the log is still open: every record is flushed as written.
    reqs = _lines(tmp_path / "logs" / "nested" / REQUESTS_LOG)
    fbs = _lines(tmp_path / "logs" / "nested" / FEEDBACK_LOG)
    assert set(reqs[0]) == {
        "id",
        "time",
        "alias",
        "variant",
        "user",
        "messages",
        "response",
        "finish_reason",
        "sampling",
    }
    assert reqs[0]["messages"] == msgs and reqs[0]["response"] == "Hi ✓"  # user text exactly as given
    assert reqs[1]["prompt"] == "2+2=" and "messages" not in reqs[1] and reqs[1]["finish_reason"] == "length"
    assert reqs[1]["sampling"] == {"stop": "odd"}
    assert set(fbs[0]) == {"id", "time", "alias", "variant", "score", "user"}
    assert fbs[0]["score"] == 1.0 and fbs[0]["id"] == "chatcmpl-1" and isinstance(fbs[0]["time"], float)
    log.close()


def test_feedback_log_appends_across_restarts_and_is_thread_safe(tmp_path):
    with FeedbackLog(tmp_path) as log:
        log.feedback(id="old", alias=None, variant="a", score=0.0)

    def burst(k):
        for i in range(50):
            log2.feedback(id=f"{k}-{i}", alias="x", variant="b", score=float(i), user="y" * 500)

    with FeedbackLog(tmp_path) as log2:  # a restarted server: the old records stay
        threads = [threading.Thread(target=burst, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    fbs = _lines(tmp_path / FEEDBACK_LOG)  # every line parses: no interleaved writes
    assert fbs[0]["id"] == "old" and len(fbs) == 1 + 4 * 50
    assert len({r["id"] for r in fbs}) == 201


def test_feedback_log_without_prompts_keeps_no_text(tmp_path):
    with FeedbackLog(tmp_path, log_prompts=False) as log:
        log.request(
            id="r", alias="p", variant="a", user="u", messages=[{"role": "user", "content": "secret"}],
            response="also secret", finish_reason="stop", sampling={},
        )  # fmt: skip
        log.close()
        log.feedback(id="r", alias="p", variant="a", score=1.0)  # after close: dropped, no exception
    text = (tmp_path / REQUESTS_LOG).read_text()
    assert "secret" not in text and json.loads(text)["id"] == "r"
    assert (tmp_path / FEEDBACK_LOG).read_text() == ""


# --- from-feedback -----------------------------------------------------------------------------------

runner = CliRunner()
USER = [{"role": "system", "content": "Be brief [b]."}, {"role": "user", "content": "Say hi"}]
OTHER = [{"role": "user", "content": "Name a colour"}]


def served(log_dir, items):
    """Log requests and their feedback through the real writer: (id, prompt, response, scores)."""
    with FeedbackLog(log_dir) as log:
        for rid, prompt, response, _ in items:
            text = {"prompt": prompt} if isinstance(prompt, str) else {"messages": prompt}
            log.request(
                id=rid, alias="prod", variant=f"v-{rid}", user="u", response=response, finish_reason="stop",
                sampling={"temperature": 0.7}, **text,
            )  # fmt: skip
        for rid, _, _, scores in items:
            for s in scores:
                log.feedback(id=rid, alias="prod", variant=f"v-{rid}", score=s)
    return log_dir


LOGGED = [
    ("a", USER, "hi there", [1.0]),
    ("b", USER, "go away", [-1.0, 0.0]),  # mean -0.5: several scores for one id are averaged
    ("c", USER, "hi there", [-1.0]),  # the same text as a: never paired with it
    ("d", USER, "hello", [0.25]),  # 1.25 above c: pairs with it; 0.75 from a and b: with neither
    ("e", OTHER, "blue", [1.0]),
    ("f", OTHER, "I will not", [-1.0]),
    ("g", "2+2=", "4", [1.0]),  # a text completion: prompt and answers stay strings
    ("h", "2+2=", "5", [-1.0]),
    ("i", "lonely", "x", []),  # never scored: unused, not a reject
]


def run(*args):
    res = runner.invoke(app, ["from-feedback", *map(str, args)])
    return res


def test_preference_pairs_join_by_id_and_read_back_as_preference(tmp_path):
    logs = served(tmp_path / "logs", LOGGED)
    out = tmp_path / "pairs.jsonl"
    res = run(logs, "-o", out)
    assert res.exit_code == 0, res.output
    rows = _lines(out)
    got = [(r["feedback"]["chosen"]["id"], r["feedback"]["rejected"]["id"]) for r in rows]
    # Gaps: a-b 1.5, c-d 1.25 pair; a-c are the same text; a-d 0.75, b-c 0.5, b-d 0.75 are under 1.
    assert got == [("a", "b"), ("d", "c"), ("e", "f"), ("g", "h")]
    first = rows[0]
    assert first["prompt"] == USER and first["chosen"] == [{"role": "assistant", "content": "hi there"}]
    assert first["rejected"] == [{"role": "assistant", "content": "go away"}]
    assert first["feedback"]["rejected"] == {
        "id": "b",
        "variant": "v-b",
        "alias": "prod",
        "score": -0.5,
        "n": 2,
    }
    assert rows[3]["prompt"] == "2+2=" and rows[3]["chosen"] == "4" and rows[3]["rejected"] == "5"
    assert "pairs of identical answers" in res.stdout and "4 pairs made" in res.stdout
    canon, report, fmt = read_canonical(str(out))  # tunelab's own reader, as training reads it
    assert fmt == "preference" and len(canon) == 4 and report.rows_rejected == 0
    assert canon[3][1]["prompt"] == [{"role": "user", "content": "2+2="}]
    assert canon[0][1]["prompt"][0] == {"role": "system", "content": "Be brief [b]."}


def test_developer_messages_are_system_messages_in_the_data(tmp_path):
    dev = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    logs = served(tmp_path / "logs", [("a", dev, "hi", [1.0]), ("b", dev, "go away", [-1.0])])
    assert run(logs, "-o", tmp_path / "p.jsonl").exit_code == 0
    (row,) = _lines(tmp_path / "p.jsonl")
    assert row["prompt"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi"},
    ]
    assert read_canonical(str(tmp_path / "p.jsonl"))[2] == "preference"


def test_min_gap_decides_which_answers_pair(tmp_path):
    logs = served(tmp_path / "logs", LOGGED)
    out = tmp_path / "pairs.jsonl"
    assert run(logs, "-o", out, "--min-gap", "0.5", "--json").exit_code == 0
    got = [(r["feedback"]["chosen"]["id"], r["feedback"]["rejected"]["id"]) for r in _lines(out)]
    assert got == [("a", "b"), ("a", "d"), ("b", "c"), ("d", "b"), ("d", "c"), ("e", "f"), ("g", "h")]
    assert all(r["chosen"] != r["rejected"] for r in _lines(out))


def test_unpaired_rows_label_by_threshold_and_read_back_as_unpaired(tmp_path):
    logs = served(tmp_path / "logs", LOGGED)
    out = tmp_path / "kto.jsonl"
    res = run(logs, "-o", out, "--as", "unpaired", "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["threshold"] == 0.0  # the midpoint of the scores seen (-1..1)
    labels = {r["feedback"]["id"]: r["label"] for r in _lines(out)}
    assert labels == {
        "a": True,
        "b": False,
        "c": False,
        "d": True,
        "e": True,
        "f": False,
        "g": True,
        "h": False,
    }
    canon, _, fmt = read_canonical(str(out))
    assert fmt == "unpaired" and [c["label"] for _, c in canon] == list(labels.values())
    assert canon[0][1]["completion"] == [{"role": "assistant", "content": "hi there"}]
    assert run(logs, "-o", out, "--as", "unpaired", "--threshold", "0.5", "--overwrite").exit_code == 0
    assert [r["feedback"]["id"] for r in _lines(out) if r["label"]] == ["a", "e", "g"]


def test_dropped_lines_are_counted_and_written_with_file_line_and_reason(tmp_path):
    logs = served(tmp_path / "logs", LOGGED[:2])
    req, fb = logs / REQUESTS_LOG, logs / FEEDBACK_LOG
    with req.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "a", "messages": USER, "response": "again"}) + "\n")  # line 3
        fh.write(json.dumps({"id": "empty", "prompt": "p", "response": "  "}) + "\n")  # line 4
        fh.write(json.dumps({"id": "nop", "variant": "v"}) + "\n")  # line 5: logged without text
        fh.write(json.dumps({"messages": USER, "response": "r"}) + "\n")  # line 6: no id
    with fb.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"id": "ghost", "score": 1}) + "\n")  # line 4
        fh.write(json.dumps({"id": "empty", "score": 1}) + "\n")  # line 5
        fh.write(json.dumps({"id": None, "variant": "v", "score": 1}) + "\n")  # line 6
        fh.write(json.dumps({"id": "a", "score": "great"}) + "\n")  # line 7
        fh.write('{"id": "a", "sc')  # line 8: torn by a crash
    before = req.read_bytes(), fb.read_bytes()
    out = tmp_path / "p.jsonl"
    res = run(logs, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    assert (req.read_bytes(), fb.read_bytes()) == before  # inputs untouched
    where = {(Path(r["file"]).name, r["line"]): r["reason"] for r in _lines(Path(f"{out}.rejects.jsonl"))}
    assert where == {
        (REQUESTS_LOG, 3): "duplicate request id: id 'a' was logged first on line 1",
        (REQUESTS_LOG, 4): where[(REQUESTS_LOG, 4)],
        (REQUESTS_LOG, 5): where[(REQUESTS_LOG, 5)],
        (REQUESTS_LOG, 6): "missing field: field 'id' must be the response id (a non-empty string)",
        (FEEDBACK_LOG, 4): "no logged request: no request with id 'ghost' in requests.jsonl",
        (FEEDBACK_LOG, 5): "request rejected: its request (requests.jsonl line 4) was rejected",
        (FEEDBACK_LOG, 6): where[(FEEDBACK_LOG, 6)],
        (FEEDBACK_LOG, 7): "missing field: field 'score' must be a finite number, got 'great'",
        (FEEDBACK_LOG, 8): where[(FEEDBACK_LOG, 8)],
    }
    assert (
        where[(REQUESTS_LOG, 4)].startswith("not usable as training data: ")
        and "empty" in where[(REQUESTS_LOG, 4)]
    )
    assert where[(REQUESTS_LOG, 5)].startswith("logged without text")
    assert where[(FEEDBACK_LOG, 6)].startswith("no response id")
    assert where[(FEEDBACK_LOG, 8)].startswith("unreadable line: invalid JSON")
    s = json.loads(res.stdout)
    assert s["rejected"] == {
        "duplicate request id": 1, "not usable as training data": 1, "logged without text": 1,
        "missing field": 2, "no logged request": 1, "request rejected": 1, "no response id": 1,
        "unreadable line": 1,
    }  # fmt: skip
    # Every feedback record is used (a, b, b) or rejected (4); the torn 8th line never became a record.
    assert s["feedback"] == 3 + 4 and s["rows"] == 1


def test_bad_input_is_one_line_exit_2_and_never_overwrites(tmp_path):
    logs = served(tmp_path / "logs", LOGGED)
    cases = [
        ([tmp_path / "missing", "-o", tmp_path / "o.jsonl"], "does not exist"),
        ([logs, "-o", logs / REQUESTS_LOG], "is the input file"),
        ([logs, "-o", logs / FEEDBACK_LOG, "--overwrite"], "is the input file"),
        ([logs, "-o", tmp_path / "o.jsonl", "--min-gap", "0"], "--min-gap must be a number above 0"),
        ([logs, "-o", tmp_path / "o.jsonl", "--as", "dpo"], "--as must be one of preference, unpaired"),
    ]
    before = (logs / REQUESTS_LOG).read_bytes()
    for args, message in cases:
        res = run(*args)
        assert res.exit_code == 2 and message in res.stderr, (args, res.output)
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert (logs / REQUESTS_LOG).read_bytes() == before
    (tmp_path / "o.jsonl").write_text("mine\n")
    res = run(logs, "-o", tmp_path / "o.jsonl")
    assert res.exit_code == 2 and "already exists; pass --overwrite" in res.stderr
    assert (tmp_path / "o.jsonl").read_text() == "mine\n"
    (logs / FEEDBACK_LOG).unlink()
    res = run(logs, "-o", tmp_path / "n.jsonl")
    assert res.exit_code == 2 and f"{logs / FEEDBACK_LOG}: not found" in res.stderr


def test_no_pairs_is_an_error_and_writes_no_data(tmp_path):
    logs = served(tmp_path / "logs", [("a", USER, "hi", [1.0]), ("b", USER, "yo", [0.5])])
    out = tmp_path / "p.jsonl"
    res = run(logs, "-o", out)
    assert res.exit_code == 2 and "no rows made" in res.stderr and "1 or more apart" in res.stderr
    assert "score gap under --min-gap" in res.stdout  # the table still says why
    assert not out.exists()


# --- the written data trains -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("as_", "objective", "start"), [("preference", "dpo", math.log(2)), ("unpaired", "kto", 0.5)]
)
def test_tiny_training_starts_on_the_written_data(as_, objective, start, tiny_recipe, tmp_path):
    """DPO on the pairs and KTO on the unpaired rows start on the tiny model. LoRA's adapter starts at
    zero, so the policy equals the reference and the first loss is exactly log 2 (DPO) or 0.5 (KTO):
    proof the rows were read as preference data, not as something else that happens to train."""
    from tunelab.train.run import train  # data tests stay light unless they train

    logs = served(tmp_path / "logs", LOGGED)
    out = tmp_path / f"{as_}.jsonl"
    assert run(logs, "-o", out, "--as", as_).exit_code == 0
    recipe = tiny_recipe(
        "lora",
        objective__name=objective,
        data__train=str(out),
        data__eval=str(out),
        training__max_steps=2,
        training__batch_size=2,
    )
    result = train(recipe)
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)
    assert result.losses[0] == pytest.approx(start, abs=1e-4)


def test_one_sided_labels_and_empty_feedback_are_said(tmp_path):
    logs = served(tmp_path / "logs", [("a", USER, "hi", [1.0]), ("b", USER, "yo", [1.0])])
    res = run(logs, "-o", tmp_path / "k.jsonl", "--as", "unpaired")
    assert res.exit_code == 0 and "note: every row is desirable (threshold 1)" in res.stderr
    assert [r["label"] for r in _lines(tmp_path / "k.jsonl")] == [True, True]
    quiet = served(tmp_path / "quiet", [("a", USER, "hi", [])])  # served, never scored
    res = run(quiet, "-o", tmp_path / "q.jsonl")
    assert res.exit_code == 2 and "no feedback joined to a logged request" in res.stderr
