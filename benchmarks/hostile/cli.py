"""Hostile cases for recipes, ``train``, ``runs`` and ``export`` (issue 26, section 4).

Each case is the user's command as the issue reproduced it (``python -m tunelab ...`` in a scratch
folder, no terminal) and the verdict the issue asks for: one ``error:`` line and exit 2 (4 for a
diverged run), nothing written or deleted that is not tunelab's. The export cases share one tiny
finished run, trained on first use.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from hostile import REPO, Case, Outcome, Ran, refused, tunelab

AREA = "cli"
ROWS = [("Say hi", "hi there"), ("Count to three", "one two three"), ("Name a colour", "blue")] * 2
RECIPE = """model: {name_or_path: 'tiny:llama'}
data: {train: train.jsonl, max_length: 64}
method: {name: lora, r: 4}
training: {max_steps: 2, batch_size: 3, learning_rate: 0.01, warmup_steps: 0}
output: {dir: runs}
"""


def _recipe(scratch: Path, text: str = RECIPE, name: str = "r.yaml") -> Path:
    (scratch / "train.jsonl").write_text(
        "".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in ROWS)
    )
    path = scratch / name
    path.write_text(text)
    return path


def _also(outcome: Outcome, broken: str | None, verdict: str = "loss") -> Outcome:
    """A refusal that also left something behind is not ok."""
    return Outcome(verdict, broken) if outcome.verdict == "ok" and broken else outcome


_RUN: dict[str, Path] = {}


def _finished_run() -> Path:
    """One tiny LoRA run, trained once for every export case (kept until the probe exits)."""
    if "run" not in _RUN:
        root = Path(tempfile.mkdtemp(prefix="hostile-cli-run-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        ran = tunelab("train", str(_recipe(root)), cwd=root)
        if ran.code != 0:
            raise RuntimeError(f"the shared run did not train: {ran.err.strip()[-200:]}")
        _RUN["run"] = root / "runs" / "r"
    return _RUN["run"]


def set_value_not_yaml(scratch: Path) -> Outcome:
    ran = tunelab("recipe", "show", "--set", "training.epochs=[1,2", str(_recipe(scratch)), cwd=scratch)
    return refused(ran, mentions=("--set training.epochs", "is not a YAML value"))


def learning_rate_inf(scratch: Path) -> Outcome:
    ran = tunelab("train", str(_recipe(scratch)), "--set", "training.learning_rate=1e999", cwd=scratch)
    return _also(
        refused(ran, mentions=("training.learning_rate", "not a finite number")),
        (scratch / "runs").exists() and "a run directory was made",
    )


def duplicate_yaml_key(scratch: Path) -> Outcome:
    recipe = _recipe(scratch, RECIPE + "training: {max_steps: 500}\n")
    return refused(
        tunelab("recipe", "check", str(recipe), cwd=scratch), mentions=("key 'training' is given twice",)
    )


def output_dir_is_a_file(scratch: Path) -> Outcome:
    (scratch / "runs").write_text("my notes\n")
    recipe = _recipe(scratch)
    checked = refused(
        tunelab("recipe", "check", str(recipe), cwd=scratch), mentions=("output.dir", "is a file")
    )
    if checked.verdict != "ok":
        return checked
    trained = refused(tunelab("train", str(recipe), cwd=scratch), mentions=("output.dir", "is a file"))
    return _also(trained, (scratch / "runs").read_text() != "my notes\n" and "the file was changed")


def resume_a_file(scratch: Path) -> Outcome:
    (scratch / "notes.txt").write_text("x")
    return refused(
        tunelab("train", "--resume", "notes.txt", cwd=scratch), mentions=("notes.txt", "is a file")
    )


def resume_a_folder_without_a_run(scratch: Path) -> Outcome:
    folder = scratch / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"jpg")
    ran = tunelab("train", "--resume", "photos", cwd=scratch)
    outcome = refused(ran, mentions=("not a tunelab run directory",))
    if "No such file" in ran.err:
        return Outcome("silent", "names a missing recipe.yaml instead of saying what the folder is")
    return _also(outcome, [p.name for p in folder.iterdir()] != ["a.jpg"] and "wrote into the folder")


def dpo_on_instruction_data(scratch: Path) -> Outcome:
    recipe = _recipe(scratch, RECIPE + "objective: {name: dpo}\n")
    return refused(
        tunelab("recipe", "check", str(recipe), cwd=scratch), mentions=("objective dpo", "preference")
    )


_TRAINER = """
import sys, time
from tunelab.runs.rundir import RunDir
run = RunDir.create(sys.argv[1], "killed", lock=True)
run.write_manifest({"run_name": "killed", "status": "running", "started_at": "2025-01-01T00:00:00+00:00"})
print("training", flush=True)
time.sleep(600)
"""


def sigkilled_run_is_not_running(scratch: Path) -> Outcome:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, str(scratch / "runs")], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        trainer.stdout.readline()
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    listed = tunelab("runs", "ls", "runs", "--json", cwd=scratch)
    shown = tunelab("runs", "show", "killed", cwd=scratch)
    if "Traceback" in listed.err + shown.err:
        return Outcome("traceback", (listed.err + shown.err).strip().splitlines()[-1][:160])
    status = [r["status"] for r in json.loads(listed.out)]
    if status != ["failed"] or "running" in shown.out:
        return Outcome("silent", f"runs ls says {status}; runs show says running: {'running' in shown.out}")
    return Outcome("ok", "runs ls and runs show: failed (killed or crashed)")


def diverging_run_fails(scratch: Path) -> Outcome:
    sets = [
        "training.learning_rate=1e30",
        "training.max_grad_norm=null",
        "training.max_steps=4",
        "training.save_every=1",
    ]
    ran = tunelab("train", str(_recipe(scratch)), *[x for s in sets for x in ("--set", s)], cwd=scratch)
    if "Traceback" in ran.err:
        return Outcome("traceback", ran.err.strip().splitlines()[-1][:160])
    last = ran.err.strip().splitlines()[-1] if ran.err.strip() else ""
    if ran.code != 4 or not last.startswith("error: diverged: loss nan at step"):
        return Outcome("silent", f"exit {ran.code}: {last[:160]}")
    if (scratch / "runs" / "r" / "final").exists():
        return Outcome("silent", "a diverged run wrote final/")
    status = [r["status"] for r in json.loads(tunelab("runs", "ls", "runs", "--json", cwd=scratch).out)]
    return Outcome("ok", last[:160]) if status == ["failed"] else Outcome("silent", f"runs ls says {status}")


def export_out_help(scratch: Path) -> Outcome:
    ran = tunelab("export", str(_finished_run()), "--merge", "--no-verify", "--out", "--help", cwd=scratch)
    return _also(
        refused(ran, mentions=("looks like an option",)),
        (scratch / "--help").exists() and "./--help was created",
        "silent",
    )


def export_verify_data_unreadable(scratch: Path) -> Outcome:
    (scratch / "held.jsonl").write_bytes(b"\xff\xfe not json\n")
    ran = tunelab(
        "export",
        str(_finished_run()),
        "--adapter",
        "--verify-data",
        "held.jsonl",
        "--out",
        "exp",
        cwd=scratch,
    )
    return _also(
        refused(ran, mentions=("held.jsonl",)),
        (scratch / "exp").exists() and "an unverified export was left",
        "silent",
    )


def export_overwrite_unrelated(scratch: Path) -> Outcome:
    (scratch / "thesis").mkdir()
    (scratch / "thesis" / "chapter1.tex").write_text("years of work")
    ran = tunelab(
        "export",
        str(_finished_run()),
        "--adapter",
        "--no-verify",
        "--overwrite",
        "--out",
        "thesis",
        cwd=scratch,
    )
    intact = (scratch / "thesis" / "chapter1.tex").is_file()
    return _also(refused(ran, mentions=("not a tunelab export",)), not intact and "chapter1.tex was deleted")


def export_under_a_file(scratch: Path) -> Outcome:
    (scratch / "afile").write_text("x")
    ran = tunelab(
        "export", str(_finished_run()), "--adapter", "--no-verify", "--out", "afile/out", cwd=scratch
    )
    outcome = refused(ran, mentions=("afile is a file, not a folder",))
    return _also(outcome, ".tmp" in ran.err and "names the hidden temporary", "silent")


def export_deleted_adapter(scratch: Path) -> Outcome:
    run = scratch / "copy"
    shutil.copytree(_finished_run(), run)
    (run / "final" / "adapter_model.safetensors").unlink()
    ran = tunelab("export", "copy", "--merge", "--no-verify", "--out", "out", cwd=scratch)
    return _also(
        refused(ran, mentions=("adapter_model.safetensors is missing",)), "Repo id" in ran.err and "vague"
    )


def help_in_a_pipe(scratch: Path) -> Outcome:
    ran: Ran = tunelab("data", "synth", "--help", cwd=scratch)
    if ran.code != 0 or "Traceback" in ran.err:
        return Outcome("traceback" if "Traceback" in ran.err else "silent", f"exit {ran.code}")
    if "…" in ran.out or "--prompts-per-round" not in ran.out:
        return Outcome("silent", "option names are cut in a pipe")
    return Outcome("ok", "every option name whole, one line each")


CASES = [
    Case(AREA, "recipe show --set 'training.epochs=[1,2'", set_value_not_yaml),
    Case(AREA, "train learning_rate=1e999", learning_rate_inf),
    Case(AREA, "recipe with a duplicate key", duplicate_yaml_key),
    Case(AREA, "output.dir is a file (check, train)", output_dir_is_a_file),
    Case(AREA, "train --resume FILE", resume_a_file),
    Case(AREA, "train --resume DIR without a run", resume_a_folder_without_a_run),
    Case(AREA, "recipe check: dpo on instruction data", dpo_on_instruction_data),
    Case(AREA, "runs ls/show of a SIGKILLed run", sigkilled_run_is_not_running),
    Case(AREA, "train that diverges (lr 1e30)", diverging_run_fails),
    Case(AREA, "export --out --help", export_out_help),
    Case(AREA, "export --verify-data unreadable", export_verify_data_unreadable),
    Case(AREA, "export --overwrite an unrelated folder", export_overwrite_unrelated),
    Case(AREA, "export --out under a file", export_under_a_file),
    Case(AREA, "export of a run without its adapter", export_deleted_adapter),
    Case(AREA, "--help in a pipe", help_in_a_pipe),
]
