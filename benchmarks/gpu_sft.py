"""GPU benchmark of supervised fine-tuning: tunelab against TRL (and Unsloth) in the same run.

    python benchmarks/gpu_sft.py [--contenders trl-default,trl-best,tunelab,unsloth] [--steps 35]
                                 [--shape 1b|8b] [--method lora|full|qlora] [--plan-check] [--dry-run]

The job (issue 8): a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP
8192, vocab 128256, tied embeddings) initialised randomly from config, bf16, LoRA r=16 alpha=32 on
all linear layers, gradient checkpointing, micro-batch 8, max length 2048, 1,500 examples of random
tokens whose lengths follow a lognormal mix (median ≈ 500, clipped to 32..2048), same seed for all.
Measured: real (non-padding) tokens/s over steps 6..35, peak GPU memory
(``torch.cuda.max_memory_allocated``) and MFU (model FLOPs per token × tokens/s over the bf16 matmul
peak measured first on the same GPU; 4N per token for LoRA, 6N for full fine-tuning, N the matmul
parameters, recompute not counted). ``--shape 8b --method qlora`` is the QLoRA job on a
Llama-3.1-8B shape; ``--method full`` full fine-tuning of the 1B shape.

Every contender runs in its own subprocess, so each peak is its own and Unsloth's patches cannot
leak into the others; a contender whose package is missing is a "not installed" row.
``--plan-check`` compares `tunelab plan`'s predicted peak with the measured one for the benchmark
configurations (every batch padded to the full max length, the plan's worst case).
``--dry-run`` runs everything on a tiny shape on CPU in a minute, to check the script itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.plan.shapes import LLAMA_SHAPES

SHAPES = LLAMA_SHAPES
CONTENDERS = ("trl-default", "trl-best", "tunelab", "unsloth")
PLAN_CHECKS = (("1b", "lora"), ("1b", "full"), ("8b", "qlora"))
LORA = {"r": 16, "alpha": 32}
SEED = 0


# ---------------------------------------------------------------- data and model, written once


def example_lengths(n: int, max_length: int, seed: int) -> np.ndarray:
    """A lognormal mix: 70% short (median 410) and 30% long (median 1100) examples, σ 0.6 each,
    clipped to 32..max_length; the overall median is ≈ 500 at max_length 2048."""
    rng = np.random.default_rng(seed)
    long = rng.random(n) < 0.3
    medians = np.where(long, 1100.0, 410.0) * max_length / 2048
    lengths = np.exp(np.log(medians) + 0.6 * rng.standard_normal(n))
    return np.clip(lengths, 32 * max_length / 2048, max_length - 1).astype(int)  # -1: room for EOS


def word_tokenizer(vocab: int) -> Any:
    """Token i is the word ``t{i}``: random ids round-trip through text exactly, so tunelab (which
    reads text) and TRL (which gets ids) see the same tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    words = {f"t{i}": i for i in range(vocab - 2)}
    words |= {"<eos>": vocab - 2, "<pad>": vocab - 1}
    backend = Tokenizer(models.WordLevel(words, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


def prepare(workdir: Path, shape: str, n_examples: int, max_length: int, device: str) -> dict[str, Any]:
    """Random bf16 weights and tokenizer in ``workdir/model``; data as text and ids."""
    import torch  # noqa: PLC0415
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    cfg = SHAPES[shape]
    tokenizer = word_tokenizer(cfg["vocab_size"])
    config = LlamaConfig(
        **cfg,
        max_position_embeddings=max(4096, max_length),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SEED)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(workdir / "model", safe_serialization=True)
    tokenizer.save_pretrained(workdir / "model")
    del model
    rng = np.random.default_rng(SEED + 1)
    lengths = example_lengths(n_examples, max_length, SEED)
    with (workdir / "train.jsonl").open("w") as fh:
        for n in lengths:
            ids = rng.integers(0, cfg["vocab_size"] - 2, size=int(n))
            fh.write(json.dumps({"text": " ".join(f"t{i}" for i in ids)}) + "\n")
    return {"median_length": float(np.median(lengths)), "examples": int(n_examples)}


def read_ids(workdir: Path, eos: int) -> list[list[int]]:
    rows = [json.loads(line)["text"] for line in (workdir / "train.jsonl").open()]
    return [[int(w[1:]) for w in text.split()] + [eos] for text in rows]


# ---------------------------------------------------------------- measurements (in subprocesses)


def matmul_peak_tflops(device: str) -> float | None:
    """Dense bf16 matmul throughput of this GPU (8192³, after warm-up): the MFU denominator."""
    import torch  # noqa: PLC0415

    if not device.startswith("cuda"):
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    reps, start = 50, time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


class StepClock:
    """Real tokens per forward (a pre-hook on the model) and the time at each optimizer step end."""

    def __init__(self, model: Any) -> None:
        self.tokens: list[int] = []
        self.times: list[float] = []
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens.append(int(mask.sum()) if mask is not None and mask.dim() == 2 else int(ids.numel()))

    def step_done(self) -> None:
        _synchronize()
        self.times.append(time.perf_counter())

    def rate(self, first: int) -> float:
        """Real tokens/s over steps ``first``..end (1-based), timed from the end of step first-1."""
        tokens = sum(self.tokens[first - 1 : len(self.times)])
        return tokens / (self.times[-1] - self.times[first - 2])


def _synchronize() -> None:
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_bytes() -> int | None:
    import torch  # noqa: PLC0415

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def run_trl(workdir: Path, args: argparse.Namespace, *, best: bool) -> dict[str, Any]:
    """TRL SFTTrainer + PEFT, defaults (padded batches) or packing=True + use_liger_kernel=True."""
    missing = [m for m in (("liger_kernel",) if best else ()) if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": f"not installed ({', '.join(missing)})"}
    import torch  # noqa: PLC0415
    from datasets import Dataset  # noqa: PLC0415
    from peft import LoraConfig  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback  # noqa: PLC0415
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(workdir / "model")
    quant = None
    if args.method == "qlora":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(
        workdir / "model", dtype=torch.bfloat16 if cuda else torch.float32, quantization_config=quant
    )
    data = Dataset.from_dict({"input_ids": read_ids(workdir, tokenizer.eos_token_id)})
    config = SFTConfig(
        output_dir=str(workdir / ("trl-best" if best else "trl-default")),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_length=args.max_length,
        max_steps=args.steps,
        learning_rate=2e-4,
        gradient_checkpointing=True,
        bf16=cuda,
        packing=best,
        use_liger_kernel=best,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        seed=SEED,
        dataloader_num_workers=0,
    )
    peft = None
    if args.method != "full":
        peft = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft
    )
    clock = StepClock(trainer.model)

    class Clock(TrainerCallback):
        def on_step_end(self, *_: Any, **__: Any) -> None:
            clock.step_done()

    trainer.add_callback(Clock())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"status": "ok", "tokens_per_s": clock.rate(args.measure_from), "peak_bytes": _peak_bytes()}


def run_tunelab(workdir: Path, args: argparse.Namespace, *, data: Path | None = None) -> dict[str, Any]:
    """tunelab's default path: `tunelab train` on the same model directory and data."""
    import torch  # noqa: PLC0415

    from tunelab.recipe import parse_recipe  # noqa: PLC0415
    from tunelab.runs.rundir import RunDir  # noqa: PLC0415
    from tunelab.train.run import train  # noqa: PLC0415

    method: dict[str, Any] = {"name": args.method}
    if args.method != "full":
        method |= {"r": LORA["r"], "alpha": LORA["alpha"], "target_modules": "all-linear"}
    recipe = parse_recipe(
        {
            "seed": SEED,
            "model": {
                "name_or_path": str(workdir / "model"),
                "dtype": "bfloat16" if torch.cuda.is_available() else "auto",
            },
            "data": {
                # plain text rows: every token carries loss; the template is unused but must exist
                "train": str(data or workdir / "train.jsonl"),
                "max_length": args.max_length,
                "template": "chatml",
            },
            "method": method,
            "training": {
                "batch_size": args.micro_batch,
                "max_steps": args.steps,
                "learning_rate": 2e-4,
                "gradient_checkpointing": True,
                "save_every": 100_000,
                "log_every": 1,
            },
            "output": {"dir": str(workdir / "runs"), "name": f"tunelab-{args.method}"},
        },
        overrides=args.tunelab_set,
    )
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = train(recipe, overwrite=True)
    rows = [
        r
        for r in RunDir.create(result.run_dir.parent, result.run_dir.name, resume=True).read_metrics()
        if "loss" in r
    ]
    # tokens_per_s is cumulative from the start, so elapsed time at step k is tokens_seen_k / rate_k
    seen = np.cumsum([r["tokens"] for r in rows])
    elapsed = seen / np.array([r["tokens_per_s"] for r in rows])
    first = args.measure_from
    rate = (seen[-1] - seen[first - 2]) / (elapsed[-1] - elapsed[first - 2])
    return {"status": "ok", "tokens_per_s": float(rate), "peak_bytes": _peak_bytes()}


def run_unsloth(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    if importlib.util.find_spec("unsloth") is None:
        return {"status": "not installed (unsloth)"}
    return {"status": "installed, but this script does not drive it yet: add FastLanguageModel here"}


def plan_check(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Measured peak of tunelab's path on batches padded to the full max length, and the plan's."""
    from transformers import AutoConfig  # noqa: PLC0415

    from tunelab.plan.gpus import GPUS  # noqa: PLC0415
    from tunelab.plan.memory import plan_for, plan_inputs  # noqa: PLC0415
    from tunelab.recipe import parse_recipe  # noqa: PLC0415

    rng = np.random.default_rng(SEED + 2)
    full = workdir / "full_length.jsonl"
    vocab = SHAPES[args.shape]["vocab_size"]
    with full.open("w") as fh:  # lengths max-64..max-1: every batch padded, widest row at the maximum
        for n in rng.integers(
            args.max_length - 64, args.max_length, size=args.micro_batch * (args.steps + 1)
        ):
            fh.write(
                json.dumps({"text": " ".join(f"t{i}" for i in rng.integers(0, vocab - 2, size=int(n)))})
                + "\n"
            )
    measured = run_tunelab(workdir, args, data=full)
    method: dict[str, Any] = {"name": args.method}
    if args.method != "full":
        method |= {"r": LORA["r"], "alpha": LORA["alpha"]}
    recipe = parse_recipe(
        {
            "model": {"name_or_path": str(workdir / "model"), "dtype": "bfloat16"},
            "data": {"train": str(full), "max_length": args.max_length, "template": "chatml"},
            "method": method,
            "training": {"batch_size": args.micro_batch, "gradient_checkpointing": True},
        }
    )
    gpu = GPUS["h100-80gb"]
    plan = plan_for(
        plan_inputs(recipe, gpu, config=AutoConfig.from_pretrained(workdir / "model")), args.micro_batch
    )
    return {"status": "ok", "predicted_bytes": plan.peak_allocated, "peak_bytes": measured["peak_bytes"]}


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; the JSON result is the last stdout line."""
    workdir = Path(args.workdir)
    device = "cuda" if not args.dry_run else "cpu"
    task = args.child
    try:
        if task == "prepare":
            out = prepare(workdir, args.shape, args.examples, args.max_length, device)
        elif task == "peak":
            out = {"tflops": matmul_peak_tflops(device)}
        elif task == "plan-check":
            out = plan_check(workdir, args)
        elif task == "tunelab":
            out = run_tunelab(workdir, args)
        elif task in ("trl-default", "trl-best"):
            out = run_trl(workdir, args, best=task == "trl-best")
        elif task == "unsloth":
            out = run_unsloth(workdir, args)
        else:
            out = {"status": f"unknown contender {task!r}; known: {', '.join(CONTENDERS)}"}
    except Exception as err:  # noqa: BLE001  (a failing contender is a row, not the end of the run)
        out = {"status": f"failed: {type(err).__name__}: {str(err)[:300]}"}
    print(json.dumps(out))


# ---------------------------------------------------------------- the parent: orchestrate and print


def spawn(task: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", task, "--workdir", str(workdir), *_forwarded(args)]
    env = os.environ | ({"CUDA_VISIBLE_DEVICES": ""} if args.dry_run else {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"status": f"crashed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def _forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--shape", args.shape, "--method", args.method, "--steps", str(args.steps)]
    out += ["--micro-batch", str(args.micro_batch), "--max-length", str(args.max_length)]
    out += ["--examples", str(args.examples), "--measure-from", str(args.measure_from)]
    out += [x for kv in args.tunelab_set for x in ("--tunelab-set", kv)]
    return out + (["--dry-run"] if args.dry_run else [])


def model_flops_per_token(shape: str, method: str) -> float:
    """4N (LoRA/QLoRA: no weight gradients) or 6N (full), N = matmul parameters incl. the head."""
    s = SHAPES[shape]
    h, i, heads, kv = (
        s["hidden_size"],
        s["intermediate_size"],
        s["num_attention_heads"],
        s["num_key_value_heads"],
    )
    kv_width = h // heads * kv
    per_layer = h * h * 2 + 2 * h * kv_width + 3 * h * i
    n = s["num_hidden_layers"] * per_layer + h * s["vocab_size"]
    return (6 if method == "full" else 4) * n


def contender_table(
    results: dict[str, dict[str, Any]], args: argparse.Namespace, tflops: float | None
) -> Any:
    from rich.table import Table  # noqa: PLC0415

    peak_note = f"{tflops:.0f} TFLOPS measured bf16 matmul peak" if tflops else "no GPU: MFU not computed"
    table = Table(
        title=f"SFT {args.method} on a {args.shape} Llama shape, micro-batch {args.micro_batch}, max length "
        f"{args.max_length}, steps {args.measure_from}..{args.steps} ({peak_note})"
    )
    for column in ("contender", "real tokens/s", "peak GiB", "MFU", "× TRL default"):
        table.add_column(column, justify="left" if column == "contender" else "right")
    base = results.get("trl-default", {}).get("tokens_per_s")
    per_token = model_flops_per_token(args.shape, args.method)
    for name, r in results.items():
        if r.get("status") != "ok":
            table.add_row(name, r.get("status", "?"), "", "", "")
            continue
        rate, peak = r["tokens_per_s"], r.get("peak_bytes")
        table.add_row(
            name,
            f"{rate:,.0f}",
            f"{peak / 2**30:.2f}" if peak else "n/a",
            f"{per_token * rate / (tflops * 1e12):.1%}" if tflops else "n/a",
            f"{rate / base:.2f}" if base else "n/a",
        )
    return table


def plan_check_table(rows: list[tuple[str, dict[str, Any]]]) -> Any:
    from rich.table import Table  # noqa: PLC0415

    table = Table(title="tunelab plan: predicted vs measured peak (torch.cuda.max_memory_allocated)")
    for column in ("configuration", "predicted GiB", "measured GiB", "error"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for name, r in rows:
        if r.get("status") != "ok":
            table.add_row(name, "", "", r.get("status", "?"))
            continue
        if not r.get("peak_bytes"):
            table.add_row(name, f"{r['predicted_bytes'] / 2**30:.4f}", "no GPU", "")
            continue
        predicted, measured = r["predicted_bytes"], r["peak_bytes"]
        table.add_row(
            name, f"{predicted / 2**30:.2f}", f"{measured / 2**30:.2f}", f"{predicted / measured - 1:+.1%}"
        )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--steps", type=int, default=35)
    parser.add_argument("--measure-from", type=int, default=6)
    parser.add_argument("--shape", choices=["1b", "8b", "tiny"], default="1b")
    parser.add_argument("--method", choices=["lora", "full", "qlora"], default="lora")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=1500)
    parser.add_argument(
        "--plan-check", action="store_true", help="predicted vs measured peak for the benchmark configs"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shape on CPU: checks the script, measures nothing"
    )
    parser.add_argument(
        "--tunelab-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="recipe override for the tunelab contender, to measure one lever "
        "(e.g. objective.fused_cross_entropy=true, data.packing=true); repeatable",
    )
    parser.add_argument("--workdir", help="keep model and data here (default: a temporary directory)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.dry_run:
        args.shape, args.steps, args.measure_from = "tiny", 4, 2
        args.micro_batch, args.max_length, args.examples = 2, 64, 24
    from rich.console import Console  # noqa: PLC0415

    console = Console()
    with tempfile.TemporaryDirectory(prefix="gpu_sft-") as tmp:
        root = Path(args.workdir or tmp)
        if args.plan_check:
            rows = []
            for shape, method in PLAN_CHECKS if not args.dry_run else (("tiny", "lora"),):
                sub = argparse.Namespace(**vars(args) | {"shape": shape, "method": method, "steps": 3})
                workdir = root / f"{shape}-{method}"
                workdir.mkdir(parents=True, exist_ok=True)
                console.print(f"plan check {shape} {method}: preparing", spawn("prepare", sub, workdir))
                rows.append(
                    (
                        f"{shape} {method}, b={args.micro_batch}, s={args.max_length}",
                        spawn("plan-check", sub, workdir),
                    )
                )
            console.print(plan_check_table(rows))
            return
        workdir = root / f"{args.shape}-{args.method}"
        workdir.mkdir(parents=True, exist_ok=True)
        console.print("data and model:", spawn("prepare", args, workdir))
        tflops = spawn("peak", args, workdir).get("tflops")
        results = {}
        for name in args.contenders.split(","):
            console.print(f"running {name} …")
            results[name] = spawn(name.strip(), args, workdir)
        console.print(contender_table(results, args, tflops))


if __name__ == "__main__":
    main()
