"""Running out of GPU memory without losing the run: smaller micro-batches, same optimizer steps.

On an out-of-memory error inside an optimizer step the engine frees what the step allocated, splits
every micro-batch of that step (and of all later steps) into twice as many consecutive chunks and
runs the step again. The examples, their order and the step number stay the same, and because the
loss of a step is normalised by the loss units of the whole step (``objectives/base.py``), the
update is the same as the one the larger micro-batches would have made: it is gradient accumulation
done twice as often. The recipe's batch schedule is untouched, so resume, evaluation intervals and
the learning-rate schedule do not move.

``training.batch_size: auto`` uses the same machinery in the other direction: the memory plan
(``plan/memory.py``) picks the largest micro-batch that should fit, and on CUDA a probe step on the
longest examples halves it until one really does.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

PLAN_DEFAULT_CPU_BATCH = 8
"""On CPU, ``auto`` never exceeds the recipe default: memory is rarely the limit there, time is."""


class OutOfMemoryAtOneExample(RuntimeError):
    """Even one example per micro-batch does not fit; the message says what to change."""


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's allocator error, or the RuntimeError text other backends (MPS, cuBLAS) raise."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


def split_indices(indices: list[int], parts: int) -> list[list[int]]:
    """``indices`` in ``parts`` consecutive chunks of near-equal size (order kept, none empty)."""
    parts = max(1, min(parts, len(indices)))
    size, extra = divmod(len(indices), parts)
    chunks, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        chunks.append(indices[start:end])
        start = end
    return chunks


def release_cached_memory() -> None:
    """Collect unreachable tensors (a failed forward's frames) and return cached blocks to CUDA."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_step_memory(optimizer: Any) -> None:
    """Drop the failed step's gradients and cached blocks so the retry starts from a clean slate."""
    optimizer.zero_grad(set_to_none=True)
    release_cached_memory()


@dataclass(frozen=True)
class OomRecovery:
    """One recovery: at ``step``, micro-batches of ``before`` examples became ``after``."""

    step: int
    split: int
    before: int
    after: int
    grad_accum: int
    error: str

    def message(self) -> str:
        return (
            f"out of memory at step {self.step}: micro-batch {self.before} → {self.after} examples, "
            f"gradient accumulation ×{self.grad_accum} (same effective batch, same data); retrying the step"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "micro_batch_before": self.before,
            "micro_batch_after": self.after,
            "grad_accum_equivalent": self.grad_accum,
            "error": self.error,
        }


def largest_chunk(batch_size: int, split: int) -> int:
    return -(-batch_size // split)


def next_split(split: int, batch_size: int, grad_accum: int, step: int, err: BaseException) -> OomRecovery:
    """The split after an OOM at ``split``: twice as many chunks, or a clear error at one example."""
    before = largest_chunk(batch_size, split)
    if before <= 1:
        raise OutOfMemoryAtOneExample(
            f"out of memory at step {step} with one example per micro-batch ({type(err).__name__}: "
            f"{str(err)[:200]}). Lower data.max_length, set training.gradient_checkpointing: true, use a "
            "smaller method footprint (lora/qlora instead of full), or a device with more memory; "
            "`tunelab plan RECIPE --gpu NAME` shows where the memory goes."
        ) from err
    new = split * 2
    after = largest_chunk(batch_size, new)
    return OomRecovery(step, new, before, after, grad_accum * new, f"{type(err).__name__}: {str(err)[:200]}")


def probe_micro_batch(start: int, try_step: Callable[[int], None], *, on_oom: Callable[[int], None]) -> int:
    """Halve ``start`` until ``try_step(size)`` runs without running out of memory; 0 if even 1 fails."""
    size = start
    while size >= 1:
        try:
            try_step(size)
            return size
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            on_oom(size)
            size //= 2
    return 0


def auto_micro_batch(
    recipe: Any, *, device: str, try_step: Callable[[int], None], say: Callable[[str], None]
) -> int:
    """``training.batch_size: auto``: the plan's largest micro-batch for this device, then (CUDA) a
    probe step at that size on the longest examples, halving until it fits."""
    from tunelab.plan.memory import largest_micro_batch, plan_inputs  # noqa: PLC0415

    inputs = plan_inputs(recipe, device="cuda" if device.startswith("cuda") else "cpu")
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info()
        capacity = free + torch.cuda.memory_allocated()  # the loaded model is ours, not a neighbour's
        planned = largest_micro_batch(inputs, capacity)
        size = probe_micro_batch(
            max(planned, 1),
            try_step,
            on_oom=lambda n: say(f"batch_size auto: {n} ran out of memory, halving"),
        )
        how = f"plan {planned} for {capacity / 2**30:.1f} GiB, probe step {'passed' if size else 'failed'}"
    else:
        planned = largest_micro_batch(inputs) if inputs.capacity is not None else PLAN_DEFAULT_CPU_BATCH
        size = min(PLAN_DEFAULT_CPU_BATCH, planned)
        how = f"on CPU auto keeps the default {PLAN_DEFAULT_CPU_BATCH} unless system RAM fits less (plan: {planned})"
    if size < 1:
        raise OutOfMemoryAtOneExample(
            f"training.batch_size: auto: not even one sequence of data.max_length={recipe.data.max_length} fits "
            "on this device; lower data.max_length or enable training.gradient_checkpointing"
        )
    say(f"batch_size auto: micro-batch {size} ({how})")
    return size
