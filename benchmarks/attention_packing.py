"""Attention on packed batches: what each backend costs for the same real tokens (issue 20, lever 1).

    python benchmarks/attention_packing.py [--shape 1b] [--micro-batch 8] [--max-length 2048]
                                           [--reps 5] [--dry-run]

One forward + backward of a randomly initialised Llama shape (bf16, every weight trainable, no
checkpointing) over the same examples (the lognormal length mix of ``gpu_sft.py``), laid out three
ways:

- ``sdpa padded``: micro-batches of 8 padded to their longest row (TRL's default layout);
- ``sdpa packed``: the same examples packed into rows of ``max_length`` with restarting position ids
  and no 2-D mask, so transformers builds a dense block-diagonal mask (SDPA's slow path on a GPU);
- ``flex packed``: the same packed rows through FlexAttention, whose document mask is a BlockMask;
- ``varlen packed``: the same packed rows through PyTorch's own variable-length FlashAttention
  (``tunelab.models.varlen``: no mask, no padding, no ``flash-attn`` package);
- ``flash packed``: the same through flash-attention 2's varlen path, where ``flash_attn`` imports.

It also checks isolation on the device: one example's logits inside a packed row equal its logits
alone (max |difference| printed). Prints real tokens/s per layout and the peak memory.
``--dry-run`` runs a tiny shape on CPU to check the script.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_sft import SHAPES, example_lengths  # noqa: E402

from tunelab.models import varlen  # noqa: E402


def batches(lengths: list[int], micro_batch: int, max_length: int, vocab: int) -> dict[str, list]:
    rng = np.random.default_rng(1)
    examples = [torch.from_numpy(rng.integers(0, vocab - 2, size=n)) for n in lengths]
    padded = []
    for i in range(0, len(examples), micro_batch):
        group = examples[i : i + micro_batch]
        width = max(len(e) for e in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for j, e in enumerate(group):
            ids[j, : len(e)], mask[j, : len(e)] = e, 1
        padded.append({"input_ids": ids, "attention_mask": mask})
    rows, current, positions = [], [], []
    for e in examples:
        if current and sum(len(c) for c in current) + len(e) > max_length:
            rows.append((torch.cat(current), torch.cat(positions)))
            current, positions = [], []
        current.append(e)
        positions.append(torch.arange(len(e)))
    rows.append((torch.cat(current), torch.cat(positions)))
    packed = []
    per_batch = max(1, micro_batch * int(np.mean(lengths)) // max_length)  # same tokens per step
    for i in range(0, len(rows), per_batch):
        group = rows[i : i + per_batch]
        width = max(len(r[0]) for r in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        pos = torch.arange(width).repeat(len(group), 1)
        for j, (r, p) in enumerate(group):
            ids[j, : len(r)], pos[j, : len(r)] = r, p
            pos[j, len(r) :] = torch.arange(width - len(r))  # padding: its own "example"
        packed.append({"input_ids": ids, "position_ids": pos, "_real": sum(len(r[0]) for r in group)})
    return {"padded": padded, "packed": packed}


def model_for(shape: str, attention: str, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, attn_implementation=attention)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16 if device == "cuda" else torch.float32).train()


def step(model: torch.nn.Module, batch: dict, device: str) -> int:
    inputs = {k: v.to(device) for k, v in batch.items() if not k.startswith("_")}
    loss = model(**inputs, use_cache=False).logits.float().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return int(batch["_real"]) if "_real" in batch else int(batch["attention_mask"].sum())


def timed(model: torch.nn.Module, layout: list[dict], device: str, reps: int) -> tuple[float, float]:
    """Real tokens/s over ``reps`` batches after two warm-up batches (compilation), and the warm-up s."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    for batch in layout[:2]:
        step(model, batch, device)
    sync()
    warm = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, tokens = time.perf_counter(), 0
    for batch in layout[2 : 2 + reps]:
        tokens += step(model, batch, device)
    sync()
    return tokens / (time.perf_counter() - start), warm


@torch.no_grad()
def isolation(model: torch.nn.Module, device: str, vocab: int) -> float:
    """max |logit difference| of a second example inside a packed row vs alone."""
    g = torch.Generator().manual_seed(3)
    a, b = (
        torch.randint(0, vocab - 2, (1, 37), generator=g),
        torch.randint(0, vocab - 2, (1, 53), generator=g),
    )
    ids = torch.cat([a, b], 1).to(device)
    pos = torch.cat([torch.arange(37), torch.arange(53)]).unsqueeze(0).to(device)
    model.eval()
    together = model(input_ids=ids, position_ids=pos, use_cache=False).logits[:, 37:].float()
    alone = model(input_ids=b.to(device), position_ids=torch.arange(53, device=device)[None], use_cache=False)
    model.train()
    return float((together - alone.logits.float()).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile is slow)")
    args = parser.parse_args()
    if args.dry_run:
        args.shape, args.max_length, args.reps, args.micro_batch = "tiny", 64, 2, 2
    device = "cuda" if torch.cuda.is_available() and not args.dry_run else "cpu"
    vocab = SHAPES[args.shape]["vocab_size"]
    lengths = [int(n) for n in example_lengths(args.micro_batch * (args.reps + 2) * 2, args.max_length, 0)]
    layouts = batches(lengths, args.micro_batch, args.max_length, vocab)
    rows = [("sdpa", "padded"), ("sdpa", "packed"), (varlen.register(), "packed")]
    rows += [("flex_attention", "packed")] if not args.no_flex else []
    if importlib.util.find_spec("flash_attn") is not None and device == "cuda":
        rows.append(("flash_attention_2", "packed"))
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(
        f"{'attention':<18} {'layout':<7} {'real tok/s':>11} {'warm-up s':>9} {'peak GiB':>9} {'isolation':>10}"
    )
    for attention, layout in rows:
        try:
            model = model_for(args.shape, attention, device)
            rate, warm = timed(model, layouts[layout], device, args.reps)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            leak = isolation(model, device, vocab)
            print(f"{attention:<18} {layout:<7} {rate:>11,.0f} {warm:>9.1f} {peak:>9.2f} {leak:>10.2e}")
        except Exception as err:  # noqa: BLE001  (a failing backend is a row, not the end of the run)
            print(f"{attention:<18} {layout:<7} failed: {type(err).__name__}: {str(err)[:200]}")
        finally:
            model = None
            if device == "cuda":
                torch.cuda.empty_cache()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
