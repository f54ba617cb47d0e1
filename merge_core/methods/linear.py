"""Linear: mergekit 0.1.5's weighted sum, written into the candidate's tensor; nothing to cache."""

from __future__ import annotations

import torch

from merge_core.methods import common
from merge_core.methods.common import StudyCache, work_dtype
from merge_core.methods.registry import Method, Usage
from merge_core.planner import TensorJob


def merge(
    method: Method, job: TensorJob, inputs: list[torch.Tensor], cache: StudyCache, seed: int, out: torch.Tensor
) -> None:
    """mergekit linear: sum of w_i * x_i in fp32 (addcmul, in input order), / sum w if normalize."""
    first = inputs[0]
    dtype = work_dtype(first.dtype)
    weight = torch.tensor([[job.per_input["weight"][s.model] for s in job.sources]], dtype=dtype, device=first.device)
    coefficient_shape = (1,) * first.ndim
    result = out if out.dtype == dtype == first.dtype else torch.empty(first.shape, dtype=dtype, device=first.device)
    result.zero_()
    for tensor, coefficient in zip(inputs, weight.unbind(1)):
        result.addcmul_(tensor, coefficient.reshape(coefficient_shape))
    if job.shared["normalize"]:
        result.div_(weight.sum(dim=1).reshape(coefficient_shape))
    common.store(result.to(first.dtype), out)


def footprint(method: Method, job: TensorJob, dtype: torch.dtype, usage: Usage) -> None:
    """Linear keeps no study values and no scratch: its temporaries are the merge's own."""
