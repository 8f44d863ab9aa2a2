"""The accelerators `tunelab plan --gpu NAME` knows: memory and dense half-precision matmul peak.

``memory_gib`` is about what ``torch.cuda.get_device_properties(0).total_memory`` reports for the
part (a little under the marketing "GB", which is 10^9 bytes and includes reserved memory);
``bf16_tflops`` / ``fp16_tflops`` are the *dense* tensor-core peaks with FP32 accumulation from the
vendor's datasheet or architecture whitepaper (the "with sparsity" figures are twice these and are
never reached by training). ``None`` means the format has no tensor-core support on that part.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    bf16_tflops: float | None
    fp16_tflops: float
    source: str

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    @property
    def supports_bf16(self) -> bool:
        return self.bf16_tflops is not None

    @property
    def half_tflops(self) -> float:
        """The peak of the half-precision format training uses here (bf16 where supported)."""
        return self.bf16_tflops if self.bf16_tflops is not None else self.fp16_tflops


GPUS: dict[str, Gpu] = {
    g.name: g
    for g in (
        Gpu(
            "h100-80gb",
            79.1,
            989.4,
            989.4,
            "NVIDIA H100 SXM5 datasheet: BF16/FP16 1,979 TFLOPS with sparsity",
        ),
        Gpu("h200-141gb", 139.8, 989.4, 989.4, "NVIDIA H200 SXM datasheet: same tensor cores as H100 SXM"),
        Gpu("a100-80gb", 79.2, 312.0, 312.0, "NVIDIA A100 datasheet: BF16/FP16 312 TFLOPS dense"),
        Gpu("a100-40gb", 39.4, 312.0, 312.0, "NVIDIA A100 datasheet: BF16/FP16 312 TFLOPS dense"),
        Gpu("l40s-48gb", 44.4, 362.1, 362.1, "NVIDIA L40S datasheet: BF16/FP16 733 TFLOPS with sparsity"),
        Gpu(
            "rtx4090-24gb",
            23.6,
            165.2,
            165.2,
            "NVIDIA Ada whitepaper, RTX 4090: FP16/BF16 tensor with FP32 accumulate 165.2 TFLOPS dense",
        ),
        Gpu(
            "rtx3090-24gb",
            23.6,
            71.0,
            71.0,
            "NVIDIA Ampere GA102 whitepaper, RTX 3090: FP16/BF16 tensor with FP32 accumulate 71 TFLOPS dense",
        ),
        Gpu("t4-16gb", 14.6, None, 65.0, "NVIDIA T4 datasheet: FP16 mixed precision 65 TFLOPS; no bf16"),
    )
}


def gpu_named(name: str) -> Gpu:
    """The table entry for ``name``; the error lists every known name."""
    key = name.strip().lower()
    if key not in GPUS:
        raise ValueError(f"--gpu: unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]
