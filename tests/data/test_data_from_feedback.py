"""Feedback log (written by `tunelab serve --log-dir`) and `tunelab data from-feedback`."""

from __future__ import annotations

import json
import threading

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
        sampling={},
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
