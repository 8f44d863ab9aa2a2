"""Which waiting jobs may decode together, and the padded tensors they decode from.

A batch is one ``generate`` call, so its rows share everything ``generate`` takes once: the active
adapter (PEFT's ``set_adapter`` is global to the model) and the sampling settings. Greedy jobs
batch with greedy jobs; sampled jobs only with the same (temperature, top_p). A job with a seed runs
alone, since its sample must be the same whatever else is queued ("same seed, same sample").

Kept free of the engine's types (jobs are read by attribute) so the engine can import this module
without a cycle.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any

import torch


def batch_key(job: Any) -> Hashable | None:
    """Jobs with equal keys can share forward passes; ``None``: the job runs alone."""
    params = job.params
    if params.seed is not None:
        return None
    sampling = ("greedy",) if params.temperature == 0 else ("sample", params.temperature, params.top_p)
    return (job.adapter, sampling)


def take_batch(jobs: deque[Any], max_batch: int, context: int | None = None) -> list[Any]:
    """Pop the oldest job and up to ``max_batch - 1`` later jobs that can decode with it.

    Jobs left behind keep their order, and the oldest job always goes first, so nothing waits
    behind jobs that arrived after it for more than one batch. ``context`` (the model's positions)
    bounds the batch: every row runs for the longest row's steps after the longest prompt."""
    first = jobs.popleft()
    key = batch_key(first)
    if key is None or max_batch <= 1:
        return [first]
    batch, kept = [first], deque()
    longest, most = len(first.prompt_ids), first.params.max_tokens
    while jobs:
        job = jobs.popleft()
        fits = (
            context is None or max(longest, len(job.prompt_ids)) + max(most, job.params.max_tokens) <= context
        )
        if len(batch) < max_batch and batch_key(job) == key and fits:
            batch.append(job)
            longest, most = max(longest, len(job.prompt_ids)), max(most, job.params.max_tokens)
        else:
            kept.append(job)
    jobs.extend(kept)
    return batch


def left_pad(
    prompts: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with every prompt right-aligned, so all rows' next tokens
    sit in the same column; the model derives each row's positions from its mask."""
    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + list(p) for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)
