"""Issue 26 §4, recipe / train / runs / export: the last tracebacks, silent successes and losses.

Each test runs the real `tunelab` app (typer's runner, or a subprocess where the terminal matters) on
one hostile input and checks what a user sees: exit 2 (4 for a diverged run) with one `error:` line
that names the thing to fix, and nothing written, changed or deleted that should not be.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from tunelab.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
PLAIN = {"COLUMNS": None}
QA = [("Say hi", "hi there"), ("Count to three", "one two three"), ("Name a colour", "blue")] * 2


def invoke(*args: str):
    return runner.invoke(app, list(args), env=PLAIN)


def one_error(res, code: int = 2, *, after_progress: bool = False) -> str:
    """The single `error:` line of a refused command (exit ``code``, no traceback); ``after_progress``:
    the run printed its progress lines first, and the error is the last line."""
    assert res.exit_code == code, (res.exit_code, res.output)
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    lines = res.stderr.rstrip("\n").split("\n")
    errors = [line for line in lines if line.startswith(("error: ", "bad "))]
    assert errors == lines[-1:] and (after_progress or len(lines) == 1), res.stderr
    return lines[-1]


def write_recipe(tmp_path: Path, name: str = "r.yaml", text: str | None = None, **sections: object) -> Path:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA))
    raw = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data), "max_length": 64},
        "method": {"name": "lora", "r": 4},
        "training": {"max_steps": 2, "batch_size": 3, "learning_rate": 1e-2, "warmup_steps": 0},
        "output": {"dir": str(tmp_path / "runs")},
        **sections,
    }
    path = tmp_path / name
    path.write_text(text if text is not None else yaml.safe_dump(raw, sort_keys=False))
    return path


# ---- recipe ------------------------------------------------------------------------------------------


def test_a_set_value_that_is_not_yaml_is_one_line(tmp_path):
    recipe = write_recipe(tmp_path)
    line = one_error(invoke("recipe", "show", "--set", "training.epochs=[1,2", str(recipe)))
    assert line.startswith(f"error: {recipe}: --set training.epochs: '[1,2' is not a YAML value")


@pytest.mark.parametrize(
    "override",
    [
        "training.learning_rate=1e999",
        "training.learning_rate=.nan",
        "training.max_grad_norm=.inf",
        "training.lr_multipliers={embeddings: .inf}",
        "method.alpha=-.inf",
    ],
)
def test_non_finite_settings_are_refused(tmp_path, override):
    """`learning_rate: 1e999` is inf: it trained to a NaN loss and a run called completed."""
    recipe = write_recipe(tmp_path)
    field = override.split("=")[0]
    line = one_error(invoke("recipe", "show", "--set", override, str(recipe)))
    assert f"{field}" in line and "is not a finite number" in line, line
    one_error(invoke("train", str(recipe), "--set", override))
    assert not (tmp_path / "runs").exists()


def test_an_objective_setting_that_is_not_finite_is_refused(tmp_path):
    recipe = write_recipe(tmp_path)
    line = one_error(
        invoke("recipe", "show", "--set", "objective.name=dpo", "--set", "objective.beta=.inf", str(recipe))
    )
    assert "objective.beta: inf is not a finite number" in line


def test_a_duplicate_key_is_refused_naming_both_lines(tmp_path):
    recipe = write_recipe(tmp_path)
    text = recipe.read_text() + "training:\n  max_steps: 5\n"
    recipe.write_text(text)
    second = text.count("\n") - 1  # the line of the second `training:`
    first = text.splitlines().index("training:") + 1
    line = one_error(invoke("recipe", "check", str(recipe)))
    assert (
        f"line {second}: not valid YAML: key 'training' is given twice (also on line {first}); keep one"
        in line
    )


def test_a_yaml_merge_key_is_no_duplicate(tmp_path):
    text = (
        write_recipe(tmp_path)
        .read_text()
        .replace("model:\n", "base: &base\n  dtype: auto\nmodel:\n  <<: *base\n")
    )
    recipe = write_recipe(tmp_path, "merge.yaml", text=text.replace("base: &base", "x-base: &base"))
    res = invoke("recipe", "check", str(recipe))
    assert "given twice" not in res.output


def test_output_dir_that_is_a_file_is_refused_by_check_and_train(tmp_path):
    blocker = tmp_path / "runs-file"
    blocker.write_text("mine\n")
    recipe = write_recipe(tmp_path, output={"dir": str(blocker)})
    checked = one_error(invoke("recipe", "check", str(recipe)))
    assert f"output.dir: {blocker}: {blocker} is a file, not a folder" in checked
    trained = one_error(invoke("train", str(recipe)))
    assert trained.startswith(f"error: {recipe}: output.dir:")
    assert blocker.read_text() == "mine\n"


def test_recipe_check_refuses_an_objective_the_data_cannot_train(tmp_path):
    recipe = write_recipe(tmp_path, objective={"name": "dpo"})
    line = one_error(invoke("recipe", "check", str(recipe)))
    assert "data.train:" in line and "holds instruction data, but objective dpo trains on preference" in line
    assert "an objective for instruction data: grpo, ppo, sft" in line
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    good = write_recipe(
        tmp_path, "good.yaml", data={"train": str(pairs), "max_length": 64}, objective={"name": "dpo"}
    )
    assert invoke("recipe", "check", str(good)).exit_code == 0


def test_every_objective_says_which_data_it_trains_on():
    from tunelab.data.formats import KIND
    from tunelab.objectives import OBJECTIVES

    for name in OBJECTIVES.names():
        kinds = OBJECTIVES.get(name).impl.data_kinds
        assert kinds and set(kinds) <= set(KIND.values()), name


# ---- train --resume ----------------------------------------------------------------------------------


def test_resume_of_a_file_or_a_folder_without_a_run_says_what_it_is(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    assert "is a file; --resume takes a run directory" in one_error(invoke("train", "--resume", str(file)))
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"jpg")
    line = one_error(invoke("train", "--resume", str(folder)))
    assert "not a tunelab run directory (no recipe.yaml in it)" in line and "No such file" not in line
    assert sorted(p.name for p in folder.iterdir()) == ["a.jpg"], "resume wrote into a folder not its own"


# ---- runs: the state of a killed run --------------------------------------------------------------

_TRAINER = """
import json, sys, time
from pathlib import Path
from tunelab.runs.rundir import RunDir
run = RunDir.create(sys.argv[1], "killed", lock=True)
run.write_manifest({"run_name": "killed", "status": "running", "started_at": "2025-01-01T00:00:00+00:00"})
print("training", flush=True)
time.sleep(600)
"""


def test_runs_ls_and_show_say_failed_for_a_sigkilled_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    trainer = subprocess.Popen(
        [sys.executable, "-c", _TRAINER, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert trainer.stdout.readline().strip() == "training"
        alive = json.loads(invoke("runs", "ls", str(tmp_path), "--json").stdout)
        assert [r["status"] for r in alive] == ["running"]
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    dead = json.loads(invoke("runs", "ls", str(tmp_path), "--json").stdout)
    assert [r["status"] for r in dead] == ["failed"], "a SIGKILLed run is listed as running"
    shown = invoke("runs", "show", "killed", "--root", str(tmp_path)).stdout
    assert "failed" in shown and "killed or crashed" in shown and "running" not in shown

    from tunelab.studio import jobs

    assert jobs.run_state(tmp_path, "killed").status == "failed"  # the studio reads the same function


# ---- training that diverges ------------------------------------------------------------------------


def _nan(value):
    import torch

    return value * torch.tensor(float("nan"))


def test_a_diverged_run_stops_as_failed_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    from tunelab.objectives.sft import SftObjective

    real, calls = SftObjective.loss, []

    def loss(self, model, batch):  # one micro-batch a step here: the third step's loss is NaN
        out = real(self, model, batch)
        calls.append(1)
        if len(calls) >= 3:
            out.loss_sum = _nan(out.loss_sum)
        return out

    monkeypatch.setattr(SftObjective, "loss", loss)
    recipe = write_recipe(
        tmp_path, training={"max_steps": 5, "batch_size": 3, "save_every": 1, "warmup_steps": 0}
    )
    line = one_error(invoke("train", str(recipe)), code=4, after_progress=True)
    run = tmp_path / "runs" / "r"
    assert line == (
        f"error: diverged: loss nan at step 3; the run stopped without writing final/ and the last good "
        f"checkpoint is {run / 'checkpoints' / 'step-2'}. Lower training.learning_rate (or clip with "
        "training.max_grad_norm) and train again"
    )
    assert not (run / "final").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and "loss nan at step 3" in manifest["error"]
    listed = json.loads(invoke("runs", "ls", str(tmp_path / "runs"), "--json").stdout)
    assert [r["status"] for r in listed] == ["failed"]
    logged = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(logged) == 2, "a NaN step was logged as trained"


def test_an_online_run_that_diverges_stops_too(tmp_path, monkeypatch):
    from tunelab.recipe import parse_recipe
    from tunelab.train import rl
    from tunelab.train.common import DivergedError
    from tunelab.train.run import train

    real = rl.OnlineTrainer.minibatch_loss

    def minibatch_loss(self, *args, **kwargs):  # NaN from the second rollout step on
        loss, stats = real(self, *args, **kwargs)
        return (_nan(loss) if self.state.step >= 1 else loss), stats

    monkeypatch.setattr(rl.OnlineTrainer, "minibatch_loss", minibatch_loss)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in QA))
    recipe = parse_recipe(
        {
            "model": {"name_or_path": "tiny:llama"},
            "data": {"train": str(data), "max_length": 64},
            "method": {"name": "lora", "r": 4},
            "objective": {
                "name": "grpo",
                "reward": f"{REPO / 'recipes' / 'rewards.py'}:letter_share",
                "max_new_tokens": 4,
                "num_generations": 2,
            },
            "training": {"max_steps": 3, "batch_size": 2, "save_every": 1, "warmup_steps": 0},
            "output": {"dir": str(tmp_path / "runs"), "name": "rl"},
        }
    )
    with pytest.raises(DivergedError, match="loss nan at step 2") as info:
        train(recipe, console=Console(quiet=True))
    run = tmp_path / "runs" / "rl"
    assert info.value.checkpoint == run / "checkpoints" / "step-1"
    assert not (run / "final").exists()
    assert json.loads((run / "manifest.json").read_text())["status"] == "failed"


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    import torch

    from tunelab.runs.rundir import RunDir
    from tunelab.train.common import DivergedError, check_finite_weights

    run = RunDir.create(tmp_path, "w")
    model = torch.nn.Linear(2, 2)
    check_finite_weights(run, model, 1)  # finite: no error
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    with pytest.raises(DivergedError, match="non-finite weights after the update at step 2"):
        check_finite_weights(run, model, 2)
    model.weight.requires_grad_(False)  # frozen weights are the base's, not this run's to judge
    check_finite_weights(run, model, 3)


# ---- outputs that cannot be written ----------------------------------------------------------------


def test_an_output_that_cannot_be_created_is_named_as_given(tmp_path, monkeypatch):
    from tunelab.runs import atomic

    def refuse(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    target = tmp_path / "exports" / "model"
    (tmp_path / "exports").mkdir()
    monkeypatch.setattr(atomic.os, "mkdir", refuse)  # a read-only disk, or a folder of another user
    with pytest.raises(atomic.OutputPathError) as info, atomic.atomic_directory(target):
        pass
    assert str(info.value) == f"cannot write {target}: Permission denied; choose another place for it"
    assert ".tmp" not in str(info.value)
    assert isinstance(info.value, ValueError) and info.value.filename == str(target)


def test_a_parent_that_is_a_file_is_named(tmp_path):
    from tunelab.runs.atomic import OutputPathError, atomic_write_text

    (tmp_path / "notes").write_text("x")
    with pytest.raises(OutputPathError, match=f"{tmp_path / 'notes'} is a file, not a folder"):
        atomic_write_text(tmp_path / "notes" / "deeper" / "out.json", "{}")


# ---- export ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from tunelab.recipe import load_recipe
    from tunelab.train.run import train

    root = tmp_path_factory.mktemp("run")
    recipe = write_recipe(root)
    return train(load_recipe(recipe), console=Console(quiet=True)).run_dir


def test_export_to_an_option_like_path_is_refused(finished_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = one_error(invoke("export", str(finished_run), "--merge", "--no-verify", "--out", "--help"))
    assert "starts with '-', so it looks like an option" in line
    assert list(tmp_path.iterdir()) == []

    from tunelab.studio.export_page import start_export
    from tunelab.studio.roots import Roots

    roots = Roots(finished_run.parent, [tmp_path])
    with pytest.raises(ValueError, match="looks like an option"):
        start_export(
            finished_run.parent, {}, {"run": finished_run.name, "kind": "merged", "out": "--help"}, roots
        )
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_verify_data_writes_no_export(finished_run, tmp_path):
    garbage = tmp_path / "held.jsonl"
    garbage.write_bytes(b"\xff\xfe not json\n")
    out = tmp_path / "export"
    line = one_error(
        invoke("export", str(finished_run), "--adapter", "--verify-data", str(garbage), "--out", str(out))
    )
    assert str(garbage) in line
    assert not out.exists(), "a refused export left files that block the rerun"


def test_overwrite_replaces_only_an_earlier_export(finished_run, tmp_path):
    unrelated = tmp_path / "thesis"
    unrelated.mkdir()
    (unrelated / "chapter1.tex").write_text("years of work")
    line = one_error(
        invoke(
            "export", str(finished_run), "--adapter", "--no-verify", "--overwrite", "--out", str(unrelated)
        )
    )
    assert "is not a tunelab export (no tunelab_export.json in it)" in line
    assert (unrelated / "chapter1.tex").read_text() == "years of work"
    earlier = tmp_path / "earlier"
    for _ in range(2):  # the second replaces the first: an export tunelab wrote
        res = invoke(
            "export", str(finished_run), "--adapter", "--no-verify", "--overwrite", "--out", str(earlier)
        )
        assert res.exit_code == 0, res.output
    assert (earlier / "tunelab_export.json").is_file()


def test_export_of_a_run_whose_adapter_was_deleted_names_the_file(finished_run, tmp_path):
    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    (run / "final" / "adapter_model.safetensors").unlink()
    line = one_error(invoke("export", str(run), "--merge", "--no-verify", "--out", str(tmp_path / "out")))
    assert "adapter_model.safetensors is missing" in line and "Repo id" not in line
    assert not (tmp_path / "out").exists()


def test_export_under_a_file_names_the_file(finished_run, tmp_path):
    (tmp_path / "afile").write_text("x")
    line = one_error(
        invoke(
            "export", str(finished_run), "--adapter", "--no-verify", "--out", str(tmp_path / "afile" / "out")
        )
    )
    assert f"{tmp_path / 'afile'} is a file, not a folder" in line and ".tmp" not in line


# ---- --help read by a program --------------------------------------------------------------------


def test_help_in_a_pipe_keeps_every_option_name_whole_and_unwrapped():
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {
        "TERM": "dumb",
        "PYTHONPATH": str(REPO / "src"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "tunelab", "data", "synth", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "--prompts-per-round" in done.stdout and "…" not in done.stdout
    # a long help text stays on its option's line: nothing is hard-wrapped for a program to rejoin
    model = next(line for line in done.stdout.splitlines() if line.strip().startswith("--model"))
    assert model.rstrip().endswith("(default: the first it lists).")
