"""The studio's Export page: `tunelab export` as its own process, then the parity gate's table."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from studio_client import studio_client
from tunelab.studio import export_page

VERIFICATION = {
    "passed": False,
    "failed_checks": ["token_agreement"],
    "failures": ["token_agreement: greedy-token agreement with the run is 0.5000, below the minimum 0.9000"],
    "n": 8,
    "main_metric": "exact_match",
    "run": {"perplexity": 815.7, "exact_match": 0.25, "stop_share": 0.125},
    "export": {"perplexity": 815.7, "exact_match": 0.25, "stop_share": 0.125, "token_agreement": 0.5},
    "comparison": {"metric": "exact_match", "delta": 0.0, "ci95": [-0.125, 0.125], "n_boot": 1000},
    "checks": [
        {"name": "exact_match", "value": 0.0, "limit": "no significant drop", "passed": True},
        {"name": "token_agreement", "value": 0.5, "limit": 0.9, "passed": False},
        {"name": "perplexity", "value": 1.0, "limit": 1.02, "passed": True},
        {"name": "stop_share", "value": 0.0, "limit": 0.05, "passed": True},
    ],
    "engine": "transformers",
    "precision": "merged",
    "data": "eval.jsonl",
}


def finished(runs: Path, name: str) -> None:
    (runs / name / "final").mkdir(parents=True)
    (runs / name / "manifest.json").write_text('{"status": "completed"}', encoding="utf-8")


def fake_export(runs: Path, job: str, out: Path, verification: dict | None, log: str = "") -> None:
    """What an ended export process leaves: its job record (a PID no process has), log and files."""
    folder = runs / ".studio" / "export"
    folder.mkdir(parents=True, exist_ok=True)
    command = ["python", "-m", "tunelab", "export", str(runs / "r"), "--out", str(out), "--merge"]
    (folder / f"{job}.json").write_text(json.dumps({"name": job, "pid": 2**22 + 7, "command": command}))
    (folder / f"{job}.log").write_text(log, encoding="utf-8")
    if verification is not None:
        out.mkdir(parents=True)
        meta = {"kind": "merged", "gguf_type": None, "verification": verification}
        (out / "tunelab_export.json").write_text(json.dumps(meta), encoding="utf-8")


def test_the_form_offers_finished_runs_and_gguf_only_with_llama_cpp(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    finished(runs, "done-run")
    (runs / "unfinished").mkdir()
    (runs / "unfinished" / "manifest.json").write_text('{"status": "running"}', encoding="utf-8")
    client = studio_client(runs)
    monkeypatch.setattr(export_page.importlib.util, "find_spec", lambda name: None)
    html = client.get("/export?run=done-run").text
    assert '<option value="done-run" selected>' in html and "unfinished" not in html
    assert 'value="merged"' in html and 'value="adapter"' in html and "gguf" not in html
    monkeypatch.setattr(export_page.importlib.util, "find_spec", lambda name: object())
    assert 'value="gguf:q4_k_m"' in client.get("/export").text


def test_start_refuses_an_existing_folder_an_unfinished_run_and_an_unknown_kind(tmp_path):
    runs = tmp_path / "runs"
    finished(runs, "r")
    (runs / "exports" / "r-merged").mkdir(parents=True)
    client = studio_client(runs)
    html = client.post("/export/start", data={"run": "r", "kind": "merged"}).text
    assert "r-merged already exists; choose a new folder" in html  # the default folder is never replaced
    html = client.post("/export/start", data={"run": "nope", "kind": "merged"}).text
    assert "run: nope is not a finished run" in html
    html = client.post("/export/start", data={"run": "r", "kind": "onnx", "out": str(tmp_path / "x")}).text
    assert "kind: onnx is not one of merged, adapter, gguf:TYPE" in html
    assert not (runs / ".studio" / "export").exists()  # nothing was started


def test_an_ended_export_shows_the_gate_table_or_the_failures_last_line(tmp_path):
    runs = tmp_path / "runs"
    fake_export(runs, "r-merged", tmp_path / "out", VERIFICATION, log="error: export parity gate failed\n")
    fake_export(runs, "broken", tmp_path / "none", None, log="loading\nerror: out of disk space\n")
    client = studio_client(runs)
    html = client.get("/export/job/r-merged").text
    table = html[html.index('id="gate-table"') : html.index("</table>")]
    assert "n=8, transformers, merged" in table
    assert '<th scope="row">token_agreement</th>' in table and "≥ 0.90" in table and "FAILED" in table
    assert "[-0.1250, +0.1250]" in table  # the main metric's CI of export − run
    assert "ratio ≤ 1.020" in table and "drop ≤ 0.05" in table
    assert "parity gate failed:</strong> token_agreement: greedy-token agreement" in html
    assert "export failed:</strong> error: out of disk space" in client.get("/export/job/broken").text
    page = client.get("/export?job=r-merged").text  # the page lists and reopens earlier exports
    assert 'href="/export?job=broken"' in page and 'id="gate-table"' in page


def test_the_run_page_offers_export_once_the_run_is_finished(tmp_path):
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    client = studio_client(runs)
    assert "export-link" not in client.get("/export/link?run=r").text
    (runs / "r" / "final").mkdir()
    assert 'href="/export?run=r"' in client.get("/export/link?run=r").text


@pytest.mark.slow
def test_a_real_export_runs_as_a_process_and_shows_the_passed_gate(bot_runs):
    runs = bot_runs["yes-bot"].parent
    client = studio_client(runs)
    html = client.post("/export/start", data={"run": "yes-bot", "kind": "adapter"}).text
    assert "Exporting <code>yes-bot</code>" in html and 'hx-trigger="every 2s"' in html
    deadline = time.monotonic() + 300
    while "Exporting" in html and time.monotonic() < deadline:
        time.sleep(1)
        html = client.get("/export/job/yes-bot-adapter").text
    assert (runs / "exports" / "yes-bot-adapter" / "tunelab_export.json").is_file()
    assert 'id="gate-table"' in html and "Parity gate passed." in html
    assert "token_agreement" in html
    again = client.post("/export/start", data={"run": "yes-bot", "kind": "adapter"}).text
    assert "already exists" in again  # a second export never replaces the first
