"""What every fast path shares: the per-study cache, reused buffers, seeds, and how a tensor is cut.

The fast paths read ``CPU_BLOCK``, ``KERNEL_MIN_SPAN`` and ``block`` through this module at call
time, so changing them here changes how every family walks a tensor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Hashable

import numba
import torch

from merge_core.parents import Parents
from merge_core.planner import Source

CPU_BLOCK = 1 << 18  # elements per torch block on the CPU (1 MiB in fp32): a block of every model stays in cache
KERNEL_MIN_SPAN = 1 << 16  # elements: a tensor under this runs its kernel on one thread


def tensor_seed(seed: int, *names: str) -> int:
    """A 63-bit seed that depends only on the trial seed and the names, never on call order."""
    digest = hashlib.blake2b("\0".join((str(seed), *names)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Scratch:
    """Grow-only flat buffers, one per slot, reused from tensor to tensor and trial to trial."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.buffers: dict[tuple, torch.Tensor] = {}

    def get(self, slot: Hashable, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buffer = self.buffers.get((slot, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self.buffers[(slot, dtype)] = torch.empty(numel, dtype=dtype, device=self.device)
        return buffer[:numel]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class StudyCache:
    """Values that depend only on the parents; kept where the parents are kept.

    ``get`` memoizes any such value by key; the families add their own (magnitude ranks, SLERP
    statistics) through it.
    """

    def __init__(self, parents: Parents) -> None:
        self.parents = parents
        self.values: dict[tuple, torch.Tensor] = {}
        self.scratch = Scratch(parents.device)

    @property
    def values_nbytes(self) -> int:
        return sum(value.numel() * value.element_size() for value in self.values.values())

    def get(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self.values:
            self.values[key] = compute().to(self.parents.store_device)
        value = self.values[key]
        return value.to(self.parents.device) if self.parents.streamed else value

    def task_vector(self, base: Source, model: Source, base_t: torch.Tensor, model_t: torch.Tensor) -> torch.Tensor:
        return self.get(("tau", base, model, base_t.dtype), lambda: model_t - base_t)

    def l1(self, base: Source, model: Source, tau: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.get(("l1", base, model, tau.dtype, dtype), lambda: tau.to(dtype).abs().sum())


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """What mergekit's linear and slerp compute in: fp64 stays fp64, the rest is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def fused(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether merge_core.kernels' fused passes build a tensor: fp32 on the CPU. numba has no bf16
    or fp16 arithmetic to repeat torch's per-op rounding with, so other dtypes, and GPUs, run
    torch ops."""
    return device.type == "cpu" and dtype == torch.float32


def parts(numel: int) -> int:
    """Spans a kernel splits a tensor into: a few per numba thread (one dispatch costs little next
    to a span), one for a tensor under KERNEL_MIN_SPAN elements."""
    return max(1, min(2 * numba.get_num_threads(), numel // KERNEL_MIN_SPAN))


def block(numel: int, device: torch.device) -> int:
    """Elements per torch block: cache-sized on the CPU, the whole tensor on a GPU."""
    return max(1, numel if device.type != "cpu" else min(numel, CPU_BLOCK))


def spans(flat: torch.Tensor) -> list[slice]:
    """The blocks a torch path walks."""
    numel = flat.numel()
    size = block(numel, flat.device)
    return [slice(start, min(numel, start + size)) for start in range(0, max(numel, 1), size)]


def store(result: torch.Tensor, out: torch.Tensor) -> None:
    if result.data_ptr() != out.data_ptr():
        out.copy_(result)
