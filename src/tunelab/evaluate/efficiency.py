"""Generation speed and memory: throughput, per-request latency percentiles and peak memory.

Requests run greedily in batches of ``batch_size`` (1 = one request at a time, what a single user
sees). Latency of a request is the wall time of the ``generate`` call that served it, so every
request in a batch shares its batch's latency. Throughput is generated tokens over the summed
wall time of those calls. The clock is injectable so the arithmetic is testable without timing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from tunelab.evaluate.classify import inference
from tunelab.objectives.dpo import model_device


def generation_summary(
    batch_seconds: list[float], batch_sizes: list[int], generated_tokens: int
) -> dict[str, float]:
    """Throughput and latency percentiles (numpy's default linear interpolation) from batch timings."""
    if not batch_seconds or len(batch_seconds) != len(batch_sizes):
        raise ValueError("need one duration per batch and at least one batch")
    latencies_ms = np.repeat(np.asarray(batch_seconds, dtype=float) * 1000.0, batch_sizes)
    total = float(sum(batch_seconds))
    return {
        "tokens_per_s": generated_tokens / total if total > 0 else float("inf"),
        "latency_p50_ms": float(np.percentile(latencies_ms, 50)),
        "latency_p95_ms": float(np.percentile(latencies_ms, 95)),
        "n_requests": int(sum(batch_sizes)),
        "generated_tokens": int(generated_tokens),
    }


def stop_token_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """End-of-sequence ids from the tokenizer and the model's generation config."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    configured = configured if isinstance(configured, list) else [configured]
    return sorted({tokenizer.eos_token_id, *configured} - {None})


def count_generated(new_tokens: torch.Tensor, stop_ids: list[int]) -> int:
    """Tokens produced per row up to and including the first stop token (the rest is padding)."""
    total = 0
    for row in new_tokens.tolist():
        stops = [i for i, token in enumerate(row) if token in stop_ids]
        total += stops[0] + 1 if stops else len(row)
    return total


def peak_memory(device: torch.device) -> dict[str, float]:
    """CUDA: peak allocated tensor memory since the last reset (``peak_memory_mb``).

    Elsewhere torch has no allocator statistic, so this is the process's peak resident set size
    (``peak_rss_mb``): weights, Python and everything else the process ever held, not the growth
    caused by generation. Absent on platforms without the ``resource`` module (Windows).
    """
    if device.type == "cuda":
        return {"peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20}
    try:
        import resource  # noqa: PLC0415  (Unix only)
    except ImportError:
        return {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_mb": peak / 2**20 if sys.platform == "darwin" else peak / 1024}  # macOS: bytes


def _generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_new_tokens: int
) -> tuple[torch.Tensor, int]:
    """Greedy continuations of left-padded ``prompts`` and the padded prompt width."""
    # The prompts are final text (a rendered chat template already holds its BOS): add nothing.
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    enc = enc.to(model_device(model))
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop_token_ids(model, tokenizer) or None,
    )
    return out, enc["input_ids"].size(1)


def measure_generation(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 1,
    warmup: int = 1,
    timer: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Greedy generation speed over ``prompts``: final text, tokenized as is (render chat templates first).

    ``warmup`` untimed batches run first (kernel selection, allocator growth). Keys:
    ``tokens_per_s``, ``latency_p50_ms``, ``latency_p95_ms``, ``n_requests``, ``generated_tokens``,
    and ``peak_memory_mb`` on CUDA or ``peak_rss_mb`` elsewhere (see :func:`peak_memory`).
    """
    if not prompts:
        raise ValueError("no prompts to time; pass at least one")
    if batch_size < 1 or max_new_tokens < 1 or warmup < 0:
        raise ValueError(
            f"need batch_size >= 1, max_new_tokens >= 1, warmup >= 0; got {batch_size}, {max_new_tokens}, {warmup}"
        )
    device = model_device(model)
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    stop_ids = stop_token_ids(model, tokenizer)
    seconds: list[float] = []
    generated = 0
    with inference(model):
        for i in range(warmup):
            _generate(model, tokenizer, batches[i % len(batches)], max_new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for batch in batches:
            start = timer()
            out, width = _generate(model, tokenizer, batch, max_new_tokens)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(timer() - start)
            generated += count_generated(out[:, width:], stop_ids)
    return generation_summary(seconds, [len(b) for b in batches], generated) | peak_memory(device)
