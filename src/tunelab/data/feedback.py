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
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from tunelab.data.formats import FormatError, to_canonical
from tunelab.data.loaders import DataError, iter_records
from tunelab.data.outputs import atomic_open, check_outputs

__all__ = [
    "FEEDBACK_LOG",
    "REQUESTS_LOG",
    "Answer",
    "FeedbackLog",
    "from_feedback",
    "preference_rows",
    "unpaired_rows",
]

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
        # default=str: a sampling value JSON cannot hold is logged as text rather than failing a request.
        line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
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


# --- reading the logs back: `tunelab data from-feedback` ---------------------------------------------

AS = ("preference", "unpaired")
_EPS = 1e-9  # scores are means of floats: a gap of exactly min_gap must count as reaching it


@dataclass
class Answer:
    """One logged request usable as training data, with the scores given for its response id."""

    line: int
    id: str
    alias: str | None
    variant: str | None
    prompt: list[dict] | str  # chat messages, or the text prompt of a completion
    response: str
    scores: list[float] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The mean of the scores (only asked of scored answers)."""
        return sum(self.scores) / len(self.scores)

    def provenance(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "variant": self.variant,
            "alias": self.alias,
            "score": self.score if self.scores else None,
            "n": len(self.scores),
        }


@dataclass
class _Rejects:
    """Dropped log lines in the loader's rejects shape ``{"file", "line", "reason", "raw"}``, and a
    count per short reason for the summary table."""

    entries: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def add(self, path: Path, line: int, kind: str, detail: str, raw: Any) -> None:
        if not isinstance(raw, str):
            raw = json.dumps(raw, ensure_ascii=False, default=str)
        self.entries.append({"file": str(path), "line": line, "reason": f"{kind}: {detail}", "raw": raw})
        self.counts[kind] += 1

    def reader(self, path: Path) -> Callable[[int, str, str], None]:
        """The loader's on_reject callback for ``path``: unreadable lines (a crash's torn last line)."""
        return lambda line, reason, raw: self.add(path, line, "unreadable line", reason, raw)


def log_paths(log_dir: str | os.PathLike) -> tuple[Path, Path]:
    """requests.jsonl and feedback.jsonl of a `tunelab serve --log-dir` directory (both must exist)."""
    d = Path(log_dir)
    if not d.is_dir():
        what = "is a file" if d.exists() else "does not exist"
        raise DataError(d, 0, "", f"{what}; give the directory tunelab serve --log-dir wrote")
    paths = d / REQUESTS_LOG, d / FEEDBACK_LOG
    for p in paths:
        if not p.is_file():
            raise DataError(p, 0, "", "not found; give the directory tunelab serve --log-dir wrote")
    return paths


def _developer_as_system(messages: Any) -> Any:
    """OpenAI's ``developer`` role is its newer name for ``system`` (the server accepts both); data
    formats know only ``system``, so the instructions are kept under that role."""
    if not isinstance(messages, list):
        return messages
    return [
        {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m
        for m in messages
    ]


def _request(rec: dict) -> tuple[str, str] | Answer:
    """The request record as an :class:`Answer`, or (reason, detail) when it cannot be one."""
    rid = rec.get("id")
    if not isinstance(rid, str) or not rid:
        return "missing field", "field 'id' must be the response id (a non-empty string)"
    has_text = "response" in rec or "messages" in rec or "prompt" in rec
    if not has_text:
        return (
            "logged without text",
            "the request was logged without prompt and response; it cannot be trained on",
        )
    prompt = _developer_as_system(rec["messages"]) if rec.get("messages") is not None else rec.get("prompt")
    if not isinstance(prompt, (list, str)):
        return "missing field", "needs 'messages' (a list of messages) or 'prompt' (a string)"
    if not isinstance(rec.get("response"), str):
        return "missing field", "field 'response' must be the answer's text (a string)"
    answer = Answer(0, rid, rec.get("alias"), rec.get("variant"), prompt, rec["response"])
    try:  # exactly what training will read: the row it becomes must fit the unpaired format
        to_canonical(_unpaired_row(answer, True), "unpaired")
    except FormatError as e:
        return "not usable as training data", str(e)
    return answer


def read_requests(path: Path, rejects: _Rejects) -> tuple[dict[str, Answer], dict[str, int], int]:
    """Usable requests by id, the lines of rejected ones by id, and the number of records read."""
    answers: dict[str, Answer] = {}
    bad_ids: dict[str, int] = {}
    n = 0
    for line, rec in iter_records(path, skip_bad=True, on_reject=rejects.reader(path)):
        n += 1
        got = _request(rec)
        if isinstance(got, Answer) and got.id in answers:
            got = ("duplicate request id", f"id {got.id!r} was logged first on line {answers[got.id].line}")
        if isinstance(got, Answer):
            got.line = line
            answers[got.id] = got
            continue
        rejects.add(path, line, got[0], got[1], rec)
        if isinstance(rec.get("id"), str) and rec["id"] not in answers:
            bad_ids.setdefault(rec["id"], line)
    return answers, bad_ids, n


def _score(rec: dict) -> tuple[str, str] | float:
    s = rec.get("score")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
        return "missing field", f"field 'score' must be a finite number, got {s!r}"
    return float(s)


def join_feedback(
    path: Path, answers: dict[str, Answer], bad_ids: dict[str, int], rejects: _Rejects
) -> tuple[list[float], int]:
    """Attach each feedback score to its request by id; the scores used, and the records read."""
    used: list[float] = []
    n = 0
    for line, rec in iter_records(path, skip_bad=True, on_reject=rejects.reader(path)):
        n += 1
        fid, score = rec.get("id"), _score(rec)
        if isinstance(score, tuple):
            rejects.add(path, line, *score, rec)
        elif not isinstance(fid, str) or not fid:
            detail = "scored an adapter directly, not a response; only scored responses can be paired"
            rejects.add(path, line, "no response id", detail, rec)
        elif fid in answers:
            answers[fid].scores.append(score)
            used.append(score)
        elif fid in bad_ids:
            detail = f"its request ({REQUESTS_LOG} line {bad_ids[fid]}) was rejected"
            rejects.add(path, line, "request rejected", detail, rec)
        else:
            rejects.add(path, line, "no logged request", f"no request with id {fid!r} in {REQUESTS_LOG}", rec)
    return used, n


def _completion(answer: Answer) -> list[dict] | str:
    # Chat prompts get one assistant message (TRL's conversational shape); text prompts stay strings.
    if isinstance(answer.prompt, str):
        return answer.response
    return [{"role": "assistant", "content": answer.response}]


def _unpaired_row(answer: Answer, label: bool) -> dict:
    return {
        "prompt": answer.prompt,
        "completion": _completion(answer),
        "label": label,
        "feedback": answer.provenance(),
    }


def _preference_row(chosen: Answer, rejected: Answer) -> dict:
    return {
        "prompt": chosen.prompt,
        "chosen": _completion(chosen),
        "rejected": _completion(rejected),
        "feedback": {"chosen": chosen.provenance(), "rejected": rejected.provenance()},
    }


def _by_prompt(answers: list[Answer]) -> list[list[Answer]]:
    """Answers grouped by identical prompt (same messages or same text), in order of first logging."""
    groups: dict[str, list[Answer]] = {}
    for a in answers:
        groups.setdefault(json.dumps(a.prompt, sort_keys=True, ensure_ascii=False), []).append(a)
    return list(groups.values())


def preference_rows(answers: list[Answer], min_gap: float, skipped: Counter) -> list[dict]:
    """Every pair of different answers to one prompt whose mean scores differ by at least ``min_gap``;
    the better-scored answer is chosen. ``skipped`` counts the pairs (and prompts) that gave no row."""
    rows = []
    for group in _by_prompt(answers):
        if len(group) < 2:
            skipped["prompts with a single scored answer"] += 1
        for a, b in combinations(group, 2):
            if a.response.strip() == b.response.strip():
                skipped["pairs of identical answers"] += 1
            elif abs(a.score - b.score) < min_gap - _EPS:
                skipped["pairs with a score gap under --min-gap"] += 1
            else:
                rows.append(_preference_row(*((a, b) if a.score > b.score else (b, a))))
    return rows


def unpaired_rows(answers: list[Answer], threshold: float) -> list[dict]:
    """One KTO row per scored answer: desirable when its mean score is at least ``threshold``."""
    return [_unpaired_row(a, a.score >= threshold - _EPS) for a in answers]


def _write(output: Path, rows: list[dict]) -> None:
    with atomic_open(output) as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def _check_options(as_: str, min_gap: float, threshold: float | None) -> None:
    if as_ not in AS:
        raise ValueError(f"--as must be one of {', '.join(AS)}, got {as_!r}")
    if not (math.isfinite(min_gap) and min_gap > 0):
        raise ValueError(f"--min-gap must be a number above 0 (equal scores never pair), got {min_gap}")
    if threshold is not None and not math.isfinite(threshold):
        raise ValueError(f"--threshold must be a finite number, got {threshold}")


def from_feedback(
    log_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    as_: str = "preference",
    min_gap: float = 1.0,
    threshold: float | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Turn a `tunelab serve --log-dir` directory into preference pairs (DPO) or unpaired rows (KTO).

    Writes ``output`` (JSONL, nothing when no row is made) and ``output.rejects.jsonl`` (every
    dropped log line with file, line and reason); returns the counts."""
    _check_options(as_, min_gap, threshold)
    requests, feedback = log_paths(log_dir)
    output = Path(output)
    rejects_path = output.with_name(output.name + ".rejects.jsonl")
    check_outputs([requests, feedback], [output, rejects_path], overwrite=overwrite)
    rejects = _Rejects()
    answers, bad_ids, n_requests = read_requests(requests, rejects)
    used, n_feedback = join_feedback(feedback, answers, bad_ids, rejects)
    scored = [a for a in answers.values() if a.scores]
    summary: dict[str, Any] = {
        "log_dir": str(log_dir), "as": as_, "requests": n_requests, "feedback": n_feedback,
        "scored_answers": len(scored), "unscored_requests": len(answers) - len(scored),
        "prompts": len(_by_prompt(scored)), "skipped": {}, "rejected": dict(rejects.counts),
        "rejects": str(rejects_path), "output": None, "notes": [],
    }  # fmt: skip
    rows = _rows(scored, used, summary, min_gap=min_gap, threshold=threshold)
    summary["rows"] = len(rows)
    _write(rejects_path, rejects.entries)  # always, so no stale rejects file is left beside new rows
    if rows:
        _write(output, rows)
        summary["output"] = str(output)
    return summary


def _rows(
    scored: list[Answer], used: list[float], summary: dict, *, min_gap: float, threshold: float | None
) -> list[dict]:
    """Build the rows ``summary['as']`` asks for, adding its settings and counts to the summary."""
    if summary["as"] == "preference":
        skipped: Counter = Counter()
        rows = preference_rows(scored, min_gap, skipped)
        summary.update(min_gap=min_gap, skipped=dict(skipped))
        return rows
    if threshold is None and used:
        threshold = (min(used) + max(used)) / 2  # the midpoint of the scale the scores actually span
    rows = unpaired_rows(scored, threshold if threshold is not None else 0.0)
    good = sum(r["label"] for r in rows)
    summary.update(threshold=threshold, desirable=good, undesirable=len(rows) - good)
    if rows and good in (0, len(rows)):
        side = "desirable" if good else "undesirable"
        summary["notes"].append(
            f"every row is {side} (threshold {threshold:g}); KTO learns from both kinds: "
            "pass --threshold to say where a good answer starts"
        )
    return rows
