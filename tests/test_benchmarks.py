"""benchmarks/gpu_sft.py, the SFT contender table of issues 8 and 20.

The fast tests drive its pieces in this process: the measured window and warm-up, the per-contender
subprocess (its JSON row, a crash, a timeout that kills the whole process group), a lever the
recipe does not know being a row, the mode defaults and the SmolLM2 shape. The slow ones run the
script itself: `--dry-run` (every contender, tiny shape, CPU) and `--plan-check --dry-run`. The
`gpu` one runs every installed contender on CUDA and needs every row to be ok.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from repo_state import REPO

SCRIPT = REPO / "benchmarks" / "gpu_sft.py"
ENV = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
# rows a CPU dry run may show besides "ok": a package this machine lacks, a GPU-only contender, a
# lever not merged yet, or one tunelab refuses on CPU with its reason
NOT_RUN = ("not installed", "needs a GPU", "recipe rejects it", "refused")


def load_gpu_sft():
    spec = importlib.util.spec_from_file_location("gpu_sft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_sft = load_gpu_sft()


def tiny_args(**changes) -> argparse.Namespace:
    args = gpu_sft.parse_args(["--dry-run"])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def test_window_rate_counts_the_window_and_the_warm_up():
    # step 1 took 5 s (compilation), then 1 s a step with 100 real tokens each
    out = gpu_sft.window_rate([5.0, 6.0, 7.0, 8.0], [100, 100, 100, 100], first=2)
    assert out["tokens_per_s"] == pytest.approx(100.0)
    assert out["warmup_s"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least 6 steps"):
        gpu_sft.window_rate([1.0, 2.0], [1, 1], first=6)


def test_run_child_reads_the_last_json_line_and_reports_a_crash(tmp_path: Path):
    ok = [
        sys.executable,
        "-c",
        'print(\'{"status": "x"}\'); print(\'noise\'); print(\'{"status": "ok", "v": 2}\')',
    ]
    log = tmp_path / "ok.log"
    assert gpu_sft.run_child(ok, timeout=60, env=ENV, log=log) == {"status": "ok", "v": 2}
    assert "noise" in log.read_text()
    crash = [sys.executable, "-c", "import sys; sys.exit('boom at load')"]
    row = gpu_sft.run_child(crash, timeout=60, env=ENV)
    assert row["status"].startswith("crashed (exit 1)") and "boom at load" in row["status"]


def test_run_child_timeout_is_a_row_and_kills_the_process_group(tmp_path: Path):
    # the child starts a grandchild (as torch.compile workers would) and hangs
    hang = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    log = tmp_path / "hang.log"
    start = time.monotonic()
    row = gpu_sft.run_child([sys.executable, "-c", hang], timeout=3, env=ENV, log=log)
    assert row == {"status": "timed out after 3 s"}
    assert time.monotonic() - start < 30
    grandchild = int(log.read_text().split("--- stdout\n")[1].split()[0])
    for _ in range(50):  # reaped by init once its killed parent is gone
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} survived the timeout")
    # a child that printed its row and then hangs on exit measured fine: the row stands
    slow_exit = [
        sys.executable,
        "-c",
        'import time; print(\'{"status": "ok"}\', flush=True); time.sleep(120)',
    ]
    assert gpu_sft.run_child(slow_exit, timeout=3, env=ENV) == {"status": "ok"}


def test_a_lever_the_recipe_rejects_is_a_row_not_a_crash(tmp_path: Path):
    args = tiny_args(tunelab_set=["training.no_such_lever=true"])
    row = gpu_sft.run_tunelab(tmp_path, args, name="tunelab-ckpt2")
    assert row["status"].startswith("recipe rejects it: ")
    assert "training.no_such_lever: unknown key" in row["status"]
    assert row["overrides"] == ["training.checkpoint_every=2", "training.no_such_lever=true"]
    assert not (tmp_path / "runs").exists()  # nothing trained


def test_plan_check_applies_the_levers_to_the_plan_and_the_run(tmp_path: Path):
    args = tiny_args(tunelab_set=["training.no_such_lever=true"])
    assert gpu_sft.plan_check(tmp_path, args)["status"].startswith("recipe rejects it: ")
    rows = (tmp_path / "full_length.jsonl").read_text().splitlines()
    lengths = [len(json.loads(r)["text"].split()) for r in rows]
    assert len(rows) == args.micro_batch * (args.steps + 1)
    assert min(lengths) >= args.max_length - 64 and max(lengths) < args.max_length


def test_every_tunelab_contender_is_a_valid_recipe_with_its_levers(tmp_path: Path):
    """Each lever row parses into a recipe whose fields say what the row's name claims."""
    assert set(gpu_sft.LEVERS) <= set(gpu_sft.CONTENDERS)
    from tunelab.recipe import parse_recipe

    base = {
        "model": {"name_or_path": "tiny:llama"},
        "data": {"train": str(tmp_path / "t.jsonl"), "template": "chatml"},
        "method": {"name": "lora"},
        "training": {"gradient_checkpointing": True},
    }
    recipes = {name: parse_recipe(base, overrides=gpu_sft.lever_overrides(name)) for name in gpu_sft.LEVERS}
    plain = recipes["tunelab-plain"]
    assert (plain.model.attention, plain.data.packing, plain.training.kernels) == ("sdpa", False, "none")
    assert recipes["tunelab"].model.attention == "auto" and recipes["tunelab"].data.packing == "auto"
    assert (recipes["tunelab-packed"].model.attention, recipes["tunelab-packed"].data.packing) == (
        "varlen",
        True,
    )
    assert (
        recipes["tunelab-liger"].training.kernels == "liger"
        and recipes["tunelab-liger"].data.packing is False
    )
    assert (
        recipes["tunelab-compile"].training.compile and recipes["tunelab-compile"].model.attention == "sdpa"
    )
    assert recipes["tunelab-fast"].training.compile and recipes["tunelab-fast"].training.kernels == "auto"
    assert recipes["tunelab-ckpt2"].training.checkpoint_every == 2


@pytest.mark.skipif(importlib.util.find_spec("unsloth") is not None, reason="unsloth is installed here")
def test_unsloth_missing_is_a_row(tmp_path: Path):
    assert gpu_sft.run_unsloth(tmp_path, tiny_args()) == {"status": "not installed (unsloth)"}


def test_gpu_only_contenders_are_rows_on_cpu(tmp_path: Path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda n, *a: object() if n in ("unsloth", "liger_kernel") else real(n, *a),
    )
    assert gpu_sft.run_unsloth(tmp_path, tiny_args())["status"].startswith("needs a GPU")
    assert gpu_sft.run_trl(tmp_path, tiny_args(), best=True)["status"].startswith("needs a GPU")


def test_modes_fill_unset_sizes_and_flags_win():
    cpu = gpu_sft.parse_args(["--cpu-shape", "smollm2"])
    assert (cpu.shape, cpu.device, cpu.contenders) == ("smollm2", "cpu", "trl-default,tunelab,tunelab-packed")
    assert (cpu.steps, cpu.measure_from, cpu.micro_batch, cpu.max_length) == (10, 3, 4, 256)
    mine = gpu_sft.parse_args(["--cpu-shape", "smollm2", "--steps", "5", "--contenders", "tunelab"])
    assert (mine.steps, mine.contenders) == (5, "tunelab")
    gpu = gpu_sft.parse_args([])
    assert (gpu.shape, gpu.device, gpu.steps, gpu.micro_batch) == ("1b", "cuda", 35, 8)
    assert gpu.contenders.split(",") == list(gpu_sft.CONTENDERS)
    assert gpu_sft.parse_args(["--dry-run"]).shape == "tiny"


def test_smollm2_shape_has_smollm2s_parameter_count():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**gpu_sft.SHAPES["smollm2"]))
    # SmolLM2-135M: 134,515,008 parameters (tied embeddings)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_contender_table_shows_ratios_warm_up_and_statuses():
    from rich.console import Console

    rows = {
        "trl-default": {"status": "ok", "tokens_per_s": 1000.0, "warmup_s": 1.25, "peak_bytes": 2**31},
        "tunelab": {"status": "ok", "tokens_per_s": 3000.0, "warmup_s": 0.5, "peak_bytes": 2**30},
        "tunelab-compile": {"status": "recipe rejects it: recipe: training.compile: unknown key"},
        "unsloth": {"status": "timed out after 600 s"},
    }
    console = Console(width=400, record=True)
    console.print(gpu_sft.contender_table(rows, tiny_args(), tflops=None))
    text = console.export_text()
    tunelab = next(line for line in text.splitlines() if "│ tunelab " in line)
    assert "3,000" in tunelab and "3.00" in tunelab and "1.00" in tunelab and "0.5" in tunelab
    assert "training.compile: unknown key" in text and "timed out after 600 s" in text


def run_script(*flags: str, tmp_path: Path, timeout: int) -> dict:
    out = tmp_path / "rows.json"
    cmd = [sys.executable, str(SCRIPT), *flags, "--json", str(out), "--workdir", str(tmp_path / "w")]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_dry_run_gives_every_contender_a_row(tmp_path: Path):
    result = run_script("--dry-run", tmp_path=tmp_path, timeout=1200)
    rows = result["rows"]
    assert list(rows) == list(gpu_sft.CONTENDERS)
    for name in ("trl-default", "tunelab"):
        assert rows[name]["status"] == "ok" and rows[name]["tokens_per_s"] > 0, rows[name]
    for name, row in rows.items():
        assert row["status"] == "ok" or row["status"].startswith(NOT_RUN), (name, row)


@pytest.mark.slow
def test_plan_check_dry_run_predicts_a_peak(tmp_path: Path):
    result = run_script("--plan-check", "--dry-run", tmp_path=tmp_path, timeout=600)
    (row,) = result["rows"].values()
    assert row["status"] == "ok" and row["predicted_bytes"] > 0, row


@pytest.mark.gpu
@pytest.mark.slow
def test_every_installed_contender_runs_on_cuda(tmp_path: Path):
    flags = ["--shape", "tiny", "--steps", "8", "--measure-from", "3", "--micro-batch", "4"]
    flags += ["--max-length", "256", "--examples", "64", "--timeout", "300"]
    rows = run_script(*flags, tmp_path=tmp_path, timeout=3600)["rows"]
    assert list(rows) == list(gpu_sft.CONTENDERS)
    for name, row in rows.items():
        if row["status"].startswith("not installed"):
            continue
        assert row["status"] == "ok", (name, row)
        assert row["tokens_per_s"] > 0 and row["peak_bytes"] > 0, (name, row)
