"""Run set-up shared by offline (``loop.py``) and online (``rl.py``) training: seed, accelerator,
tokenizer and objective; model loading and method application; optimizer and schedule; step
arithmetic; metrics rows and ``final/``. It imports neither loop nor run, so both loops can use it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from transformers import get_scheduler

from tunelab.console import labelled
from tunelab.data.templates import select_template
from tunelab.methods.base import with_learning_rates
from tunelab.methods.lr_structure import structure_learning_rates
from tunelab.models.attention import FastPath
from tunelab.models.load import MODEL_CLASSES, load_model, tokenizer_for
from tunelab.objectives import OBJECTIVES
from tunelab.recipe import Recipe
from tunelab.runs.atomic import atomic_directory, atomic_write_json
from tunelab.runs.rundir import RunDir
from tunelab.train import distributed
from tunelab.train.checkpoint import (
    reporting_disk_full,
)
from tunelab.train.tracking import Tracking, accelerator_options

FINAL_META = "tunelab.json"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float]
    final_eval: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False
    data_summary: dict[str, Any] = field(default_factory=dict)


def resolve_mixed_precision(choice: str) -> str:
    """bf16 where the GPU has it, fp16 on older GPUs, none on CPU (fp32 is exact and CPUs gain little)."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def micro_batch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic shuffled micro-batches of one epoch (a pure function of seed and epoch, so resume
    can recompute the order instead of storing it)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_examples, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


# Step arithmetic takes plain numbers, always in the order (data size, batch size, accumulation,
# then what else the answer depends on), so online training can pass its own batch shape.


def micro_batches_for_step(
    step: int, n_examples: int, batch_size: int, grad_accum: int, seed: int
) -> Iterator[list[int]]:
    """The micro-batches (index lists) optimizer step ``step`` consumes, in a flat stream over epochs."""
    per_epoch = math.ceil(n_examples / batch_size)
    for k in range(step * grad_accum, (step + 1) * grad_accum):
        epoch, within = divmod(k, per_epoch)
        yield micro_batch_order(n_examples, batch_size, seed, epoch)[within]


def total_steps(
    n_examples: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None
) -> int:
    if max_steps is not None:
        return max_steps
    per_epoch = math.ceil(n_examples / batch_size)
    return max(1, math.ceil(epochs * per_epoch / grad_accum))


def warmup_steps(steps: int, explicit: int | None, ratio: float | None) -> int:
    """Explicit steps, else a ratio; with neither, 3% of the run (a short warmup protects fresh adapters)."""
    if explicit is not None:
        return explicit
    ratio = 0.03 if ratio is None else ratio
    return int(round(ratio * steps))


def eval_interval(n_examples: int, batch_size: int, grad_accum: int, eval_every: int | None) -> int:
    if eval_every is not None:
        return eval_every
    return max(1, math.ceil(math.ceil(n_examples / batch_size) / grad_accum))


def run_steps(n_examples: int, training: Any) -> int:
    """Optimizer steps of a run over ``n_examples`` with the recipe's ``training`` section."""
    t = training
    return total_steps(n_examples, t.batch_size, t.grad_accum, t.epochs, t.max_steps)


def run_warmup(training: Any, steps: int) -> int:
    """Warmup steps of a schedule ``steps`` optimizer steps long, from the recipe's ``training`` section."""
    return warmup_steps(steps, training.warmup_steps, training.warmup_ratio)


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch, whatever its objective calls its masks."""
    return sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))


def build_optimizer(prepared: Any, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW, or the paged bitsandbytes variant a method asks for (QLoRA's memory-saving option)."""
    groups = with_learning_rates(prepared.param_groups, learning_rate)
    name = prepared.optimizer
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=learning_rate)
    import bitsandbytes as bnb  # noqa: PLC0415  (only for the paged optimizers)

    paged = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return paged[name](groups, lr=learning_rate)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, steps: int) -> Any:
    """The recipe's schedule over ``steps`` optimizer steps; ``constant`` still warms up (transformers
    calls that one ``constant_with_warmup``; its ``constant`` would ignore the warmup)."""
    name = "constant_with_warmup" if schedule == "constant" else schedule
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=steps)


# `tunelab train` exits with this code when a run diverged (documented in docs/training.md): not 2, as
# the recipe was valid, and not 1, as nothing crashed; a script or a sweep can tell it apart.
DIVERGED_EXIT = 4


class DivergedError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight: the run stops at once (no step is taken
    on it, nothing non-finite is checkpointed and no ``final/`` is written), and says where it
    stands. The manifest records the run as failed with this message."""

    def __init__(self, what: str, step: int, checkpoint: Path | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        last = (
            f"the last good checkpoint is {checkpoint}"
            if checkpoint is not None
            else "no checkpoint was saved before it"
        )
        super().__init__(
            f"diverged: {what} at step {step}; the run stopped without writing final/ and {last}. "
            "Lower training.learning_rate (or clip with training.max_grad_norm) and train again"
        )


def check_finite(run: RunDir, step: int, **values: float | None) -> None:
    """Stop the run (:class:`DivergedError`) if any of ``values`` (``loss=...``, ``grad_norm=...``)
    is NaN or infinite. Called before the optimizer steps, so the weights stay the last good ones."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise DivergedError(f"{name.replace('_', ' ')} {value}", step, run.latest_checkpoint())


def check_finite_weights(run: RunDir, model: Any, step: int) -> None:
    """Before a checkpoint or ``final/`` is written: every trainable weight is finite on every rank,
    else :class:`DivergedError` (an update too large for the dtype leaves a finite loss behind it)."""
    # a sharded (FSDP2) parameter is checked on its local shard; the sum over ranks covers the rest
    local = [getattr(p, "to_local", lambda p=p: p)().detach() for p in model.parameters() if p.requires_grad]
    bad = any(not bool(torch.isfinite(t).all()) for t in local)
    if distributed.global_sums([float(bad)])[0]:
        raise DivergedError("non-finite weights after the update", step, run.latest_checkpoint())


def clip_and_check(
    accelerator: Accelerator, model: Any, max_grad_norm: float | None, run: RunDir, step: int, loss: float
) -> float | None:
    """Before an optimizer step (``step`` is the one about to be taken): clip the gradients to
    ``max_grad_norm`` (returns their norm; None unclipped), then stop the run (:class:`DivergedError`)
    on a non-finite loss or gradient norm, so the weights stay the last good ones. Under fp16 loss
    scaling an infinite norm is the scaler's signal to skip the step and lower its scale, not a
    diverged run, so only the loss is checked there."""
    grad_norm = None
    if max_grad_norm is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
    scaled = getattr(accelerator, "scaler", None) is not None
    check_finite(run, step, loss=loss, grad_norm=None if scaled else grad_norm)
    return grad_norm


def log_row(run: RunDir, tracking: Tracking, row: dict[str, Any]) -> None:
    """One metrics row: to metrics.jsonl (the record) first, then to the trackers (views of it)."""
    run.log_metrics(row)
    tracking.log(row)


def load_base_model(
    recipe: Recipe,
    device: str,
    model_kind: str,
    model_kwargs: dict[str, Any] | None = None,
    fast: FastPath | None = None,
) -> Any:
    """The recipe's model with the head the objective asks for (offline and online runs alike), with
    the attention ``model.attention`` resolves to on this device (``fast``: already resolved)."""
    attention = (fast or recipe.fast_path(torch.device(device).type)).attention
    model, _ = load_model(
        recipe.model.name_or_path,
        dtype=recipe.model.dtype,
        device=device,
        trust_remote_code=recipe.model.trust_remote_code,
        seed=recipe.seed,
        model_cls=MODEL_CLASSES[model_kind],
        model_kwargs=model_kwargs,
        attention=attention,
    )
    return model


def apply_method(method: Any, recipe: Recipe, model: Any) -> Any:
    """The method shapes the model (which parameters learn), then the recipe's learning-rate structure
    (layer-wise decay, multipliers, gradual unfreezing) reshapes its optimizer groups."""
    prepared = method.apply(model, recipe.method, weight_decay=recipe.training.weight_decay)
    return structure_learning_rates(prepared, recipe.training)


def start_run(
    recipe: Recipe, console: Console, run_path: Path | None = None
) -> tuple[Accelerator, str, Any, Any]:
    """What every run sets up first, offline or online: seed, accelerator, device, tokenizer (with
    the chat template the objective needs) and the objective itself."""
    set_seed(recipe.seed)
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(recipe.training.mixed_precision),
        cpu=distributed.use_cpu_backend(recipe.model.device),
        **distributed.strategy_options(recipe.training, distributed.world_size_from_env()),
        **accelerator_options(recipe.training.report_to, run_path, console),
    )
    device = str(accelerator.device) if recipe.model.device == "auto" else recipe.model.device
    tokenizer = tokenizer_for(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    objective_cls = OBJECTIVES.get(recipe.objective.name).impl
    if objective_cls.uses_chat_template:
        for note in select_template(tokenizer, recipe.data.template):
            console.print(labelled("warning", note))
    return accelerator, device, tokenizer, objective_cls(recipe.objective, tokenizer, recipe.data)


def write_final(
    run: RunDir,
    model: Any,
    tokenizer: Any,
    method: Any,
    recipe: Recipe,
    objective: Any,
    *,
    is_adapter: bool,
    step: int,
    extra: Any = None,
) -> Path:
    """``final/`` for any run, offline or online: weights as the method saves them, tokenizer, and
    ``tunelab.json`` saying how to load it back; ``extra(tmp)`` adds files (e.g. PPO's value head)."""
    with reporting_disk_full(run, "final/"), atomic_directory(run.final_dir) as tmp:
        if method.save is not None:  # custom artifacts; LoRA with PiSSA/OLoRA init converts on save
            method.save(model, tmp)
        else:
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)
        atomic_write_json(
            tmp / FINAL_META,
            {
                "base_model": recipe.model.name_or_path,
                "is_adapter": is_adapter,
                "artifact": method.artifact,
                "method": recipe.method.name,
                "method_config": recipe.method.model_dump(mode="json"),
                "seed": recipe.seed,
                "objective": recipe.objective.name,
                "model_kind": objective.model_kind,
                "model_kwargs": objective.model_kwargs(),
                "step": step,
            },
        )
    return run.final_dir
