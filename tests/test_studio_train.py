"""The studio's Train page: runs are `tunelab train` processes; their state is read from disk."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml
from markupsafe import escape

from studio_client import studio_client
from tunelab.evaluate.predictions import disagrees, read_prediction_rows
from tunelab.studio import jobs
from tunelab.studio.eval_page import parse_request
from tunelab.studio.live import MetricsTail, sse

DATA = Path(__file__).parents[1] / "recipes" / "data"


def tiny_recipe(folder: Path, steps: int) -> Path:
    recipe = {
        "seed": 0,
        "model": {"name_or_path": "tiny:llama"},
        "data": {
            "train": str(DATA / "tiny_train.jsonl"),
            "eval": str(DATA / "tiny_eval.jsonl"),
            "max_length": 64,
        },
        "method": {"name": "lora", "r": 4},
        "training": {"max_steps": steps, "batch_size": 4, "learning_rate": 0.005, "eval_every": 1000},
    }
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sse_splits_lines_and_tail_reads_only_complete_rows(tmp_path):
    assert sse("log", "a\nb") == "event: log\ndata: a\ndata: b\n\n"
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 1, "eval_loss": 3}\n{"step": 2, "lo', encoding="utf-8"
    )
    tail = MetricsTail(path)
    assert [r["step"] for r in tail.new_rows()] == [1]  # eval rows and the partial line are not chart rows
    with open(path, "a", encoding="utf-8") as f:
        f.write('ss": 1.5}\n')
    assert [(r["step"], r["loss"]) for r in tail.new_rows()] == [(2, 1.5)]


def test_a_bad_recipe_is_refused_with_recipe_checks_messages(tmp_path):
    client = studio_client(tmp_path / "runs")
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {name_or_path: tiny:llama}\nmethod: {name: lora}\ndata: {train: nope.jsonl}\n",
        encoding="utf-8",
    )
    html = client.post("/train/start", data={"recipe": str(bad)}).text
    assert "data.train" in html and "file not found" in html
    assert not (tmp_path / "runs" / ".studio").exists()  # nothing was started


def test_unknown_or_escaping_run_names_are_404(tmp_path):
    client = studio_client(tmp_path / "runs")
    assert client.get("/train/nope").status_code == 404
    assert client.get("/train/..%2F..").status_code == 404


@pytest.mark.slow
def test_a_run_streams_its_metrics_and_finishes(tmp_path):
    runs = tmp_path / "runs"
    client = studio_client(runs)
    response = client.post("/train/start", data={"recipe": str(tiny_recipe(tmp_path, 4)), "name": "one"})
    assert response.headers["HX-Redirect"] == "/train/one"
    events = []
    with client.stream("GET", "/train/one/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] == "metrics":
                events.append(json.loads(line[6:]))
            if events and events[-1] == "done":
                break
    rows = [row for e in events if isinstance(e, list) for row in e]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in rows)
    assert "status" in events and "log" in events
    assert jobs.run_state(runs, "one").status == "completed"
    assert "one" in client.get("/train").text  # listed after a restart too: it is on disk
    assert "completed" in studio_client(runs).get("/train/one").text


@pytest.mark.slow
def test_a_killed_run_reads_as_failed_as_soon_as_it_is_gone(tmp_path):
    """No heartbeat or timeout: the first read after the trainer's death says failed (the kernel frees
    its lock with the process), however loaded the machine is."""
    runs = tmp_path / "runs"
    client = studio_client(runs)
    client.post("/train/start", data={"recipe": str(tiny_recipe(tmp_path, 5000)), "name": "doomed"})
    wait_for(lambda: (runs / "doomed" / "metrics.jsonl").is_file(), 600, "the first metrics row")
    assert jobs.run_state(runs, "doomed", client.app.state.processes).status == "running"
    pid = jobs.read_job(runs, "doomed")["pid"]
    os.kill(pid, signal.SIGKILL)
    client.app.state.processes[pid].wait(timeout=600)  # the process is gone (and reaped)
    state = jobs.run_state(runs, "doomed", client.app.state.processes)
    assert state.status == "failed" and "killed" in state.reason
    assert "killed or crashed" in client.get("/train/doomed").text


def fake_run(runs: Path, name: str, status: str, method: str, value: float) -> None:
    run = runs / name
    run.mkdir(parents=True)
    manifest = {
        "status": status,
        "started_at": f"2026-01-0{int(value)}T00:00:00Z",
        "final_eval": {"eval_loss": value},
    }
    (run / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    recipe = {
        "method": {"name": method},
        "objective": {"name": "sft"},
        "model": {"name_or_path": "tiny:llama"},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")


def test_runs_page_lists_filters_and_sorts_the_index(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "alpha", "completed", "lora", 2.0)
    fake_run(runs, "beta", "completed", "full", 1.0)
    fake_run(runs, "gamma", "running", "lora", 3.0)  # no process holds its lock: it died
    client = studio_client(runs)
    html = client.get("/runs").text
    assert "3 of 3 run(s)" in html
    gamma = html[html.index(">gamma<") :]
    assert gamma.index("failed") < gamma.index("</tr>")  # shown as failed, not running
    html = client.get("/runs", params={"method": "lora"}).text
    assert ">alpha<" in html and ">gamma<" in html and ">beta<" not in html
    html = client.get("/runs", params={"sort": "key_value"}).text
    assert html.index(">beta<") < html.index(">alpha<") < html.index(">gamma<")
    html = client.get("/runs", params={"sort": "key_value", "desc": 1}).text
    assert html.index(">gamma<") < html.index(">alpha<") < html.index(">beta<")
    assert ">beta<" not in client.get("/runs", params={"q": "alp"}).text


@pytest.mark.slow
def test_a_failed_run_resumes_and_stops_as_interrupted(tmp_path):
    runs = tmp_path / "runs"
    client = studio_client(runs)
    procs = client.app.state.processes
    client.post("/train/start", data={"recipe": str(tiny_recipe(tmp_path, 5000)), "name": "again"})
    wait_for(lambda: (runs / "again" / "metrics.jsonl").is_file(), 60, "the first metrics row")
    assert "only a failed or interrupted run" in client.post("/train/again/resume").text  # it is running
    os.kill(jobs.read_job(runs, "again")["pid"], signal.SIGKILL)
    wait_for(lambda: jobs.run_state(runs, "again", procs).status == "failed", 10, "failed")
    response = client.post("/train/again/resume")
    assert response.headers["HX-Redirect"] == "/train/again"
    wait_for(
        lambda: jobs.run_state(runs, "again", procs).status == "running" and jobs.lock_held(runs / "again"),
        60,
        "the resumed run",
    )
    assert "stop sent" in client.post("/train/again/stop").text
    wait_for(lambda: jobs.run_state(runs, "again", procs).status == "interrupted", 30, "interrupted")
    assert "--resume" in " ".join(jobs.read_job(runs, "again")["command"])


def test_a_process_that_exits_before_its_run_exists_shows_its_last_log_line(tmp_path):
    runs = tmp_path / "runs"
    process = jobs.start(runs, "early", ["train", str(tmp_path / "missing.yaml")])
    procs = {process.pid: process}
    state = wait_for(lambda: (s := jobs.run_state(runs, "early", procs)).finished and s, 60, "the exit")
    assert state.status == "failed"
    assert state.reason.startswith("error:") and "missing.yaml" in state.reason  # the CLI's own line


def test_compare_shows_recipe_differences_metrics_and_curves(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "a", "completed", "lora", 2.0)
    fake_run(runs, "b", "completed", "full", 1.0)
    for name, losses in (("a", [3.0, 2.5]), ("b", [3.0, 2.0])):
        rows = [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
        (runs / name / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
        )
    client = studio_client(runs)
    html = client.get("/runs/compare", params=[("run", "a"), ("run", "b")]).text
    diff = html[html.index('id="recipe-diff"') : html.index('id="final-metrics"')]
    assert "method.name" in diff and "<td>lora</td><td>full</td>" in diff
    assert "objective.name" not in diff  # the same in both
    metrics = html[html.index('id="final-metrics"') :]
    assert "<td>2</td><td>1</td>" in metrics  # eval_loss side by side
    assert "<td>2.5</td><td>2</td>" in metrics  # last train loss
    assert 'src="data:image/png;base64,' in html
    refused = client.get("/runs/compare", params=[("run", "a")])
    assert refused.status_code == 400 and "two or more runs" in refused.text


PAYLOAD = {
    "title": "before vs after",
    "n": 8,
    "main_metric": "accuracy",
    "models": [
        {"name": "tiny:llama", "role": "base", "metrics": {"accuracy": 0.25, "loss": 7.0}},
        {"name": "r", "role": "tuned", "metrics": {"accuracy": 0.75, "loss": 6.0}},
    ],
    "comparison": {
        "metric": "accuracy",
        "base": 0.25,
        "tuned": 0.75,
        "delta": 0.5,
        "ci95": [0.125, 0.875],
        "n": 8,
    },
    "confusion_matrices": {
        "r": {"labels": ["neg", "pos"], "columns": ["neg", "pos"], "matrix": [[3, 1], [1, 3]]}
    },
}


def test_eval_section_shows_the_payload_table_ci_and_confusion(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "r", "completed", "lora", 1.0)
    (runs / "r" / "final").mkdir()
    client = studio_client(runs)
    form = client.get("/train/r/eval", params={"part": "form"}).text
    assert 'value="tiny:llama"' in form and 'id="eval-button"' in form  # the recipe's base model
    (runs / "r" / "eval").mkdir()
    (runs / "r" / "eval" / "report.json").write_text(json.dumps(PAYLOAD), encoding="utf-8")
    html = client.get("/train/r/eval").text
    assert "<td>0.25</td><td>0.75</td>" in html
    assert "Δ +0.5000 (95% paired bootstrap CI [+0.1250, +0.8750], n=8)" in html
    assert "Confusion matrix: r" in html and "<td>3</td><td>1</td>" in html
    refused = client.post("/train/nope/eval", data={"base": "tiny:llama", "data": "x"}).text
    assert "only a finished run" in refused


@pytest.mark.slow
def test_before_after_eval_of_a_finished_run(tmp_path):
    runs = tmp_path / "runs"
    client = studio_client(runs)
    client.post("/train/start", data={"recipe": str(tiny_recipe(tmp_path, 2)), "name": "ev"})
    wait_for(lambda: jobs.run_state(runs, "ev", client.app.state.processes).finished, 120, "training")
    data = str(DATA / "tiny_eval.jsonl")
    assert "Evaluating" in client.post("/train/ev/eval", data={"base": "tiny:llama", "data": data}).text
    html = wait_for(lambda: "eval-table" in (t := client.get("/train/ev/eval").text) and t, 180, "the eval")
    assert "tiny:llama (base)" in html and "(tuned)" in html and "95% paired bootstrap CI" in html


PREDICTIONS = [  # base and tuned agree on 0; 1: one right, one wrong; 2: both wrong, different answers
    {
        "index": 0,
        "input": "say hi",
        "reference": "hi",
        "models": {"base": {"answer": "hi", "correct": True}, "tuned": {"answer": "hi", "correct": True}},
    },
    {
        "index": 1,
        "input": "say <bye>",
        "reference": "bye",
        "models": {
            "base": {"answer": "hello", "correct": False},
            "tuned": {"answer": "bye", "correct": True},
        },
    },
    {
        "index": 2,
        "input": "count",
        "reference": "one two",
        "models": {
            "base": {"answer": "three", "correct": False},
            "tuned": {"answer": "four", "correct": False},
        },
    },
]


def fake_page_eval(runs: Path, job_id: str, payload: dict) -> None:
    """What an Evaluate-page eval leaves on disk once done: its request, report and predictions."""
    folder = runs / jobs.STUDIO_DIR / "eval" / "compare"
    (folder / job_id).mkdir(parents=True)
    (folder / job_id / "report.json").write_text(json.dumps(payload), encoding="utf-8")
    predictions = folder / f"{job_id}.predictions.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in PREDICTIONS), encoding="utf-8")
    request = {"base": "tiny:llama", "tuned": "r", "data": "d.jsonl"}
    record = {
        "request": request,
        "report": str(folder / job_id),
        "predictions": str(predictions),
        "started": 1,
    }
    (folder / f"{job_id}.request.json").write_text(json.dumps(record), encoding="utf-8")


def test_eval_page_shows_probes_and_filters_predictions_to_disagreements(tmp_path):
    runs = tmp_path / "runs"
    payload = PAYLOAD | {
        "forgetting": {
            "source": "general",
            "n_texts": 4,
            "n_tokens": 99,
            "base": "tiny:llama",
            "tuned": "r",
            "base_perplexity": 10.0,
            "tuned_perplexity": 12.5,
            "regression": 0.25,
            "regression_pct": 25.0,
            "ci95": [0.1, 0.4],
        },
        "robustness": {
            "metric": "accuracy",
            "seed": 0,
            "clean": {"tiny:llama": 0.25, "r": 0.75},
            "perturbations": {
                "typos": {"tiny:llama": {"value": 0.25, "drop": 0.0}, "r": {"value": 0.5, "drop": 0.25}}
            },
        },
    }
    fake_page_eval(runs, "r-vs-tiny-llama", payload)
    client = studio_client(runs)
    assert "r-vs-tiny-llama" in client.get("/eval").text  # listed among earlier evals
    html = client.get("/eval/r-vs-tiny-llama/result").text
    assert "<td>10</td><td>12.5</td><td>+25.0% (worse)</td><td>[+0.1000, +0.4000]</td>" in html
    assert '<th scope="row">typos</th><td>0.25</td><td>+0.0000</td><td>0.5</td><td>+0.2500</td>' in html
    assert "3 of 3 example(s)" in html and "Only disagreements (2 of 3" in html
    assert "<code>say &lt;bye&gt;</code>" in html  # user text shown as written, escaped
    only = client.get("/eval/r-vs-tiny-llama/result", params={"only": "disagreements"}).text
    assert "2 of 3 example(s), disagreements only" in only
    assert "say hi" not in only and "say &lt;bye&gt;" in only and "<code>count</code>" in only
    assert only.count('class="prediction disagreement"') == 2
    assert "no eval named" in client.get("/eval/nope").text


def test_prediction_rows_put_every_models_answer_and_correctness_side_by_side():
    from tunelab.evaluate.predictions import prediction_rows
    from tunelab.evaluate.run import EvalResult, EvalTask

    chats = [
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        for q, a in (("say hi", "hi"), ("say bye", "bye"))
    ]
    task = EvalTask("lm", "d.jsonl", conversations=chats)  # no labels: exact match judges
    base = EvalResult("tiny:llama", 2, 1.0, 1.0, None, 0.0, None, generations=["hi", "hello"])
    base.per_example = {"exact_match": [1.0, 0.0]}
    tuned = EvalResult("runs/r", 2, 1.0, 1.0, None, 1.0, None, generations=["hi", "bye"])
    tuned.per_example = {"exact_match": [1.0, 1.0]}
    rows = prediction_rows(task, [("base", base), ("tuned", tuned)])
    assert [(r["input"], r["reference"]) for r in rows] == [("say hi", "hi"), ("say bye", "bye")]
    assert rows[1]["models"]["base"] == {
        "name": "tiny:llama",
        "generated": "hello",
        "answer": "hello",
        "correct": False,
    }
    assert rows[1]["models"]["tuned"]["correct"] is True and rows[1]["generated"] == "bye"  # judged: tuned
    assert [disagrees(r) for r in rows] == [False, True]


def test_eval_request_becomes_the_cli_arguments_and_bad_counts_are_refused(tmp_path):
    fields = {
        "base": "tiny:llama",
        "tuned": "runs/r",
        "data": "d.jsonl",
        "max_examples": "5",
        "forgetting": "on",
        "forgetting_n": "8",
        "robustness": "on",
    }
    args = parse_request(fields).args(None, tmp_path / "p.jsonl")
    assert args == [
        "eval",
        "--compare",
        "tiny:llama",
        "runs/r",
        "--data",
        "d.jsonl",
        "--max-examples",
        "5",
        "--forgetting",
        "--forgetting-n",
        "8",
        "--robustness",
        "--predictions",
        str(tmp_path / "p.jsonl"),
    ]
    with pytest.raises(ValueError, match="max examples: 'five' is not a whole number"):
        parse_request(fields | {"max_examples": "five"})
    with pytest.raises(ValueError, match="base model: '--gate=x' starts with '-'"):
        parse_request(fields | {"base": "--gate=x"})
    client = studio_client(tmp_path / "runs")
    refused = client.post("/eval", data=fields | {"forgetting_n": "0"}).text
    assert "general texts: &#39;0&#39; is not a whole number" in refused
    assert not (tmp_path / "runs" / jobs.STUDIO_DIR).exists()  # nothing started


@pytest.mark.slow
def test_evaluate_page_runs_forgetting_robustness_and_lists_predictions(tmp_path):
    runs = tmp_path / "runs"
    client = studio_client(runs)
    client.post("/train/start", data={"recipe": str(tiny_recipe(tmp_path, 2)), "name": "ev"})
    wait_for(lambda: jobs.run_state(runs, "ev", client.app.state.processes).finished, 120, "training")
    assert f'<option value="{runs / "ev"}">finished run</option>' in client.get("/eval").text
    fields = {
        "base": "tiny:llama",
        "tuned": str(runs / "ev"),
        "data": str(DATA / "tiny_eval.jsonl"),
        "max_examples": "4",
        "forgetting": "on",
        "forgetting_n": "4",
        "robustness": "on",
    }
    assert "Evaluating" in client.post("/eval", data=fields).text
    url = "/eval/ev-vs-tiny-llama/result"
    html = wait_for(lambda: "eval-table" in (t := client.get(url).text) and t, 300, "the eval")
    folder = runs / jobs.STUDIO_DIR / "eval" / "compare"
    assert (folder / "ev-vs-tiny-llama" / "report.json").is_file()  # the CLI's own report
    rows = read_prediction_rows(folder / "ev-vs-tiny-llama.predictions.jsonl")
    assert [r["reference"] for r in rows] == [
        "The cow is white.",
        "The cow is blue.",
        *[r["reference"] for r in rows[2:]],
    ]
    assert len(rows) == 4 and "4 of 4 example(s)" in html
    for row in rows:  # each example's input, reference and both answers, as the file has them
        for text in (
            row["input"],
            row["reference"],
            row["models"]["base"]["answer"],
            row["models"]["tuned"]["answer"],
        ):
            assert f"<code>{escape(text)}</code>" in html
    assert "Forgetting: perplexity on general text" in html and "4 texts" in html
    assert all(
        f'<th scope="row">{p}</th>' in html for p in ("clean", "typos", "casing", "whitespace", "distractors")
    )
    only = client.get(url, params={"only": "disagreements"}).text
    n = sum(disagrees(r) for r in rows)
    assert f"{n} of 4 example(s), disagreements only" in only and only.count('class="prediction') == n
    assert "eval-table" in studio_client(runs).get(url).text  # a restarted studio still shows it


def test_stop_never_signals_the_pid_of_a_finished_run(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "done", "completed", "lora", 1.0)
    (runs / jobs.STUDIO_DIR).mkdir()
    # A finished run whose recorded PID is now someone else's (here: this test process).
    (runs / jobs.STUDIO_DIR / "done.json").write_text(json.dumps({"pid": os.getpid()}), encoding="utf-8")
    client = studio_client(runs)
    assert "the run is not running" in client.post("/train/done/stop").text  # and this process lives on
