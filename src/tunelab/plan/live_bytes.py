"""Peak bytes of live tensors on any device, CPU included (which has no allocator statistics).

A ``TorchDispatchMode`` that follows every storage an op creates until it is freed. Used by the
memory-plan tests and by ``benchmarks/fused_ce.py`` to measure what a computation holds at its peak
without a GPU; on CUDA, ``torch.cuda.max_memory_allocated`` is the real thing.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storages created while active."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, weakref.ref] = {}
        self.current = self.peak = 0

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.live:
            return
        size = storage.nbytes()
        self.current += size
        self.live[key] = weakref.ref(storage, lambda _, k=key, n=size: self._free(k, n))
        self.peak = max(self.peak, self.current)

    def _free(self, key: int, size: int) -> None:
        if self.live.pop(key, None) is not None:
            self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self.track, out)
        return out
