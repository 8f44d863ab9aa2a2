"""The online RL loop (objectives ``ppo`` and ``grpo``): sample prompts → generate → score → update.

The algorithm is the objective's (:class:`~tunelab.objectives.online.OnlineObjective`): its group
size, passes per rollout, advantages, minibatch loss, value head and KL schedule; this module
samples, scores, runs the updates it asks for, checkpoints and logs.

One *step* is one rollout batch: ``training.batch_size`` prompts (× ``num_generations`` for GRPO)
are completed by the policy, scored by the reward source, and then learned from for a few passes
(``ppo_epochs`` / ``num_iterations``), each split into ``num_minibatches`` optimizer steps.
``training.max_steps`` counts rollout steps (default: ``epochs`` passes over the prompts).

The reference model for the KL penalty is the policy with its adapter disabled for PEFT methods
(no second copy in memory), otherwise a frozen copy of the model taken before training. Dropout is
off throughout: the probability ratio π/π_old must be exactly 1 before the first update.

Everything else follows the offline engine: the same run directory, metrics rows, atomic
checkpoints (``train/checkpoint.py``, with the value head and the adaptive KL coefficient), resume
from the last complete checkpoint, and the same ``final/`` layout (plus ``value_head.safetensors``
for PPO).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.text import Text
from safetensors.torch import save_file
from torch import nn
from transformers import GenerationConfig

from tunelab.console import labelled, make_console
from tunelab.methods import METHODS, count_parameters
from tunelab.objectives.rl_losses import (
    entropy_from_logits,
    equal_reward_groups,
    kl_estimate,
    masked_mean,
    soft_overlong_penalty,
    token_logprobs,
)
from tunelab.objectives.sft import accepts_logits_to_keep, prepends_virtual_tokens
from tunelab.recipe import Recipe
from tunelab.runs.rundir import RunDir
from tunelab.train import distributed
from tunelab.train.checkpoint import load_checkpoint, reporting_disk_full, save_checkpoint
from tunelab.train.common import (
    TrainResult,
    apply_method,
    build_optimizer,
    build_scheduler,
    check_finite_weights,
    clip_and_check,
    eval_interval,
    load_base_model,
    log_row,
    micro_batches_for_step,
    run_steps,
    run_warmup,
    start_run,
    write_final,
)
from tunelab.train.data import prepare_split, raw_rows
from tunelab.train.lifecycle import Outcome, run_lifecycle
from tunelab.train.progress import StepProgress
from tunelab.train.rewards import Rewards
from tunelab.train.tracking import Tracking

VALUE_HEAD = "value_head.safetensors"


class ValueHead(nn.Module):
    """V(s_t) from the policy's last hidden state: one linear layer, computed in fp32.

    Zero-initialised: a random head's values vary per token by far more than typical rewards do,
    and that noise would swamp the first advantages; V = 0 starts PPO as REINFORCE.
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.float()).squeeze(-1)


class PolicyWithValue(nn.Module):
    """Policy and optional value head under one module, so checkpoints and the optimizer see both."""

    def __init__(self, policy: nn.Module, value_head: ValueHead | None) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = value_head


@dataclass
class RlState:
    """Loop state saved in every checkpoint."""

    step: int = 0
    kl_coef: float = 0.0
    completions_seen: int = 0
    draws: int = 0  # rollout batches of prompts drawn so far (more than steps with dynamic sampling)


@dataclass
class Rollout:
    """One batch of sampled completions with everything the updates need (no gradients)."""

    prompt_ids: torch.Tensor  # (B, P), left padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # (B, T), pad after the end
    mask: torch.Tensor  # (B, T) float, 1 on completion tokens up to and including EOS
    scores: torch.Tensor  # (B,)
    old_logp: torch.Tensor
    entropy: torch.Tensor
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    reward_parts: dict[str, torch.Tensor] | None = None  # each reward source's own scores, for the logs

    def select(self, index: torch.Tensor) -> Rollout:
        fields = {k: (v[index] if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        if self.reward_parts is not None:
            fields["reward_parts"] = {k: v[index] for k, v in self.reward_parts.items()}
        return Rollout(**fields)


def concat_rollouts(batches: list[Rollout], pad_id: int) -> Rollout:
    """One rollout of several: prompts left padded, completions and per-token tensors right padded
    (padding has mask 0, so no loss or statistic sees it)."""
    if len(batches) == 1:
        return batches[0]
    prompt_width = max(b.prompt_ids.size(1) for b in batches)
    width = max(b.completion_ids.size(1) for b in batches)

    def cat(name: str, value: float, left: bool = False) -> torch.Tensor | None:
        parts = [getattr(b, name) for b in batches]
        if parts[0] is None:
            return None
        size = prompt_width if left else width
        padded = [
            torch.nn.functional.pad(p, (size - p.size(1), 0) if left else (0, size - p.size(1)), value=value)
            for p in parts
        ]
        return torch.cat(padded)

    parts = None
    if batches[0].reward_parts is not None:
        parts = {k: torch.cat([b.reward_parts[k] for b in batches]) for k in batches[0].reward_parts}
    return Rollout(
        prompt_ids=cat("prompt_ids", pad_id, left=True),
        prompt_mask=cat("prompt_mask", 0, left=True),
        completion_ids=cat("completion_ids", pad_id),
        mask=cat("mask", 0.0),
        scores=torch.cat([b.scores for b in batches]),
        old_logp=cat("old_logp", 0.0),
        entropy=cat("entropy", 0.0),
        ref_logp=cat("ref_logp", 0.0),
        values=cat("values", 0.0),
        reward_parts=parts,
    )


def completion_mask(completions: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after it."""
    if eos_id is None:
        return torch.ones_like(completions, dtype=torch.float)
    is_eos = completions == eos_id
    after = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return (~after).float()


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
        mask[i, width - len(seq) :] = 1
    return ids, mask


class OnlineTrainer:
    """Holds the pieces of one online run; :meth:`fit` is the loop."""

    def __init__(self, recipe: Recipe, run: RunDir, console: Console) -> None:
        _check_supported(recipe)
        self.recipe, self.run, self.console = recipe, run, console
        self.cfg = recipe.objective
        self.accelerator, device, self.tokenizer, self.objective = start_run(recipe, console, run.path)
        self.prompts = prepare_split(
            recipe.data.train,
            self.objective,
            recipe.data,
            dropped_path=run.path / "dropped.jsonl",
            rejects_path=run.path / "rejects.jsonl",
        )
        self.rows = raw_rows(recipe.data.train, recipe.data)
        if recipe.data.eval:
            console.print(
                labelled("note", f"data.eval is not used by objective {self.cfg.name} (prompts only)")
            )
        model = load_base_model(recipe, device, "causal_lm")
        self.method = METHODS.get(recipe.method.name).impl
        kl_weight = self.objective.kl_weight
        self.reference: nn.Module | None = None
        if kl_weight > 0 and self.method.artifact != "peft":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        prepared = apply_method(self.method, recipe, model)
        self.is_adapter = prepared.is_adapter
        self.hooks = prepared.hooks
        # with no KL weight the reference is still cheap for PEFT (adapter off), so KL is still reported
        self.use_reference = kl_weight > 0 or hasattr(prepared.model, "disable_adapter")
        value_head = None
        if self.objective.value_head:
            value_head = ValueHead(prepared.model.config.hidden_size).to(self.accelerator.device)
            prepared.param_groups = [
                *prepared.param_groups,
                {"params": list(value_head.parameters()), "weight_decay": 0.0, "group": "value_head"},
            ]
        self.model = PolicyWithValue(prepared.model, value_head)
        self.model.eval()
        self.trainable, self.total_params = count_parameters(self.model)
        self.steps = run_steps(len(self.prompts.features), recipe.training)
        optimizer_steps = self.steps * self.passes * self.cfg.num_minibatches
        optimizer = build_optimizer(prepared, recipe.training.learning_rate)
        self.scheduler = build_scheduler(
            optimizer,
            recipe.training.lr_scheduler,
            run_warmup(recipe.training, optimizer_steps),
            optimizer_steps,
        )
        # prepared for fp16 loss scaling; the model is not wrapped (generation needs it bare)
        self.optimizer = self.accelerator.prepare(optimizer)
        self.optimizer_steps = optimizer_steps
        self.reward = Rewards.from_config(self.cfg, device=self.accelerator.device)
        self.state = RlState(kl_coef=kl_weight)
        # last: trackers start only once every check passed, so a refused run leaves none open
        self.tracking = Tracking.start(self.accelerator, run.path, recipe.resolved(), console)

    @property
    def policy(self) -> nn.Module:
        return self.model.policy

    @property
    def passes(self) -> int:
        return self.objective.passes

    @property
    def group(self) -> int:
        return self.objective.group

    def resume_from(self, checkpoint: Path) -> None:
        loop = load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)
        self.state = RlState(**{"draws": loop["step"], **loop})  # older checkpoints: one draw per step
        self.run.truncate_metrics_after(self.state.step)
        self.console.print(Text(f"resumed from {checkpoint} at step {self.state.step}/{self.steps}"))

    # -- rollouts -------------------------------------------------------------------------------

    def forward(
        self, model: nn.Module, batch: Rollout, *, with_values: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-token log-probs (at the sampling temperature), entropies and values of the completions."""
        ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)
        mask = torch.cat([batch.prompt_mask, batch.mask.long()], dim=1)
        width = batch.completion_ids.size(1)
        kwargs: dict[str, Any] = {}
        if not prepends_virtual_tokens(model):
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        if accepts_logits_to_keep(model):
            kwargs["logits_to_keep"] = width + 1
        with self.accelerator.autocast():
            out = model(
                input_ids=ids,
                attention_mask=mask,
                use_cache=False,
                output_hidden_states=with_values,
                **kwargs,
            )
        logits = out.logits[:, -(width + 1) : -1].float() / self.cfg.temperature
        logp = token_logprobs(logits, batch.completion_ids)
        entropy = entropy_from_logits(logits.detach())
        values = None
        if with_values:
            values = self.model.value_head(out.hidden_states[-1][:, -(width + 1) : -1])
        return logp, entropy, values

    @torch.no_grad()
    def rollout(self, features: list[dict[str, Any]]) -> Rollout:
        """Sample completions for ``features`` (each ``group`` times), score them, and record the
        log-probs, reference log-probs and values the updates compare against."""
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        features = [f for f in features for _ in range(self.group)]
        prompt_ids, prompt_mask = left_pad([f["prompt_ids"] for f in features], pad)
        prompt_ids, prompt_mask = (
            prompt_ids.to(self.accelerator.device),
            prompt_mask.to(self.accelerator.device),
        )
        generation = GenerationConfig(
            do_sample=True,
            temperature=self.cfg.temperature,
            top_p=self.cfg.top_p,
            top_k=0,
            max_new_tokens=self.cfg.max_new_tokens,
            pad_token_id=pad,
            eos_token_id=eos,
            bos_token_id=self.tokenizer.bos_token_id,
        )
        sequences = self.policy.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=generation
        )
        completions = sequences[:, prompt_ids.size(1) :]
        mask = completion_mask(completions, eos)
        completions = torch.where(mask.bool(), completions, torch.full_like(completions, pad))
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        total, parts = self.reward(
            [f["prompt_text"] for f in features],
            texts,
            [f["messages"] for f in features],
            [self.rows.get(f["row"], {}) for f in features],
        )
        scores = torch.tensor(total, dtype=torch.float, device=self.accelerator.device)
        scores, mask = self.length_rules(completions, mask, scores)
        batch = Rollout(prompt_ids, prompt_mask, completions, mask, scores, old_logp=scores, entropy=scores)
        if self.reward.several:
            batch.reward_parts = {k: torch.tensor(v).to(scores) for k, v in parts.items()}
        batch.old_logp, batch.entropy, batch.values = self.forward(
            self.policy, batch, with_values=self.objective.value_head
        )
        if self.use_reference:
            batch.ref_logp = self.reference_logp(batch)
        return batch

    def length_rules(
        self, completions: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Completions that ran out of tokens: ``missing_eos_penalty``, the soft overlong penalty
        (``overlong_buffer``) and ``mask_truncated_completions`` (left out of the loss)."""
        eos = self.tokenizer.eos_token_id
        truncated = ~(completions == eos).any(dim=1) if eos is not None else torch.zeros_like(scores).bool()
        if self.cfg.missing_eos_penalty is not None and eos is not None:
            scores = scores - self.cfg.missing_eos_penalty * truncated.float()
        if getattr(self.cfg, "overlong_buffer", None) is not None:
            lengths = mask.sum(dim=1)
            scores = scores + soft_overlong_penalty(
                lengths, self.cfg.max_new_tokens, self.cfg.overlong_buffer, self.cfg.overlong_penalty
            )
        if getattr(self.cfg, "mask_truncated_completions", False):
            mask = mask * (~truncated).unsqueeze(1).float()
        return scores, mask

    def reference_logp(self, batch: Rollout) -> torch.Tensor:
        if self.reference is not None:
            return self.forward(self.reference, batch)[0]
        with self.policy.disable_adapter():
            return self.forward(self.policy, batch)[0]

    # -- updates --------------------------------------------------------------------------------

    def minibatch_loss(
        self,
        batch: Rollout,
        advantages: torch.Tensor,
        returns: torch.Tensor | None,
        num_items: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective's loss on fresh log-probs (and values) of the policy for ``batch``."""
        logp, _, values = self.forward(self.policy, batch, with_values=self.objective.value_head)
        loss, stats = self.objective.minibatch_loss(logp, values, batch, advantages, returns, num_items)
        return loss, {k: float(v.detach()) for k, v in stats.items()}

    def train_step(self) -> dict[str, float]:
        """One rollout batch and its ``passes × num_minibatches`` optimizer steps."""
        cfg = self.recipe.training
        batch, extra = self.collect()
        advantages, returns, more = self.objective.advantages(batch, self.state.kl_coef)
        extra.update(more)
        # dapo / cispo: each minibatch's loss sum over the rollout batch's tokens per optimizer step
        num_items = batch.mask.sum() / self.cfg.num_minibatches
        sums: dict[str, float] = {}
        n_updates = 0
        lr = self.scheduler.get_last_lr()[0]
        for _ in range(self.passes):
            order = torch.randperm(batch.scores.size(0), device=batch.scores.device)
            for index in order.chunk(self.cfg.num_minibatches):
                for hook in self.hooks:
                    hook.on_step_start(self.policy, self.scheduler.last_epoch, self.optimizer_steps)
                loss, stats = self.minibatch_loss(
                    batch.select(index),
                    advantages[index],
                    None if returns is None else returns[index],
                    num_items,
                )
                self.accelerator.backward(loss)
                step, loss_value = self.state.step + 1, float(loss.detach())
                clip_and_check(self.accelerator, self.model, cfg.max_grad_norm, self.run, step, loss_value)
                self.optimizer.step()
                for hook in self.hooks:
                    hook.before_zero_grad(self.policy, self.scheduler.last_epoch, self.optimizer_steps)
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                for key, value in {"loss": loss_value, **stats}.items():
                    sums[key] = sums.get(key, 0.0) + value
                n_updates += 1
        kl = (
            float((kl_estimate(batch.old_logp, batch.ref_logp, "k1") * batch.mask).sum(1).mean())
            if batch.ref_logp is not None
            else 0.0
        )
        row = {
            "step": self.state.step + 1,
            **{k: v / n_updates for k, v in sums.items()},
            "reward_mean": float(batch.scores.mean()),
            "reward_std": float(batch.scores.std()) if batch.scores.numel() > 1 else 0.0,
            "kl": kl,
            "entropy": float(masked_mean(batch.entropy, batch.mask)),
            "completion_length": float(batch.mask.sum(1).mean()),
            "lr": lr,
            **extra,
            **{f"reward/{k}": float(v.mean()) for k, v in (batch.reward_parts or {}).items()},
        }
        if self.objective.adapts_kl:
            row["kl_coef"] = self.state.kl_coef
        self.state.kl_coef = self.objective.next_kl_coef(self.state.kl_coef, kl, batch.scores.numel())
        self.state.step += 1
        self.state.completions_seen += batch.scores.numel()
        return row

    def draw(self) -> Rollout:
        """The next rollout batch of prompts in the engine's shuffled epoch order."""
        (indices,) = micro_batches_for_step(
            self.state.draws,
            len(self.prompts.features),
            self.recipe.training.batch_size,
            1,
            self.recipe.seed,
        )
        self.state.draws += 1
        return self.rollout([self.prompts.features[i] for i in indices])

    def collect(self) -> tuple[Rollout, dict[str, float]]:
        """One step's rollout; with dynamic sampling, groups whose rewards are all equal are dropped
        and the batch refilled from the next prompts (up to ``max_refills`` more draws)."""
        batch = self.draw()
        if not getattr(self.cfg, "dynamic_sampling", False):
            return batch, {}
        wanted, drawn, useful_groups, refills = self.recipe.training.batch_size, 0, 0, 0
        kept: list[Rollout] = []
        while True:
            useful = ~equal_reward_groups(batch.scores, self.group)
            drawn, useful_groups = drawn + useful.numel(), useful_groups + int(useful.sum())
            groups = useful.nonzero().squeeze(1)
            index = (
                groups.unsqueeze(1) * self.group + torch.arange(self.group, device=groups.device)
            ).reshape(-1)
            if index.numel():
                kept.append(batch.select(index))
            have = sum(b.scores.numel() for b in kept) // self.group
            if have >= wanted or refills >= self.cfg.max_refills:
                break
            batch, refills = self.draw(), refills + 1
        if not kept:  # nothing to learn from in any draw: train on the last one (its advantages are 0)
            kept = [batch]
        merged = concat_rollouts(kept, self.tokenizer.pad_token_id)
        keep = torch.arange(min(merged.scores.numel(), wanted * self.group), device=merged.scores.device)
        merged = merged.select(keep)
        stats = {"groups_with_signal": useful_groups / drawn, "refills": float(refills)}
        return merged, stats

    def maybe_checkpoint(self, force: bool = False) -> None:
        cfg = self.recipe.training
        every = cfg.save_every or eval_interval(
            len(self.prompts.features), cfg.batch_size, cfg.grad_accum, cfg.eval_every
        )
        if (not force and self.state.step % every) or self.run.checkpoint_dir(self.state.step).exists():
            return
        check_finite_weights(self.run, self.model, self.state.step)
        step = self.state.step
        with (
            reporting_disk_full(self.run, f"checkpoint step-{step}"),
            self.run.writing_checkpoint(step) as tmp,
        ):
            save_checkpoint(tmp, self.model, self.optimizer, self.scheduler, asdict(self.state))
        self.run.prune_checkpoints(cfg.keep_checkpoints)

    def fit(self) -> list[float]:
        losses: list[float] = []
        started = time.perf_counter()
        every = self.recipe.training.log_every
        completions_at_start = self.state.completions_seen
        with StepProgress(self.console, self.cfg.name, self.steps, self.state.step, every) as progress:
            while self.state.step < self.steps:
                row = self.train_step()
                losses.append(row["loss"])
                row["seconds"] = time.perf_counter() - started
                if self.state.step % self.recipe.training.log_every == 0 or self.state.step == self.steps:
                    log_row(self.run, self.tracking, row)
                self.maybe_checkpoint()
                rate = (self.state.completions_seen - completions_at_start) / max(row["seconds"], 1e-9)
                info = (
                    f"loss {row['loss']:.4f}  reward {row['reward_mean']:.3f}  kl {row['kl']:.3f}  "
                    f"entropy {row['entropy']:.2f}  lr {row['lr']:.2e}  {rate:.1f} completions/s"
                )
                progress.update(self.state.step, info)
        return losses

    def save_final(self) -> Path:
        """``final/`` in the offline engine's layout, plus the value head for PPO."""
        check_finite_weights(self.run, self.model, self.state.step)

        def value_head(tmp: Path) -> None:
            if self.model.value_head is not None:
                state = self.model.value_head.state_dict()
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / VALUE_HEAD))

        return write_final(
            self.run,
            self.policy,
            self.tokenizer,
            self.method,
            self.recipe,
            self.objective,
            is_adapter=self.is_adapter,
            step=self.state.step,
            extra=value_head,
        )


def _check_supported(recipe: Recipe) -> None:
    """Offline-only settings are errors here rather than silently ignored."""
    problems = []
    t, d = recipe.training, recipe.data
    if t.grad_accum != 1:
        problems.append("training.grad_accum: online RL uses objective.num_minibatches instead; set it to 1")
    if t.ewc is not None:
        problems.append("training.ewc is not supported with online objectives")
    if t.early_stopping is not None:
        problems.append("training.early_stopping is not supported with online objectives")
    if d.tasks or d.replay is not None or d.split is not None:
        problems.append(
            "data.tasks / data.replay / data.split are not supported with online objectives; give data.train"
        )
    if problems:
        raise ValueError(f"objective {recipe.objective.name}: " + "; ".join(problems))


def run_online(
    recipe: Recipe, run: RunDir, console: Console | None = None, *, resume: bool = False
) -> TrainResult:
    """Train with an online objective into ``run``; records how it ended in its manifest.

    The caller has written the recipe and manifest (as the engine's ``_execute`` does for every run);
    the lifecycle (status, trackers, plot, report) is the engine's, from ``train/lifecycle.py``.
    """
    console = console or make_console(stderr=True)

    def setup() -> OnlineTrainer:
        distributed.refuse_several_processes(f"objective {recipe.objective.name}")
        trainer = OnlineTrainer(recipe, run, console)
        checkpoint = run.latest_checkpoint() if resume else None
        if checkpoint is not None:
            trainer.resume_from(checkpoint)
        console.print(
            Text(
                f"run {run.path}: {trainer.trainable:,} of {trainer.total_params:,} parameters train, "
                f"{trainer.steps} rollout steps of {recipe.training.batch_size * trainer.group} completions"
            )
        )
        return trainer

    trainer, outcome = run_lifecycle(run, setup=setup, body=_train_and_save, fresh=not resume)
    return TrainResult(
        run.path, outcome.steps, outcome.losses, outcome.final_eval, False, outcome.data_summary
    )


def _train_and_save(trainer: OnlineTrainer) -> Outcome:
    losses = trainer.fit()
    trainer.maybe_checkpoint(force=True)
    trainer.save_final()
    rows = [r for r in trainer.run.read_metrics() if "reward_mean" in r]
    final = {k: rows[-1][k] for k in ("reward_mean", "kl") if rows}
    return Outcome(trainer.state.step, losses, final, False, {"train": trainer.prompts.summary()})
