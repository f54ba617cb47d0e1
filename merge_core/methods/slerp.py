"""SLERP: mergekit 0.1.5's slerp with the norms and the dot product cached per study.

Only the two coefficients depend on t, so a trial costs one pass: (s0 * v0) + (s1 * v1), a fused
kernel in fp32 on the CPU, torch ops a block at a time otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from merge_core import kernels
from merge_core.methods import common
from merge_core.methods.common import StudyCache, work_dtype
from merge_core.methods.registry import Method, Usage
from merge_core.planner import Source, TensorJob

_SLERP_CHUNK = 1024 * 1024  # mergekit.merge_methods.slerp._CHUNK_ELEMENTS, for identical norms


def stats(cache: StudyCache, base: Source, other: Source, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """The clamped dot product of the normalized tensors, computed exactly as mergekit's slerp does."""

    def compute() -> torch.Tensor:
        dtype = work_dtype(v0.dtype)
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
        chunks = [slice(start, start + _SLERP_CHUNK) for start in range(0, a.shape[1], _SLERP_CHUNK)]
        norm_a = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(a[:, c].to(dtype), dim=1, keepdim=True) for c in chunks]), dim=0
        )
        norm_b = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(b[:, c].to(dtype), dim=1, keepdim=True) for c in chunks]), dim=0
        )
        norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
        norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
        dot = (
            torch.stack(
                [((a[:, c].to(dtype) / norm_a) * (b[:, c].to(dtype) / norm_b)).sum(dim=1, keepdim=True) for c in chunks]
            )
            .sum(dim=0)
            .clamp(-1, 1)
        )
        return dot

    return cache.get(("slerp", base, other, v0.dtype), compute)


def merge(
    method: Method, job: TensorJob, inputs: list[torch.Tensor], cache: StudyCache, seed: int, out: torch.Tensor
) -> None:
    """mergekit slerp of the base and the other input at the job's t."""
    other = 1 - job.base
    v0, v1 = inputs[job.base], inputs[other]
    dot = stats(cache, job.sources[job.base], job.sources[other], v0, v1)
    dtype = work_dtype(v0.dtype)
    t = torch.tensor([job.shared["t"]], dtype=dtype, device=v0.device).reshape(-1, 1)
    linear_branch = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear_branch, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear_branch, 1 - t, torch.sin((1 - t) * theta) / sin_theta).reshape(())
    coef_b = torch.where(linear_branch, t, torch.sin(t * theta) / sin_theta).reshape(())
    direct = out.dtype == dtype == v0.dtype and out.is_contiguous()
    result = out.view(-1) if direct else torch.empty(v0.numel(), dtype=dtype, device=v0.device)
    a, b = v0.reshape(-1), v1.reshape(-1)
    if common.fused(v0.device, v0.dtype):
        kernels.slerp(
            a.numpy(), b.numpy(), np.float32(coef_a), np.float32(coef_b), result.numpy(), common.parts(a.numel())
        )
    else:
        spans = common.spans(a)
        term = cache.scratch.get("slerp-term", spans[0].stop, dtype)
        for span in spans:  # mergekit's (s0 * v0) + (s1 * v1), one cache-sized block at a time
            piece = term[: span.stop - span.start]
            torch.mul(a[span].to(dtype), coef_a, out=result[span])
            torch.mul(b[span].to(dtype), coef_b, out=piece)
            result[span].add_(piece)
    if not direct:
        common.store(result.reshape(v0.shape).to(v0.dtype), out)


def footprint(method: Method, job: TensorJob, dtype: torch.dtype, usage: Usage) -> None:
    """The cached dot product, and the torch path's term for one block."""
    size = work_dtype(dtype).itemsize
    usage.values += size
    if not common.fused(usage.device, dtype):
        usage.need("slerp-term", common.block(math.prod(job.shape), usage.device) * size)
