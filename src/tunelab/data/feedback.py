"""Served requests and their feedback scores, logged as JSONL and turned into preference data.

`tunelab serve --log-dir DIR` writes two append-only logs through :class:`FeedbackLog`:

- ``requests.jsonl``: one record per completed completion
  ``{"id", "time", "alias", "variant", "user", "messages" | "prompt", "response", "finish_reason",
  "sampling"}``;
- ``feedback.jsonl``: one record per ``/v1/feedback`` call
  ``{"id", "time", "alias", "variant", "score", "user"}``.

`tunelab data from-feedback` reads them back (see :func:`build`): feedback is joined to requests by
id and answers to the same prompt become DPO preference pairs or KTO unpaired rows.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["FEEDBACK_LOG", "REQUESTS_LOG", "FeedbackLog"]

REQUESTS_LOG = "requests.jsonl"
FEEDBACK_LOG = "feedback.jsonl"


class FeedbackLog:
    """Thread-safe append-only JSONL writer: one flushed line per record, directory created.

    With ``log_prompts=False`` the request records keep ids, aliases, variants and sampling but not the
    text (no messages, prompt or response): such logs can be counted but not turned into pairs.
    """

    def __init__(self, directory: Path, *, log_prompts: bool = True) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_prompts = log_prompts
        # One lock for both files: the server writes from its event loop and worker threads.
        self._lock = threading.Lock()
        self._files = {name: self._open(self.directory / name) for name in (REQUESTS_LOG, FEEDBACK_LOG)}

    @staticmethod
    def _open(path: Path):
        # Append mode: a restarted server adds to the log, never truncates a day's feedback. Line
        # buffering plus an explicit flush so a crash loses at most the line being written.
        return open(path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()

    def _write(self, name: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            fh = self._files[name]
            if fh.closed:
                return  # written after shutdown: dropped rather than raising into a request
            fh.write(line)
            fh.flush()

    def request(
        self,
        *,
        id: str,  # noqa: A002 - the OpenAI response id, named as in the record
        alias: str | None,
        variant: str,
        user: str | None,
        messages: list[dict] | None = None,
        prompt: str | None = None,
        response: str,
        finish_reason: str | None,
        sampling: dict,
    ) -> None:
        """Log one completed completion (chat: ``messages``; text completion: ``prompt``)."""
        record: dict[str, Any] = {
            "id": id,
            "time": time.time(),
            "alias": alias,
            "variant": variant,
            "user": user,
        }
        if self.log_prompts:
            if messages is not None:
                record["messages"] = messages
            else:
                record["prompt"] = prompt
            record["response"] = response
        record.update(finish_reason=finish_reason, sampling=sampling)
        self._write(REQUESTS_LOG, record)

    def feedback(
        self,
        *,
        id: str | None,  # noqa: A002 - the response id the score is for
        alias: str | None,
        variant: str,
        score: float,
        user: str | None = None,
    ) -> None:
        """Log one feedback score for a response id."""
        record = {
            "id": id,
            "time": time.time(),
            "alias": alias,
            "variant": variant,
            "score": score,
            "user": user,
        }
        self._write(FEEDBACK_LOG, record)

    def close(self) -> None:
        with self._lock:
            for fh in self._files.values():
                if not fh.closed:
                    fh.close()

    def __enter__(self) -> FeedbackLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
