"""Loss-layer memory and time: logits + cross-entropy (what transformers' models and TRL compute) against
tunelab's fused chunked loss, on the output layers of real model shapes, in the same run.

    python benchmarks/fused_ce.py [--device cpu|cuda] [--tokens 1024] [--repeats 3]

For each shape it times forward + backward of the loss layer alone (hidden states → summed loss →
gradients for the hidden states, and for the output weight when it trains) and measures the peak of
live tensor bytes (``LiveBytes`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA). It prints a
table; speed on a CPU says little about a GPU, the memory column carries over.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from tunelab.data.templates import IGNORE_INDEX
from tunelab.objectives.fused_ce import fused_linear_cross_entropy_sum
from tunelab.objectives.losses import causal_lm_loss_sum
from tunelab.plan.live_bytes import LiveBytes

SHAPES = {  # name: (hidden, vocab)
    "SmolLM2-135M": (576, 49152),
    "Llama-3.2-1B": (2048, 128256),
}


def plain(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return causal_lm_loss_sum(hidden @ weight.t(), labels)[0]


def fused(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return fused_linear_cross_entropy_sum(hidden, weight, labels)[0]


def inputs(hidden_size: int, vocab: int, tokens: int, device: str, dtype: torch.dtype, train_head: bool):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, hidden_size, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.02).to(device, dtype)
    weight.requires_grad_(train_head)
    labels = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)
    labels[0, : tokens // 4] = IGNORE_INDEX  # a prompt without loss
    return hidden, weight, labels


def peak_bytes(run: Callable[[], None], device: str, existing: list[torch.Tensor]) -> int:
    """Peak bytes the step adds on top of ``existing`` (its inputs)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with LiveBytes() as tracker:
        for tensor in existing:  # registered first, so views of them (weight.t()) are not new memory
            tracker.track(tensor)
        before = tracker.current
        tracker.peak = before
        run()
    return tracker.peak - before


def measure(loss_fn: Callable, shape: tuple[int, int], args: argparse.Namespace, train_head: bool) -> dict:
    hidden, weight, labels = inputs(*shape, args.tokens, args.device, getattr(torch, args.dtype), train_head)

    def step() -> None:
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        hidden.grad = weight.grad = None

    step()  # warm-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak": peak_bytes(step, args.device, [hidden, weight, labels])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    table = Table(title=f"loss layer, {args.tokens} tokens, {args.dtype}, {args.device}: fwd + bwd")
    for column in ("shape", "head trains", "contender", "peak MiB", "seconds", "peak vs plain"):
        table.add_column(column, justify="left" if column in ("shape", "contender") else "right")
    for name, shape in SHAPES.items():
        for train_head in (False, True):
            base = measure(plain, shape, args, train_head)
            ours = measure(fused, shape, args, train_head)
            for contender, result in (("logits + CE (transformers/TRL)", base), ("tunelab fused", ours)):
                table.add_row(
                    name,
                    "yes" if train_head else "no (LoRA)",
                    contender,
                    f"{result['peak'] / 2**20:,.0f}",
                    f"{result['seconds']:.3f}",
                    f"{result['peak'] / base['peak']:.2f}×",
                )
    Console().print(table)


if __name__ == "__main__":
    main()
