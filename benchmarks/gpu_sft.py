"""GPU benchmark of supervised fine-tuning: tunelab (and each of its fast-path levers) against TRL and
Unsloth in the same run.

    python benchmarks/gpu_sft.py [--contenders trl-default,tunelab,...] [--steps 35] [--shape 1b|8b]
                                 [--method lora|full|qlora] [--timeout 600] [--json PATH] [--log-dir DIR]
    python benchmarks/gpu_sft.py --plan-check [--tunelab-set FIELD=VALUE ...]
    python benchmarks/gpu_sft.py --cpu-shape smollm2     # the same harness on this CPU
    python benchmarks/gpu_sft.py --dry-run               # a tiny shape on CPU: checks the script

The job (issue 8): a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32 heads, 8 KV heads, MLP
8192, vocab 128256, tied embeddings) initialised randomly from config, bf16, LoRA r=16 alpha=32 on
all linear layers, gradient checkpointing, micro-batch 8, max length 2048, 1,500 examples of random
tokens whose lengths follow a lognormal mix (median ≈ 500, clipped to 32..2048), same seed for all.
Measured: real (non-padding) tokens/s over steps 6..35, peak GPU memory
(``torch.cuda.max_memory_allocated``), MFU (model FLOPs per token × tokens/s over the bf16 matmul
peak measured first on the same GPU; 4N per token for LoRA, 6N for full fine-tuning, N the matmul
parameters, recompute not counted) and warm-up: the seconds the steps before the measured window
took beyond the steady step time (compilation, autotuning, allocator growth). ``--shape 8b
--method qlora`` is the QLoRA job on a Llama-3.1-8B shape; ``--method full`` full fine-tuning.

Contenders (issue 20): ``trl-default`` (SFTTrainer + PEFT, padded batches), ``trl-best`` (packing +
Liger), ``tunelab`` (its default path), one ``tunelab-<lever>`` per fast-path lever (recipe
overrides in ``LEVERS``), ``tunelab-fast`` (the levers that should help, together) and ``unsloth``
(FastLanguageModel + TRL's SFTTrainer, as Unsloth's README does it). Every contender runs in its
own subprocess, so each peak is its own and Unsloth's patches cannot leak into the others; a
missing package is a "not installed" row, a lever the recipe does not know (yet) a "recipe rejects
it" row, a contender past ``--timeout`` seconds a "timed out" row.

``--plan-check`` compares `tunelab plan`'s predicted peak with the measured one for the benchmark
configurations (every batch padded to the full max length, the plan's worst case), with the
``--tunelab-set`` levers applied to both. ``--cpu-shape smollm2`` runs TRL default vs tunelab (and
tunelab-packed) on the CPU with a SmolLM2-135M shape and minutes-long sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.plan.shapes import LLAMA_SHAPES

SHAPES = LLAMA_SHAPES
# Each tunelab contender is tunelab's default recipe plus these overrides. On CUDA the default already
# takes the fast path where it can (model.attention and data.packing auto: padding-free packs through
# a varlen kernel; training.kernels auto: Liger when installed), so "tunelab-plain" switches those off
# (the path before issue 20) and each lever row turns one lever on over the plain path.
PLAIN = ("model.attention=sdpa", "data.packing=false", "training.kernels=none")
LEVERS: dict[str, tuple[str, ...]] = {
    "tunelab": (),
    "tunelab-plain": PLAIN,
    "tunelab-packed": ("model.attention=varlen", "data.packing=true", "training.kernels=none"),
    "tunelab-flex": ("model.attention=flex_attention", "data.packing=true", "training.kernels=none"),
    "tunelab-liger": ("model.attention=sdpa", "data.packing=false", "training.kernels=liger"),
    "tunelab-compile": (*PLAIN, "training.compile=true"),
    # the default plus compilation: every lever that trades no memory for speed
    "tunelab-fast": ("training.compile=true",),
    # checkpointing one layer in two buys speed with memory (the target is speed at <= TRL's peak)
    "tunelab-ckpt2": ("training.checkpoint_every=2",),
}
CONTENDERS = ("trl-default", "trl-best", *LEVERS, "unsloth")
PLAN_CHECKS = "1b-lora,1b-full,8b-qlora"
LORA = {"r": 16, "alpha": 32}
UNSLOTH_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SEED = 0
# Sizes per mode; any flag given on the command line wins.
MODES: dict[str, dict[str, Any]] = {
    "gpu": dict(
        contenders=",".join(CONTENDERS),
        steps=35,
        measure_from=6,
        micro_batch=8,
        max_length=2048,
        examples=1500,
    ),
    # 2 CPU cores: ~10 s a step at 4 × ≤256 tokens on the 135M shape
    "cpu": dict(
        contenders="trl-default,tunelab,tunelab-packed",
        steps=10,
        measure_from=3,
        micro_batch=4,
        max_length=256,
        examples=200,
    ),
    "dry": dict(
        contenders=",".join(CONTENDERS), steps=4, measure_from=2, micro_batch=2, max_length=64, examples=24
    ),
}


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


def window_rate(ends: list[float], tokens: list[int], first: int) -> dict[str, float]:
    """Real tokens/s over steps ``first``..end (1-based), timed from the end of step first-1, and the
    warm-up: how much longer steps 1..first-1 took than at the steady step time. ``ends[k-1]`` is the
    end of step k in seconds after training started; ``tokens[k-1]`` the real tokens of step k."""
    if len(ends) < first or first < 2:
        raise ValueError(f"need at least {first} steps timed and measure-from ≥ 2, got {len(ends)} steps")
    window = ends[-1] - ends[first - 2]
    step_s = window / (len(ends) - first + 1)
    return {
        "tokens_per_s": sum(tokens[first - 1 : len(ends)]) / window,
        "warmup_s": ends[first - 2] - (first - 1) * step_s,
    }


class StepClock:
    """Real tokens per forward (a pre-hook on the model) and the time at each optimizer step end."""

    def __init__(self, model: Any) -> None:
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.started = time.perf_counter()
        model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens.append(int(mask.sum()) if mask is not None and mask.dim() == 2 else int(ids.numel()))

    def start(self) -> None:
        _synchronize()
        self.started = time.perf_counter()

    def step_done(self) -> None:
        _synchronize()
        self.times.append(time.perf_counter())

    def rate(self, first: int) -> dict[str, float]:
        return window_rate([t - self.started for t in self.times], self.tokens, first)


def _synchronize() -> None:
    import torch  # noqa: PLC0415

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_bytes() -> int | None:
    import torch  # noqa: PLC0415

    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def sft_config(output_dir: Path, args: argparse.Namespace, **changes: Any) -> Any:
    """TRL's SFTConfig for this job: its defaults except the sizes every contender shares."""
    import torch  # noqa: PLC0415
    from trl import SFTConfig  # noqa: PLC0415

    cuda = torch.cuda.is_available()
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=1,
        max_length=args.max_length,
        max_steps=args.steps,
        learning_rate=2e-4,
        gradient_checkpointing=True,
        bf16=cuda,
        logging_steps=1000,
        save_strategy="no",
        report_to=[],
        seed=SEED,
        dataloader_num_workers=0,
    )
    return SFTConfig(**(settings | changes))


def timed_train(trainer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Train a transformers Trainer with a StepClock on its model; the contender's row."""
    import torch  # noqa: PLC0415
    from transformers import TrainerCallback  # noqa: PLC0415

    clock = StepClock(trainer.model)

    class Clock(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            clock.start()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            clock.step_done()

    trainer.add_callback(Clock())
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    return {"status": "ok", **clock.rate(args.measure_from), "peak_bytes": _peak_bytes()}


def run_trl(workdir: Path, args: argparse.Namespace, *, best: bool) -> dict[str, Any]:
    """TRL SFTTrainer + PEFT, defaults (padded batches) or packing=True + use_liger_kernel=True."""
    missing = [m for m in (("liger_kernel",) if best else ()) if importlib.util.find_spec(m) is None]
    if missing:
        return {"status": f"not installed ({', '.join(missing)})"}
    if best and args.device == "cpu":
        return {"status": "needs a GPU: liger-kernel's kernels are Triton (CUDA/ROCm) only"}
    import torch  # noqa: PLC0415
    from datasets import Dataset  # noqa: PLC0415
    from peft import LoraConfig  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: PLC0415
    from trl import SFTTrainer  # noqa: PLC0415

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
    config = sft_config(
        workdir / ("trl-best" if best else "trl-default"), args, packing=best, use_liger_kernel=best
    )
    peft = None
    if args.method != "full":
        peft = LoraConfig(
            r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear", task_type="CAUSAL_LM"
        )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=peft
    )
    return timed_train(trainer, args)


def run_unsloth(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Unsloth as its README does it: FastLanguageModel (bf16, max_seq_length), get_peft_model (r16,
    alpha 32, the seven linear roles, its own "unsloth" gradient checkpointing) and TRL's SFTTrainer
    (which Unsloth patches on import) on the same ids, steps and sizes as trl-default."""
    if importlib.util.find_spec("unsloth") is None:
        return {"status": "not installed (unsloth)"}
    if args.device == "cpu":
        return {"status": "needs a GPU: Unsloth trains on CUDA (its kernels are Triton)"}
    # imported first, as its docs say: it patches transformers and trl on import
    fast_model = importlib.import_module("unsloth").FastLanguageModel
    import torch  # noqa: PLC0415
    from datasets import Dataset  # noqa: PLC0415
    from trl import SFTTrainer  # noqa: PLC0415

    model, tokenizer = fast_model.from_pretrained(
        model_name=str(workdir / "model"),
        max_seq_length=args.max_length,
        dtype=torch.bfloat16,
        load_in_4bit=args.method == "qlora",
        full_finetuning=args.method == "full",
        use_gradient_checkpointing="unsloth",
    )
    if args.method != "full":
        model = fast_model.get_peft_model(
            model,
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            target_modules=UNSLOTH_TARGETS,
            lora_dropout=0,
            bias="none",
            use_gradient_checkpointing="unsloth",
            random_state=SEED,
            max_seq_length=args.max_length,
        )
    data = Dataset.from_dict({"input_ids": read_ids(workdir, tokenizer.eos_token_id)})
    # gradient_checkpointing is Unsloth's own (set above), so the Trainer must not switch HF's on too
    config = sft_config(workdir / "unsloth", args, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
    return timed_train(trainer, args)


def lever_overrides(name: str) -> list[str]:
    """The recipe overrides of a tunelab contender."""
    return list(LEVERS[name])


def tunelab_recipe(
    workdir: Path, args: argparse.Namespace, overrides: list[str], data: Path, name: str = "tunelab"
) -> Any:
    """The benchmark job as a tunelab recipe (raises RecipeError where an override does not parse)."""
    from tunelab.recipe import parse_recipe  # noqa: PLC0415

    method: dict[str, Any] = {"name": args.method}
    if args.method != "full":
        method |= {"r": LORA["r"], "alpha": LORA["alpha"], "target_modules": "all-linear"}
    raw = {
        "seed": SEED,
        # dtype auto: bf16 on CUDA, fp32 on CPU, as TRL gets it
        "model": {"name_or_path": str(workdir / "model"), "dtype": "auto"},
        # plain text rows: every token carries loss; the template is unused but must exist
        "data": {"train": str(data), "max_length": args.max_length, "template": "chatml"},
        "method": method,
        "training": {
            "batch_size": args.micro_batch,
            "max_steps": args.steps,
            "learning_rate": 2e-4,
            "gradient_checkpointing": True,
            "save_every": 100_000,
            "log_every": 1,
        },
        "output": {"dir": str(workdir / "runs"), "name": name},
    }
    return parse_recipe(raw, overrides=overrides)


def run_tunelab(
    workdir: Path, args: argparse.Namespace, *, name: str = "tunelab", data: Path | None = None
) -> dict[str, Any]:
    """`tunelab train` on the same model directory and data, with the lever's recipe overrides."""
    import torch  # noqa: PLC0415

    from tunelab.recipe import RecipeError  # noqa: PLC0415

    overrides = [*lever_overrides(name), *args.tunelab_set]
    try:
        recipe = tunelab_recipe(workdir, args, overrides, data or workdir / "train.jsonl", name)
    except RecipeError as err:
        return {"status": f"recipe rejects it: {err}", "overrides": overrides}
    from tunelab.train.run import train  # noqa: PLC0415  (after the recipe: a rejected lever costs no import)

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        result = train(recipe, overwrite=True)
    except ValueError as err:  # tunelab's refusals (pre-flight, a lever that cannot apply) are ValueErrors
        return {"status": f"refused: {type(err).__name__}: {str(err)[:300]}", "overrides": overrides}
    timing = tunelab_window(result.run_dir, args.measure_from)
    return {"status": "ok", **timing, "peak_bytes": _peak_bytes(), "overrides": overrides}


def tunelab_window(run_dir: Path, first: int) -> dict[str, float]:
    """The measured window from a run's metrics: tokens_per_s there is cumulative from the start of
    training, so the end of step k is at tokens_seen_k / rate_k seconds."""
    from tunelab.runs.rundir import RunDir  # noqa: PLC0415

    rows = [r for r in RunDir.create(run_dir.parent, run_dir.name, resume=True).read_metrics() if "loss" in r]
    tokens = [int(r["tokens"]) for r in rows]
    ends = np.cumsum(tokens) / np.array([r["tokens_per_s"] for r in rows])
    return window_rate([float(e) for e in ends], tokens, first)


def plan_check(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Measured peak of tunelab's path (with ``--tunelab-set``) on batches padded to the full max
    length, and the plan's prediction for the very same recipe."""
    from transformers import AutoConfig  # noqa: PLC0415

    from tunelab.plan.gpus import GPUS  # noqa: PLC0415
    from tunelab.plan.memory import plan_for, plan_inputs  # noqa: PLC0415
    from tunelab.recipe import RecipeError  # noqa: PLC0415

    full = write_full_length(workdir, args)
    try:
        recipe = tunelab_recipe(workdir, args, list(args.tunelab_set), full)
    except RecipeError as err:
        return {"status": f"recipe rejects it: {err}"}
    measured = run_tunelab(workdir, args, data=full)
    if measured["status"] != "ok":
        return measured
    plan = plan_for(
        plan_inputs(recipe, GPUS["h100-80gb"], config=AutoConfig.from_pretrained(workdir / "model")),
        args.micro_batch,
    )
    return {"status": "ok", "predicted_bytes": plan.peak_allocated, "peak_bytes": measured["peak_bytes"]}


def write_full_length(workdir: Path, args: argparse.Namespace) -> Path:
    """Rows of max-64..max-1 tokens: every batch padded, its widest row at the maximum."""
    rng = np.random.default_rng(SEED + 2)
    full = workdir / "full_length.jsonl"
    vocab = SHAPES[args.shape]["vocab_size"]
    lengths = rng.integers(args.max_length - 64, args.max_length, size=args.micro_batch * (args.steps + 1))
    with full.open("w") as fh:
        for n in lengths:
            text = " ".join(f"t{i}" for i in rng.integers(0, vocab - 2, size=int(n)))
            fh.write(json.dumps({"text": text}) + "\n")
    return full


def child(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; the JSON result is the last stdout line."""
    workdir = Path(args.workdir)
    task = args.child
    try:
        if task == "prepare":
            out = prepare(workdir, args.shape, args.examples, args.max_length, args.device)
        elif task == "peak":
            out = {"tflops": matmul_peak_tflops(args.device)}
        elif task == "plan-check":
            out = plan_check(workdir, args)
        elif task in LEVERS:
            out = run_tunelab(workdir, args, name=task)
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


def run_child(
    cmd: list[str], *, timeout: float, env: dict[str, str], log: Path | None = None
) -> dict[str, Any]:
    """Run one child; its last JSON line is the row. Past ``timeout`` seconds the child's whole process
    group is killed (compile workers and dataloaders included) and, unless it had printed its row
    already (a measurement that finished, in a process slow to exit), the row says it timed out."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        failed = {"status": f"crashed (exit {proc.returncode}): {stderr.strip()[-300:]}"}
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        failed = {"status": f"timed out after {timeout:g} s"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    row = json.loads(lines[-1]) if lines else failed
    if log is not None:
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{stdout}\n--- stderr\n{stderr}", encoding="utf-8")
    return row


def spawn(task: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", task, "--workdir", str(workdir), *_forwarded(args)]
    env = os.environ | ({"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {})
    if args.threads:  # torch's intra-op threads: on a shared CPU, fewer than the cores can be faster
        env |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    log = None
    if args.log_dir:
        Path(args.log_dir).mkdir(parents=True, exist_ok=True)
        log = Path(args.log_dir) / f"{args.shape}-{args.method}-{task}.log"
    return run_child(cmd, timeout=args.timeout, env=env, log=log)


def _forwarded(args: argparse.Namespace) -> list[str]:
    out = ["--shape", args.shape, "--method", args.method, "--steps", str(args.steps)]
    out += ["--micro-batch", str(args.micro_batch), "--max-length", str(args.max_length)]
    out += ["--examples", str(args.examples), "--measure-from", str(args.measure_from)]
    out += ["--device", args.device]
    return out + [x for kv in args.tunelab_set for x in ("--tunelab-set", kv)]


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
    columns = ("contender", "real tokens/s", "peak GiB", "MFU", "× TRL default", "warm-up s", "status")
    for column in columns:
        table.add_column(column, justify="left" if column in ("contender", "status") else "right")
    base = results.get("trl-default", {}).get("tokens_per_s")
    per_token = model_flops_per_token(args.shape, args.method)
    for name, r in results.items():
        if r.get("status") != "ok":
            table.add_row(name, "", "", "", "", "", r.get("status", "?"))
            continue
        rate, peak, warmup = r["tokens_per_s"], r.get("peak_bytes"), r.get("warmup_s")
        table.add_row(
            name,
            f"{rate:,.0f}",
            f"{peak / 2**30:.2f}" if peak else "n/a",
            f"{per_token * rate / (tflops * 1e12):.1%}" if tflops else "n/a",
            f"{rate / base:.2f}" if base else "n/a",
            f"{warmup:.1f}" if warmup is not None else "n/a",
            "ok",
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contenders", help=f"comma-separated, from: {', '.join(CONTENDERS)}")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--measure-from", type=int, help="first measured step (1-based, ≥ 2)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--method", choices=["lora", "full", "qlora"], default="lora")
    parser.add_argument("--micro-batch", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--examples", type=int)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per contender (default 900)")
    parser.add_argument(
        "--plan-check", action="store_true", help="predicted vs measured peak for the benchmark configs"
    )
    parser.add_argument(
        "--plan-configs",
        default=PLAN_CHECKS,
        help=f"shape-method pairs the plan check measures on CUDA (default {PLAN_CHECKS})",
    )
    parser.add_argument(
        "--cpu-shape",
        choices=["smollm2"],
        help="run on this CPU with this shape: TRL default vs tunelab (and tunelab-packed), minutes-long sizes",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shape on CPU: checks the script, measures nothing"
    )
    parser.add_argument(
        "--tunelab-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="recipe override for every tunelab contender and the plan check, to measure one lever "
        "(e.g. training.checkpoint_every=2); repeatable",
    )
    parser.add_argument(
        "--threads", type=int, help="CPU threads per contender (default: torch's, one a core)"
    )
    parser.add_argument("--json", help="also write the rows (and the settings) to this JSON file")
    parser.add_argument("--log-dir", help="keep each child's stdout and stderr here")
    parser.add_argument("--workdir", help="keep model and data here (default: a temporary directory)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    return with_mode_defaults(parser.parse_args(argv))


def with_mode_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the sizes a flag left unset from the mode (gpu, cpu, dry); the tiny shape for a dry run."""
    mode = "dry" if args.dry_run else "cpu" if args.cpu_shape else "gpu"
    for key, value in MODES[mode].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.dry_run:
        args.shape = "tiny"
    elif args.cpu_shape:
        args.shape = args.cpu_shape
    args.device = args.device or ("cuda" if mode == "gpu" else "cpu")
    return args


def prepared(args: argparse.Namespace, root: Path, console: Any) -> Path:
    """The shape's model and data under ``root/<shape>``, written once: a later call (the plan check
    after the table, with the same ``--workdir``) reuses them when shape and data sizes match."""
    workdir = root / args.shape
    workdir.mkdir(parents=True, exist_ok=True)
    key = {"shape": args.shape, "examples": args.examples, "max_length": args.max_length, "seed": SEED}
    marker = workdir / "prepared.json"
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        console.print(f"data and model: reused from {workdir}")
        return workdir
    started = time.perf_counter()
    out = spawn("prepare", args, workdir)
    console.print(f"data and model ({time.perf_counter() - started:.0f} s):", json.dumps(out))
    if "median_length" in out:
        marker.write_text(json.dumps({"key": key, **out}))
    return workdir


def run_contenders(args: argparse.Namespace, root: Path, console: Any) -> dict[str, Any]:
    workdir = prepared(args, root, console)
    tflops = spawn("peak", args, workdir).get("tflops") if args.device == "cuda" else None
    results = {}
    for name in (n.strip() for n in args.contenders.split(",")):
        started = time.perf_counter()
        results[name] = spawn(name, args, workdir)
        console.print(f"{name} ({time.perf_counter() - started:.0f} s): {json.dumps(results[name])}")
    console.print(contender_table(results, args, tflops))
    return {"tflops": tflops, "rows": results}


def run_plan_checks(args: argparse.Namespace, root: Path, console: Any) -> dict[str, Any]:
    rows = []
    configs = [tuple(c.strip().split("-")) for c in args.plan_configs.split(",")]
    for shape, method in configs if args.device == "cuda" else [(args.shape, "lora")]:
        sub = argparse.Namespace(
            **vars(args) | {"shape": shape, "method": method, "steps": 3, "measure_from": 2}
        )
        workdir = prepared(sub, root, console)
        name = f"{shape} {method}, b={args.micro_batch}, s={args.max_length}"
        started = time.perf_counter()
        rows.append((name, spawn("plan-check", sub, workdir)))
        console.print(f"plan check {name} ({time.perf_counter() - started:.0f} s): {json.dumps(rows[-1][1])}")
    console.print(plan_check_table(rows))
    return {"rows": dict(rows)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    from tunelab.console import make_console  # noqa: PLC0415

    console = make_console()
    with tempfile.TemporaryDirectory(prefix="gpu_sft-") as tmp:
        root = Path(args.workdir or tmp)
        run = run_plan_checks if args.plan_check else run_contenders
        out = run(args, root, console)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("child", "workdir")}
        Path(args.json).write_text(json.dumps({"settings": settings, **out}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
