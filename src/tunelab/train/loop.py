"""The offline training loop: :class:`Trainer` (accumulate, clip, step, log, evaluate, early-stop,
checkpoint) for every objective that learns from a fixed data set. Online objectives (PPO, GRPO)
run in ``rl.py``; ``run.py`` picks one and wraps it in the run lifecycle."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text

from tunelab.console import labelled, make_console, styled
from tunelab.data.packing import PackingUnsupported, pack_features, packing_isolates
from tunelab.evaluate.tasks import evaluate_per_task
from tunelab.methods import METHODS, Prepared, count_parameters
from tunelab.models.attention import VARLEN_ATTENTION, FastPath
from tunelab.recipe import Recipe
from tunelab.runs.manifest import update_manifest
from tunelab.runs.rundir import RunDir
from tunelab.train import distributed
from tunelab.train.activations import setup_activation_memory
from tunelab.train.checkpoint import (
    capture_rng,
    collect_checkpoint,
    load_checkpoint,
    reporting_disk_full,
    write_checkpoint,
)
from tunelab.train.common import (
    apply_method,
    build_optimizer,
    build_scheduler,
    check_finite_weights,
    clip_and_check,
    count_tokens,
    eval_interval,
    load_base_model,
    log_row,
    micro_batches_for_step,
    run_steps,
    run_warmup,
    start_run,
    write_final,
)
from tunelab.train.continual import EwcHook, mix_replay
from tunelab.train.data import PreparedSplit, prepare_split, split_notes
from tunelab.train.oom import (
    auto_micro_batch,
    free_step_memory,
    is_out_of_memory,
    next_split,
    release_cached_memory,
    split_indices,
)
from tunelab.train.preflight import run_preflight
from tunelab.train.progress import StepProgress
from tunelab.train.speed import (
    CompiledLayers,
    KernelChoice,
    apply_liger,
    choose_kernels,
    compile_decoder_layers,
)
from tunelab.train.tracking import Tracking


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


def improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


class Trainer:
    """Holds the pieces of one run; :meth:`fit` is the loop."""

    def __init__(
        self, recipe: Recipe, run: RunDir, console: Console | None = None, eval_tasks: list[Any] | None = None
    ) -> None:
        # the set-up steps depend on each other in this order: data before the model (the objective
        # prepares the model with the encoded features), the model before the optimizer
        self.recipe = recipe
        self.run = run
        self.console = console or make_console(stderr=True)
        device = self._setup_data()
        prepared = self._setup_model(device)
        self._setup_optimization(prepared)
        self.state = LoopState()
        self.oom_recoveries: list[dict[str, Any]] = []
        self.last_eval: tuple[int, dict[str, float]] | None = None
        self.eval_tasks = eval_tasks or []
        # on_eval(step, metrics, last) after each evaluation (last: no training follows); a sweep's pruner
        self.on_eval: Callable[[int, dict[str, float], bool], None] | None = None
        # last: trackers start only once every check passed, so a refused run leaves none open
        self.tracking = Tracking.start(self.accelerator, run.path, self.recipe.resolved(), self.console)

    def _setup_data(self) -> str:
        """Seed, accelerator, tokenizer and objective; the encoded splits, checked by the pre-flight
        audit (rank 0 only). Returns the device the model goes to."""
        recipe, run = self.recipe, self.run
        self.accelerator, device, self.tokenizer, self.objective = start_run(recipe, self.console, run.path)
        self.writes = distributed.writes_files(run)
        if not self.writes:
            self.console = make_console(quiet=True)
        self.train_split, self.eval_split = self._prepare_data()
        if self.writes:
            run_preflight(recipe.data, self.train_split, self.eval_split, run.path, self.console)
        return device

    def _setup_model(self, device: str) -> Prepared:
        """The model with the objective's head, shaped by the method; checkpointing and packing."""
        recipe = self.recipe
        fast = recipe.fast_path(torch.device(device).type)  # refuses a kernel that cannot run
        model = load_base_model(
            recipe, device, self.objective.model_kind, self.objective.model_kwargs(), fast
        )
        # kernels before the method: Liger patches the transformers modules, LoRA then wraps their linears
        self.kernels = self._apply_kernels(model, device)
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
        self._setup_activations(prepared.model, device)
        self._report_fast_path(prepared.model, fast)
        if fast.packing:
            self._pack(prepared.model, flat=fast.attention in VARLEN_ATTENTION)
        if self.kernels.name == "liger" and hasattr(self.objective, "use_liger_cross_entropy"):
            self.console.print(Text(f"kernels: {self.objective.use_liger_cross_entropy(prepared.model)}"))
        # compile last: the layers it compiles are the ones the method and checkpointing have shaped
        self.compiled = self._compile(prepared.model, device) if recipe.training.compile else None
        self.trainable, self.total_params = count_parameters(prepared.model)
        return prepared

    def _setup_activations(self, model: Any, device: str) -> None:
        """Checkpointing (one decoder layer in ``checkpoint_every``) and activation offload, said on
        the console when on and recorded in the manifest either way."""
        training = self.recipe.training
        self.activations = setup_activation_memory(
            model,
            checkpointing=training.gradient_checkpointing,
            every=training.checkpoint_every,
            offload=training.offload_activations,
            device=device,
        )
        if self.activations.checkpointed:
            self.console.print(Text(self.activations.describe()))
        self._record_in_manifest(activation_memory=self.activations.manifest())

    def _apply_kernels(self, model: Any, device: str) -> KernelChoice:
        """``training.kernels``: Liger's kernels where they apply (said on the console and in the manifest)."""
        choice = choose_kernels(self.recipe.training.kernels, model, device)
        if choice.name == "liger":
            applied = apply_liger(model)
            self.console.print(Text(f"kernels: liger ({', '.join(applied)}) on {type(model).__name__}"))
        elif self.recipe.training.kernels == "auto":
            self.console.print(labelled("note", f"kernels: none ({choice.reason})"))
        self._record_in_manifest(kernels=choice.manifest())
        return choice

    def _compile(self, model: Any, device: str) -> CompiledLayers:
        compiled = compile_decoder_layers(model, device)
        self.console.print(Text(compiled.describe()))
        self._record_in_manifest(compile=compiled.summary())
        return compiled

    def _record_in_manifest(self, **fields: Any) -> None:
        if self.writes and self.run.manifest_path.exists():
            update_manifest(self.run.manifest_path, **fields)

    def _setup_optimization(self, prepared: Prepared) -> None:
        """Batch size (``auto`` probed now), sharding, optimizer, schedule, accelerate wrapping, EWC."""
        recipe = self.recipe
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
        self.steps = run_steps(len(self.train_split.features), recipe.training)
        self.scheduler = build_scheduler(
            optimizer, recipe.training.lr_scheduler, run_warmup(recipe.training, self.steps), self.steps
        )
        self.model, self.optimizer = distributed.prepare(
            self.accelerator, prepared.model, optimizer, strategy
        )
        if recipe.training.ewc is not None:
            self.hooks.append(self._ewc_hook(recipe.training.ewc))

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
            for note in split_notes(split, self.run.path, data.max_length):
                self.console.print(labelled("note", note))
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

    def _report_fast_path(self, model: Any, fast: FastPath) -> None:
        """One line (and the manifest) saying which attention and packing the run uses, and why."""
        recipe = self.recipe
        in_effect = fast.attention or model.config._attn_implementation
        self.console.print(Text(fast.describe(recipe.model.attention, recipe.data.packing, in_effect)))
        reasons = {"attention": fast.attention_why, "packing": fast.packing_why}
        self._record_in_manifest(
            attention=in_effect,
            packing=fast.packing,
            fast_path_reasons={k: v for k, v in reasons.items() if v},
        )

    def _pack(self, model: Any, *, flat: bool) -> None:
        """Pack the training split; ``flat``: each micro-batch becomes one padding-free row (the
        varlen attention paths, see data/packing.py)."""
        if not packing_isolates(model, len(self.tokenizer)):
            raise PackingUnsupported(
                f"data.packing: {type(model).__name__} with attention '{model.config._attn_implementation}' lets "
                "packed examples attend to each other; set data.packing: false (or use an attention backend "
                "that honours position-id restarts, e.g. sdpa or flash_attention_2 on a recent transformers)"
            )
        before = len(self.train_split.features)
        self.train_split.features = pack_features(self.train_split.features, self.recipe.data.max_length)
        self.objective.flat_packs = flat
        layout = ", each micro-batch one padding-free row" if flat else ""
        self.console.print(
            Text(
                f"packing: {before} examples in {len(self.train_split.features)} sequences "
                f"of at most {self.recipe.data.max_length} tokens{layout}"
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
        cfg = self.recipe.training
        for whole in micro_batches_for_step(
            self.state.step, len(self.train_split.features), cfg.batch_size, cfg.grad_accum, self.recipe.seed
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
        max_norm = self.recipe.training.max_grad_norm
        step = self.state.step + 1
        grad_norm = clip_and_check(self.accelerator, self.model, max_norm, self.run, step, loss_total / units)
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
        cfg = self.recipe.training
        every = eval_interval(len(self.train_split.features), cfg.batch_size, cfg.grad_accum, cfg.eval_every)
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
        every = cfg.save_every or eval_interval(
            len(self.train_split.features), cfg.batch_size, cfg.grad_accum, cfg.eval_every
        )
        if not force and self.state.step % every:
            return
        if distributed.agreed(self.run.checkpoint_dir(self.state.step).exists()):
            return
        check_finite_weights(self.run, self.model, self.state.step)
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
                step_started = time.perf_counter()
                row = self.train_step()
                self._time_compiled_step(time.perf_counter() - step_started)
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
        if self.compiled is not None:
            self._record_in_manifest(compile=self.compiled.summary())
            line = self.compiled.final_line()
            if line:
                self.console.print(Text(line))
        if self.state.stopped_early:
            self.console.print(
                Text(
                    f"early stop at step {self.state.step}: no {cfg.early_stopping.metric} improvement "
                    f"for {cfg.early_stopping.patience} evaluations "
                    f"(best {self.state.best_metric:.4f} at step {self.state.best_step})"
                )
            )
        return losses

    def _time_compiled_step(self, seconds: float) -> None:
        """With training.compile, each step's time: the first one's extra time is the compile cost."""
        if self.compiled is None:
            return
        line = self.compiled.record_step(seconds)
        if line:
            self.console.print(Text(line))

    def save_final(self) -> Path:
        """Write ``final/``: PEFT adapter or full model (safetensors), tokenizer, and how to load it."""
        check_finite_weights(self.run, self.model, self.state.step)
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
