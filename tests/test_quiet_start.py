"""Issue 26 §5: only tunelab's own words reach the console, and the everyday commands start without the ML stack.

The start-up test runs the commands in one fresh process through the real entry point and reads
``sys.modules`` after each; the timings against the 1 s / 150 MB target are a benchmark
(``benchmarks/cli_startup.py``), not a test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ML_STACK = ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes")

# What the libraries printed on every run (issue 26): bitsandbytes' hub-kernel note on CPUs with
# AVX512-BF16, transformers' length warning for rows tunelab truncates itself, PEFT's deprecation.
LIBRARY_LINES = (
    "Failed to load CPU gemm_4bit_forward",
    "kernels-community",
    "Token indices sequence length is longer than the specified maximum",
    "is_gradient_checkpointing",
    "PiSSA changes the base weights",
    "rank_pattern keys did not match",
)
# Python's warning format (`file.py:12: FutureWarning: ...`) and the libraries' own prefixes.
FOREIGN = re.compile(r"\w+Warning: |^\[(transformers|bitsandbytes|peft|accelerate|datasets)\]", re.MULTILINE)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _env(**extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k != "COLUMNS" and not k.endswith("_VERBOSITY")}
    keep["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    return keep | {"TERM": "dumb"} | extra


# Runs each command in this one process through `tunelab.cli.run`, as `tunelab` would, and records its
# exit code and which of the ML stack's packages were imported by then.
PROBE = """
import json, sys
from tunelab.cli import run
commands, heavy, report = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
seen = []
for argv in commands:
    try:
        run(argv)
        code = 0
    except SystemExit as exit:
        code = exit.code
    seen.append({"argv": argv, "code": code, "imported": [m for m in heavy if m in sys.modules]})
open(report, "w").write(json.dumps(seen))
"""


def _light_commands(tmp_path: Path, qa_rows: list[dict]) -> list[tuple[list[str], int]]:
    """Each command of the issue's list with real inputs, and the exit code that proves it did its work."""
    data = write_jsonl(tmp_path / "train.jsonl", qa_rows * 3)
    recipe = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data), "max_length": 64},
        "method": {"name": "qlora", "r": 4},
        "objective": {"name": "sft"},
        "output": {"dir": str(tmp_path / "runs")},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (tmp_path / "empty.yaml").write_text("")
    run = tmp_path / "runs" / "done"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    manifest = {"run_name": "done", "status": "completed", "started_at": "2025-01-01T00:00:00+00:00"}
    (run / "manifest.json").write_text(json.dumps(manifest | {"final_eval": {"eval_loss": 1.5}}))
    out = tmp_path / "out"
    return [
        (["--help"], 0),
        (["recipe", "check", str(tmp_path / "empty.yaml")], 2),
        (["recipe", "check", str(tmp_path / "recipe.yaml")], 0),
        (["recipe", "show", str(tmp_path / "recipe.yaml"), "--set", "method.r=8"], 0),
        (["runs", "ls", str(tmp_path / "runs")], 0),
        (["runs", "show", str(run)], 0),
        (["data", "audit", str(data)], 0),
        (["data", "clean", str(data), "-o", str(out / "clean.jsonl")], 0),
        (["data", "split", str(data), "-o", str(out / "split")], 0),
        (["data", "convert", str(data), "-o", str(out / "converted.jsonl")], 0),
    ]


def test_everyday_commands_do_not_import_the_ml_stack(tmp_path: Path, qa_rows: list[dict]) -> None:
    """`recipe check` of an empty file took 5-13 s and 580 MB: the recipe schema imported torch, PEFT and
    transformers through the method and objective registries."""
    commands = _light_commands(tmp_path, qa_rows)
    report = tmp_path / "report.json"
    args = [json.dumps([argv for argv, _ in commands]), json.dumps(ML_STACK), str(report)]
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(report.read_text())
    assert [s["code"] for s in seen] == [code for _, code in commands], (done.stdout, done.stderr)
    for step in seen:
        assert step["imported"] == [], f"{' '.join(step['argv'][:2])} imported {step['imported']}"


def test_library_log_noise_is_off_and_real_errors_and_tunelab_warnings_are_not() -> None:
    """bitsandbytes logs its hub-kernel note as a warning at import (only on CPUs with AVX512-BF16, so it
    is replayed here on the logger it uses), and PEFT warns about PiSSA while converting a PiSSA adapter
    as tunelab asks it to; after the entry point's set-up both stay silent while an error from the same
    library, another library warning and tunelab's own logger still reach stderr."""
    script = (
        "import logging\n"
        "from tunelab.console import quiet_libraries\n"
        "quiet_libraries()\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning("
        "'Failed to load CPU gemm_4bit_forward from kernels-community: trust_remote_code')\n"
        "logging.getLogger('peft.tuners').warning('Token indices sequence length is longer than the specified maximum')\n"
        "logging.getLogger('bitsandbytes').error('a real bitsandbytes failure')\n"
        "logging.getLogger('tunelab.serve').warning('a tunelab warning')\n"
        "import warnings\n"
        "warnings.warn('PiSSA changes the base weights of the model and should thus not be used with other "
        "adapters. Consider converting', UserWarning)\n"
        "warnings.warn('The following rank_pattern keys did not match any targeted module or parameter and "
        "were ignored: [x.lora_E]', RuntimeWarning)\n"
        "warnings.warn('another library warning', UserWarning)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert not any(line in done.stderr for line in LIBRARY_LINES), done.stderr
    assert "a real bitsandbytes failure" in done.stderr and "a tunelab warning" in done.stderr
    assert "another library warning" in done.stderr  # filtered by message, never by category


def test_a_users_own_verbosity_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.console import quiet_libraries

    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "info")
    monkeypatch.delenv("DATASETS_VERBOSITY", raising=False)
    quiet_libraries()
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "info" and os.environ["DATASETS_VERBOSITY"] == "error"


def _qlora_runs_here() -> bool:
    try:
        import torch

        from tunelab.methods.qlora import require_4bit

        require_4bit(torch.device("cpu"))
    except (ImportError, RuntimeError):
        return False
    return True


def test_training_on_long_rows_prints_only_tunelabs_words(tmp_path: Path, qa_rows: list[dict]) -> None:
    """A run whose rows are longer than the tokenizer's maximum printed transformers' "Token indices
    sequence length" warning although tunelab truncates them (and says so itself); a QLoRA run (where
    bitsandbytes imports) printed its kernel note. Neither is tunelab's to say."""
    long = [
        {"instruction": "tell me " + "word " * 700, "output": "ok"}
    ] * 3  # > 512, the tiny tokenizer's max
    data = write_jsonl(tmp_path / "train.jsonl", long + qa_rows)
    method = "qlora" if _qlora_runs_here() else "lora"
    recipe = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(data), "max_length": 64},
        "method": {"name": method, "r": 4},
        "training": {"max_steps": 1, "batch_size": 3},
        "output": {"dir": str(tmp_path / "runs"), "name": "long"},
    }
    (tmp_path / "long.yaml").write_text(yaml.safe_dump(recipe))
    done = subprocess.run(
        [sys.executable, "-m", "tunelab", "train", str(tmp_path / "long.yaml")],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert not any(line in done.stderr for line in LIBRARY_LINES), done.stderr
    assert not FOREIGN.search(done.stderr), done.stderr
    assert "pre-flight:" in done.stderr and "truncation" in done.stderr  # tunelab's own warning stays
