"""The training engine: one readable loop that runs any method × objective pair on accelerate.

Order of a run: run directory → tokenizer and objective → data (encoded by the objective, checked
by the pre-flight audit) → model with the head the objective asks for → method (which parameters
learn) → optimizer and schedule → loop (accumulate, clip, step, log, evaluate, early-stop,
checkpoint) → final model. Online objectives (PPO, GRPO) go to ``train/rl.py`` instead. A killed run resumes from its last complete checkpoint and
continues with exactly the same batches, learning rates and random numbers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.text import Text
from transformers import get_scheduler

from tunelab.console import labelled, make_console, styled
from tunelab.data.mixing import load_task, mix_tasks, tag_row, write_mixture
from tunelab.data.packing import PackingUnsupported, pack_features, packing_isolates
from tunelab.data.templates import select_template
from tunelab.evaluate.tasks import evaluate_per_task
from tunelab.methods import METHODS, count_parameters
from tunelab.methods.lr_structure import structure_learning_rates
from tunelab.models.load import MODEL_CLASSES, load_model, tokenizer_for
from tunelab.objectives import OBJECTIVES
from tunelab.recipe import Recipe, parse_recipe
from tunelab.runs.atomic import atomic_directory, atomic_write_json
from tunelab.runs.manifest import build_manifest, update_manifest
from tunelab.runs.rundir import RunDir
from tunelab.train import distributed
from tunelab.train.checkpoint import (
    capture_rng,
    collect_checkpoint,
    load_checkpoint,
    reporting_disk_full,
    write_checkpoint,
)
from tunelab.train.continual import EwcHook, mix_replay
from tunelab.train.data import PreparedSplit, prepare_split
from tunelab.train.lifecycle import Outcome, run_lifecycle
from tunelab.train.oom import (
    auto_micro_batch,
    free_step_memory,
    is_out_of_memory,
    next_split,
    release_cached_memory,
    split_indices,
)
from tunelab.train.preflight import materialise_split, run_preflight
from tunelab.train.progress import StepProgress
from tunelab.train.tracking import Tracking, accelerator_options

FINAL_META = "tunelab.json"


@dataclass
class LoopState:
    """Everything besides weights/optimizer/RNG needed to continue a run exactly."""

    step: int = 0
    tokens_seen: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    micro_batch_split: int = 1
    """Chunks each recipe micro-batch runs in; doubled by every out-of-memory recovery (train/oom.py)."""


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


def micro_batches_for_step(step: int, n_examples: int, cfg: Any, seed: int) -> Iterator[list[int]]:
    """The micro-batches (index lists) optimizer step ``step`` consumes, in a flat stream over epochs."""
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    for k in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
        epoch, within = divmod(k, per_epoch)
        yield micro_batch_order(n_examples, cfg.batch_size, seed, epoch)[within]


def total_steps(n_examples: int, cfg: Any) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    per_epoch = math.ceil(n_examples / cfg.batch_size)
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def warmup_steps(cfg: Any, steps: int) -> int:
    """Explicit steps, else a ratio; with neither, 3% of the run (a short warmup protects fresh adapters)."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    ratio = 0.03 if cfg.warmup_ratio is None else cfg.warmup_ratio
    return int(round(ratio * steps))


def eval_interval(cfg: Any, n_examples: int) -> int:
    if cfg.eval_every is not None:
        return cfg.eval_every
    return max(1, math.ceil(math.ceil(n_examples / cfg.batch_size) / cfg.grad_accum))


@torch.no_grad()
def evaluate_loss(
    model: Any, objective: Any, features: list[dict[str, Any]], batch_size: int, device: Any
) -> dict[str, float]:
    """Token-weighted loss and perplexity over ``features`` (the objective's own loss)."""
    was_training = model.training
    model.eval()
    loss_sum, units = 0.0, 0
    extra = WeightedMeans()
    for start in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in objective.collate(features[start : start + batch_size]).items()}
        out = objective.loss(model, batch)
        loss_sum += float(out.loss_sum)
        units += int(out.n_units)
        extra.add(out.metrics, int(out.n_units))
    model.train(was_training)
    loss = loss_sum / max(units, 1)
    metrics = {"eval_loss": loss}
    if getattr(objective, "units_are_tokens", True):
        metrics["eval_perplexity"] = math.exp(min(loss, 50.0))
    return metrics | {f"eval_{k}": v for k, v in extra.means().items()}


class WeightedMeans:
    """Averages of an objective's per-batch metrics (accuracy, margins, ...), weighted by loss units."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, metrics: dict[str, float], weight: float) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value) * weight
            self.weights[key] = self.weights.get(key, 0.0) + weight

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k]}

    @classmethod
    def combined(cls, parts: list[WeightedMeans]) -> WeightedMeans:
        """One average over several processes' parts, weighted as if one process had seen it all."""
        total = cls()
        for part in parts:
            for key, value in part.sums.items():
                total.sums[key] = total.sums.get(key, 0.0) + value
                total.weights[key] = total.weights.get(key, 0.0) + part.weights[key]
        return total


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real (non-padding) tokens of a batch, whatever its objective calls its masks."""
    return sum(int(v.sum()) for k, v in batch.items() if k.endswith("attention_mask"))


def build_optimizer(prepared: Any, learning_rate: float) -> torch.optim.Optimizer:
    """AdamW, or the paged bitsandbytes variant a method asks for (QLoRA's memory-saving option)."""
    name = prepared.notes.get("optimizer", "adamw")
    if name == "adamw":
        return torch.optim.AdamW(prepared.param_groups, lr=learning_rate)
    import bitsandbytes as bnb  # noqa: PLC0415  (only for the paged optimizers)

    paged = {"paged_adamw_8bit": bnb.optim.PagedAdamW8bit, "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}
    return paged[name](prepared.param_groups, lr=learning_rate)


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


def log_row(run: RunDir, tracking: Tracking, row: dict[str, Any]) -> None:
    """One metrics row: to metrics.jsonl (the record) first, then to the trackers (views of it)."""
    run.log_metrics(row)
    tracking.log(row)


def load_base_model(
    recipe: Recipe, device: str, model_kind: str, model_kwargs: dict[str, Any] | None = None
) -> Any:
    """The recipe's model with the head the objective asks for (offline and online runs alike)."""
    model, _ = load_model(
        recipe.model.name_or_path,
        dtype=recipe.model.dtype,
        device=device,
        trust_remote_code=recipe.model.trust_remote_code,
        seed=recipe.seed,
        model_cls=MODEL_CLASSES[model_kind],
        model_kwargs=model_kwargs,
    )
    return model


def apply_method(method: Any, recipe: Recipe, model: Any) -> Any:
    """The method shapes the model (which parameters learn), then the recipe's learning-rate structure
    (layer-wise decay, multipliers, gradual unfreezing) reshapes its optimizer groups."""
    prepared = method.apply(
        model,
        recipe.method,
        learning_rate=recipe.training.learning_rate,
        weight_decay=recipe.training.weight_decay,
    )
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


class Trainer:
    """Holds the pieces of one run; :meth:`fit` is the loop."""

    def __init__(
        self, recipe: Recipe, run: RunDir, console: Console | None = None, eval_tasks: list[Any] | None = None
    ) -> None:
        self.recipe = recipe
        self.run = run
        self.console = console or make_console(stderr=True)
        self.accelerator, device, self.tokenizer, self.objective = start_run(recipe, self.console, run.path)
        self.writes = distributed.writes_files(run)
        if not self.writes:
            self.console = make_console(quiet=True)
        self.train_split, self.eval_split = self._prepare_data()
        if self.writes:
            run_preflight(recipe.data, self.train_split, self.eval_split, run.path, self.console)
        model = load_base_model(recipe, device, self.objective.model_kind, self.objective.model_kwargs())
        self.method = METHODS.get(recipe.method.name).impl
        prepared = apply_method(self.method, recipe, model)
        self.objective.adapt_to(prepared.model)
        self.objective.prepare(
            prepared.model, self.train_split.features, self.eval_split.features if self.eval_split else []
        )
        self.is_adapter = prepared.is_adapter
        self.hooks = prepared.hooks
        for key, value in prepared.notes.items():
            self.console.print(labelled("note", f"{key}: {value}"))
        if recipe.training.gradient_checkpointing:
            # transformers 5 renamed gradient checkpointing to activation checkpointing (old name warns)
            prepared.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
            if hasattr(prepared.model, "enable_input_require_grads"):
                prepared.model.enable_input_require_grads()
        if recipe.data.packing:
            self._pack(prepared.model)
        self.trainable, self.total_params = count_parameters(prepared.model)
        if recipe.training.batch_size == "auto":
            recipe = self.recipe = self._resolve_auto_batch(prepared.model)
        strategy = distributed.strategy_in_effect(recipe.training.distributed, self.accelerator.num_processes)
        self._unsharded_twin = None
        if strategy == "fsdp":
            self._unsharded_twin = distributed.unsharded_twin(prepared.model)
            distributed.shard_fsdp2(
                prepared, recipe.training.distributed.fsdp, self.accelerator.mixed_precision
            )
        optimizer = build_optimizer(prepared, recipe.training.learning_rate)
        self.steps = total_steps(len(self.train_split.features), recipe.training)
        self.scheduler = get_scheduler(
            "constant_with_warmup"
            if recipe.training.lr_scheduler == "constant"
            else recipe.training.lr_scheduler,
            optimizer,
            num_warmup_steps=warmup_steps(recipe.training, self.steps),
            num_training_steps=self.steps,
        )
        self.model, self.optimizer = distributed.prepare(
            self.accelerator, prepared.model, optimizer, strategy
        )
        if recipe.training.ewc is not None:
            self.hooks.append(self._ewc_hook(recipe.training.ewc))
        self.state = LoopState()
        self.oom_recoveries: list[dict[str, Any]] = []
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.eval_tasks = eval_tasks or []
        # on_eval(step, metrics, last) after each evaluation (last: no training follows); a sweep's pruner
        self.on_eval: Callable[[int, dict[str, float], bool], None] | None = None
        # last: trackers start only once every check passed, so a refused run leaves none open
        self.tracking = Tracking.start(self.accelerator, run.path, recipe.resolved(), self.console)

    def _run_file(self, name: str) -> Path | None:
        """Where a side file of the run goes; None on ranks other than 0 (one writer per file)."""
        return self.run.path / name if self.writes else None

    def _prepare_data(self) -> tuple[PreparedSplit, PreparedSplit | None]:
        data = self.recipe.data
        train = prepare_split(
            data.train,
            self.objective,
            data,
            dropped_path=self._run_file("dropped.jsonl"),
            rejects_path=self._run_file("rejects.jsonl"),
        )
        if data.replay is not None:
            old = prepare_split(data.replay.path, self.objective, data).features
            before = len(train.features)
            train.features = mix_replay(train.features, old, data.replay.fraction, seed=self.recipe.seed)
            self.console.print(
                Text(f"replay: {len(train.features) - before} example(s) of {data.replay.path} mixed in")
            )
        evaluation = None
        if data.eval:
            evaluation = prepare_split(
                data.eval,
                self.objective,
                data,
                dropped_path=self._run_file("dropped.jsonl"),
                rejects_path=self._run_file("rejects.jsonl"),
            )
        for split in filter(None, (train, evaluation)):
            if split.dropped or split.rows_rejected:
                self.console.print(
                    labelled(
                        "note",
                        f"{split.path}: {len(split.dropped)} example(s) dropped and {split.rows_rejected} "
                        f"malformed row(s) rejected; reasons in {self.run.path}/dropped.jsonl and rejects.jsonl",
                    )
                )
            if split.truncated:
                self.console.print(
                    labelled(
                        "note",
                        f"{split.path}: {split.truncated} example(s) truncated to data.max_length={data.max_length}",
                    )
                )
        return train, evaluation

    def _ewc_hook(self, ewc: Any) -> EwcHook:
        """Fisher information on the previous task, anchored at the weights this run starts from
        (built before any resume, so a resumed run keeps the same anchor)."""
        previous = prepare_split(ewc.previous_data, self.objective, self.recipe.data).features
        return EwcHook.from_previous_task(
            self.accelerator.unwrap_model(self.model),
            self.objective,
            previous,
            ewc.lambda_,
            batch_size=ewc.batch_size,
            n_batches=ewc.batches,
        )

    def _pack(self, model: Any) -> None:
        if not packing_isolates(model, len(self.tokenizer)):
            raise PackingUnsupported(
                f"data.packing: {type(model).__name__} with attention '{model.config._attn_implementation}' lets "
                "packed examples attend to each other; set data.packing: false (or use an attention backend "
                "that honours position-id restarts, e.g. sdpa or flash_attention_2 on a recent transformers)"
            )
        before = len(self.train_split.features)
        self.train_split.features = pack_features(self.train_split.features, self.recipe.data.max_length)
        self.console.print(
            Text(
                f"packing: {before} examples in {len(self.train_split.features)} sequences "
                f"of at most {self.recipe.data.max_length} tokens"
            )
        )

    def resume_from(self, checkpoint: Path) -> None:
        loop = load_checkpoint(
            checkpoint,
            self.accelerator.unwrap_model(self.model),
            self.optimizer,
            self.scheduler,
            rank=self.accelerator.process_index,
        )
        self.state = LoopState(**loop)
        self.run.truncate_metrics_after(self.state.step)
        self.console.print(Text(f"resumed from {checkpoint} at step {self.state.step}/{self.steps}"))

    def _batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        features = [self.train_split.features[i] for i in indices]
        return {k: v.to(self.accelerator.device) for k, v in self.objective.collate(features).items()}

    def _local_batches(self) -> list[tuple[dict[str, torch.Tensor], float]]:
        """This rank's share of each micro-batch of the step, with weight 1. A rank whose share is
        empty runs one example of the micro-batch with weight 0, so it still joins the gradient sync."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        batches = []
        for whole in micro_batches_for_step(
            self.state.step, len(self.train_split.features), self.recipe.training, self.recipe.seed
        ):
            for ix in split_indices(whole, self.state.micro_batch_split):
                share = distributed.shard_micro_batch(ix, rank, world)
                batches.append((self._batch(share or ix[:1]), 1.0 if share else 0.0))
        return batches

    def _resolve_auto_batch(self, model: Any) -> Recipe:
        """The recipe with ``training.batch_size: auto`` replaced by the micro-batch chosen for this
        device (a resumed run reuses the one its manifest recorded, so the data order is unchanged)."""
        recipe = self.recipe.model_copy(deep=True)
        chosen = self.run.read_manifest().get("auto_batch_size") if self.run.manifest_path.exists() else None
        if chosen is None:
            chosen = auto_micro_batch(
                recipe,
                device=str(self.accelerator.device),
                try_step=lambda size: self._probe_step(model, size),
                say=lambda text: self.console.print(Text(text)),
            )
            if self.writes and self.run.manifest_path.exists():
                update_manifest(self.run.manifest_path, auto_batch_size=chosen)
        recipe.training.batch_size = int(chosen)
        return recipe

    def _probe_step(self, model: Any, size: int) -> None:
        """Forward and backward on the ``size`` longest training examples; gradients dropped after."""
        features = self.train_split.features
        longest = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))[:size]
        try:
            with self.accelerator.autocast():
                out = self.objective.loss(model, self._batch(longest))
            out.loss_sum.backward()
        finally:
            model.zero_grad(set_to_none=True)
            release_cached_memory()

    def train_step(self) -> dict[str, float]:
        """One optimizer step; on out-of-memory, the same step again with micro-batches split in two
        (same examples, same order, same update: the loss is normalised over the whole step)."""
        rng = torch.get_rng_state()
        while True:
            try:
                return self._attempt_step()
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                self._recover_from_oom(err)
                torch.set_rng_state(rng)

    def _recover_from_oom(self, err: BaseException) -> None:
        cfg = self.recipe.training
        recovery = next_split(
            self.state.micro_batch_split, cfg.batch_size, cfg.grad_accum, self.state.step, err
        )
        free_step_memory(self.optimizer)
        self.state.micro_batch_split = recovery.split
        self.console.print(styled(recovery.message(), "yellow"))
        self.oom_recoveries.append(recovery.as_dict())
        if self.writes and self.run.manifest_path.exists():
            update_manifest(self.run.manifest_path, oom_recoveries=self.oom_recoveries)

    def _attempt_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches, normalised by their total loss units
        over all ranks, so N processes make the same update (and log the same loss) as one."""
        cfg = self.recipe.training
        batches = self._local_batches()
        for hook in self.hooks:
            hook.on_step_start(self.accelerator.unwrap_model(self.model), self.state.step, self.steps)
        world = self.accelerator.num_processes
        units = max(distributed.global_sums([sum(self.objective.units(b) for b, w in batches if w)])[0], 1)
        loss_total = 0.0
        tokens = 0
        extra = WeightedMeans()
        for i, (batch, weight) in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                with self.accelerator.autocast():
                    out = self.objective.loss(self.model, batch)
                # ranks' gradients are averaged (DDP, FSDP, DeepSpeed): × world makes the average a sum
                self.accelerator.backward(out.loss_sum * weight * world / units)
            if weight:
                loss_total += float(out.loss_sum.detach())
                tokens += count_tokens(batch)
                extra.add(out.metrics, int(out.n_units))
        if world > 1:
            loss_total, tokens = distributed.global_sums([loss_total, tokens])
            tokens = int(tokens)
            extra = WeightedMeans.combined(distributed.gathered(extra))
        for hook in self.hooks:
            penalty = hook.penalty(self.accelerator.unwrap_model(self.model))
            if penalty is not None:
                self.accelerator.backward(penalty)
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        for hook in self.hooks:
            hook.before_zero_grad(self.accelerator.unwrap_model(self.model), self.state.step, self.steps)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.tokens_seen += tokens
        row = {
            "step": self.state.step,
            "loss": loss_total / units,
            "lr": lr,
            "tokens": tokens,
            **extra.means(),
        }
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        if self.state.micro_batch_split > 1:
            row["micro_batch_split"] = self.state.micro_batch_split
        return row

    def maybe_evaluate(self, final: bool = False) -> dict[str, float] | None:
        if self.eval_split is None:
            return None
        if self.last_eval is not None and self.last_eval[0] == self.state.step:
            return self.last_eval[1]
        every = eval_interval(self.recipe.training, len(self.train_split.features))
        if not final and self.state.step % every:
            return None
        metrics = evaluate_loss(
            self.model,
            self.objective,
            self.eval_split.features,
            self.recipe.eval.batch_size,
            self.accelerator.device,
        )
        if self.eval_tasks:
            metrics |= evaluate_per_task(
                self.model,
                self.objective,
                self.eval_tasks,
                loss=evaluate_loss,
                batch_size=self.recipe.eval.batch_size,
                device=self.accelerator.device,
                tag_template=self.recipe.data.mixing.tag,
            )
        log_row(self.run, self.tracking, {"step": self.state.step, **metrics})
        self.last_eval = (self.state.step, metrics)
        self._update_early_stopping(metrics)
        if self.on_eval is not None:
            self.on_eval(self.state.step, metrics, self.state.step >= self.steps)
        return metrics

    def _update_early_stopping(self, metrics: dict[str, float]) -> None:
        rule = self.recipe.training.early_stopping
        if rule is None:
            return
        if rule.metric not in metrics:
            raise KeyError(
                f"training.early_stopping.metric: {rule.metric!r} is not computed; use one of {sorted(metrics)}"
            )
        value = metrics[rule.metric]
        if improved(value, self.state.best_metric, rule.mode, rule.min_delta):
            self.state.best_metric, self.state.best_step = value, self.state.step
            self.state.evals_without_improvement = 0
        else:
            self.state.evals_without_improvement += 1
            self.state.stopped_early = self.state.evals_without_improvement >= rule.patience

    def maybe_checkpoint(self, force: bool = False) -> None:
        cfg = self.recipe.training
        every = cfg.save_every or eval_interval(cfg, len(self.train_split.features))
        if not force and self.state.step % every:
            return
        if distributed.agreed(self.run.checkpoint_dir(self.state.step).exists()):
            return
        # every rank takes part in collecting (sharded weights are gathered); rank 0 writes
        contents = collect_checkpoint(
            self.accelerator.unwrap_model(self.model),
            self.optimizer,
            self.scheduler,
            vars(self.state),
            rng_per_rank=distributed.gathered(capture_rng()) if self.accelerator.num_processes > 1 else None,
        )
        if self.writes:
            step = self.state.step
            with (
                reporting_disk_full(self.run, f"checkpoint step-{step}"),
                self.run.writing_checkpoint(step) as tmp,
            ):
                write_checkpoint(tmp, contents)
            self.run.prune_checkpoints(cfg.keep_checkpoints)
        distributed.barrier()

    def fit(self) -> list[float]:
        """The loop. Returns the per-step training losses of this process (resumed steps excluded)."""
        losses: list[float] = []
        self.model.train()
        started = time.perf_counter()
        tokens_at_start = self.state.tokens_seen
        cfg = self.recipe.training
        with StepProgress(self.console, "train", self.steps, self.state.step, cfg.log_every) as progress:
            while self.state.step < self.steps and not self.state.stopped_early:
                row = self.train_step()
                losses.append(row["loss"])
                elapsed = max(time.perf_counter() - started, 1e-9)
                row["tokens_per_s"] = (self.state.tokens_seen - tokens_at_start) / elapsed
                if self.state.step % self.recipe.training.log_every == 0 or self.state.step == self.steps:
                    log_row(self.run, self.tracking, row)
                evaluation = self.maybe_evaluate()
                self.maybe_checkpoint()
                info = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['tokens_per_s']:.0f} tok/s"
                if evaluation:
                    info += f"  eval_loss {evaluation['eval_loss']:.4f}"
                progress.update(self.state.step, info)
        if self.state.stopped_early:
            self.console.print(
                Text(
                    f"early stop at step {self.state.step}: no {cfg.early_stopping.metric} improvement "
                    f"for {cfg.early_stopping.patience} evaluations "
                    f"(best {self.state.best_metric:.4f} at step {self.state.best_step})"
                )
            )
        return losses

    def save_final(self) -> Path:
        """Write ``final/``: PEFT adapter or full model (safetensors), tokenizer, and how to load it."""
        model = distributed.consolidated(self.accelerator.unwrap_model(self.model), self._unsharded_twin)
        if self.writes:
            write_final(
                self.run,
                model,
                self.tokenizer,
                self.method,
                self.recipe,
                self.objective,
                is_adapter=self.is_adapter,
                step=self.state.step,
            )
        distributed.barrier()
        return self.run.final_dir


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


def train(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    console: Console | None = None,
    on_eval: Callable[[int, dict[str, float], bool], None] | None = None,
) -> TrainResult:
    """Start a new run from a recipe (fails if the run exists, unless ``overwrite``); ``on_eval(step,
    metrics, last)`` is called after each evaluation and may raise to stop the run (a sweep's pruner).

    The run directory is locked while this process trains it; if the run fails before training
    starts (bad data, pre-flight, model, method), the directory is removed again."""
    run = distributed.open_run_dir(
        recipe.output.dir, recipe.output.name or "run", device=recipe.model.device, overwrite=overwrite
    )
    try:
        try:
            run.write_recipe(recipe.resolved())
        except BaseException:
            run.discard()
            raise
        return _execute(recipe, run, console=console, resume=False, on_eval=on_eval)
    finally:
        run.release()


def resume(run_path: str | Path, *, console: Console | None = None) -> TrainResult:
    """Continue a run from its last complete checkpoint, with the recipe it was started with."""
    path = Path(run_path)
    run = distributed.open_run_dir(path.parent, path.name, device=distributed.saved_device(path), resume=True)
    try:
        recipe = parse_recipe(run.read_recipe(), source=str(run.recipe_path))
        return _execute(recipe, run, console=console, resume=True)
    finally:
        run.release()


def materialise_tasks(recipe: Recipe, run_path: Path) -> tuple[Recipe, list[Any]]:
    """``data.tasks``: mix the tasks into one training file (and one eval file for the overall
    eval loss) inside the run directory; return the recipe pointing at them and the per-task evals."""
    recipe = recipe.model_copy(deep=True)
    data, mixing = recipe.data, recipe.data.mixing
    fmt = data.format
    tasks = [load_task(t.name, t.train, t.weight, fmt, data.columns or None) for t in data.tasks]
    mixed = mix_tasks(
        tasks, temperature=mixing.temperature, total=mixing.total, seed=recipe.seed, tag_template=mixing.tag
    )
    data.train = str(write_mixture(mixed, run_path / "data" / "mixture.jsonl")[0])
    eval_tasks = [load_task(t.name, t.eval, 1.0, fmt, data.columns or None) for t in data.tasks if t.eval]
    if eval_tasks:
        tagged = [
            (t.name, tag_row(r, mixing.tag.format(task=t.name)) if mixing.tag else r)
            for t in eval_tasks
            for r in t.rows
        ]
        data.eval = str(write_mixture(tagged, run_path / "data" / "eval_mixture.jsonl")[0])
    data.format, data.columns, data.tasks = "auto", {}, None  # the written rows are canonical
    return recipe, eval_tasks


def _execute(
    recipe: Recipe, run: RunDir, *, console: Console | None, resume: bool, on_eval: Any = None
) -> TrainResult:
    console = console or make_console(stderr=True)
    data_files = [Path(p) for p in (recipe.data.train, recipe.data.eval) if p and Path(p).exists()]
    if not resume or not run.manifest_path.exists():
        run.write_manifest(
            build_manifest(
                recipe=recipe.resolved(), data_files=data_files, seed=recipe.seed, run_name=run.name
            )
        )
    if OBJECTIVES.get(recipe.objective.name).impl.online:
        from tunelab.train.rl import run_online  # noqa: PLC0415  (rl imports this module)

        return run_online(recipe, run, console, resume=resume)
    trainer, outcome = run_lifecycle(
        run,
        setup=lambda: _set_up(recipe, run, console, resume=resume, on_eval=on_eval),
        body=_train_and_save,
        fresh=not resume,
    )
    return TrainResult(
        run.path,
        outcome.steps,
        outcome.losses,
        outcome.final_eval,
        outcome.stopped_early,
        outcome.data_summary,
    )


def _set_up(recipe: Recipe, run: RunDir, console: Console, *, resume: bool, on_eval: Any) -> Trainer:
    """Everything before the first step: data (split, mixed), trainer, resume point."""
    if recipe.data.split is not None:
        recipe = recipe.model_copy(deep=True)
        with distributed.main_process_first():  # rank 0 writes the split; the others find it
            recipe.data.train, recipe.data.eval = materialise_split(recipe.data, run.path)
        recipe.data.split = None
    eval_tasks = None
    if recipe.data.tasks:
        recipe, eval_tasks = materialise_tasks(recipe, run.path)
    trainer = Trainer(recipe, run, console, eval_tasks=eval_tasks)
    trainer.on_eval = on_eval
    checkpoint = run.latest_checkpoint() if resume else None
    if checkpoint is not None:
        trainer.resume_from(checkpoint)
    share = 100 * trainer.trainable / max(trainer.total_params, 1)
    trainer.console.print(
        Text(
            f"run {run.path}: {trainer.trainable:,} of {trainer.total_params:,} parameters train "
            f"({share:.2f}%), {trainer.steps} steps"
        )
    )
    return trainer


def _train_and_save(trainer: Trainer) -> Outcome:
    losses = trainer.fit()
    final_eval = trainer.maybe_evaluate(final=True) or {}
    trainer.maybe_checkpoint(force=True)
    trainer.save_final()
    summary = {"train": trainer.train_split.summary()}
    if trainer.eval_split is not None:
        summary["eval"] = trainer.eval_split.summary()
    return Outcome(trainer.state.step, losses, final_eval, trainer.state.stopped_early, summary)
