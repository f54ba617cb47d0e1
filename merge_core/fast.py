"""Fast paths for the methods a search spends its time in, equal to mergekit's formulas.

Each function repeats mergekit 0.1.5's arithmetic op for op (same dtypes, same reductions), so
results match its API bit for bit, but moves everything that does not depend on the trial's
parameters into a per-study cache:
- task vectors tau = model - base (task_arithmetic, ties, dare_*);
- per-tensor magnitude ranks, so any TIES density becomes `rank < k` with mergekit's exact
  top-k count k = max(1, int(density * numel)) and mergekit's own tie order (its argsort);
- L1 norms of the task vectors (DARE rescale numerator);
- SLERP norms and normalized dot products, so a new t costs one fused pass.
DARE masks are drawn from a generator seeded by (trial seed, tensor, model): the same config and
seed give the same weights whatever order tensors are built in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
from mergekit import merge_methods
from mergekit.sparsify import SparsificationMethod

from merge_core.parents import Parents
from merge_core.planner import Source, TensorJob

FAST_METHODS = frozenset({"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear"})
_SLERP_CHUNK = 1024 * 1024  # mergekit.merge_methods.slerp._CHUNK_ELEMENTS, for identical norms
_RESCALE_EPS = 1e-7  # mergekit.sparsify.rescaled_masked_tensor's eps


def tensor_seed(seed: int, *names: str) -> int:
    """A 63-bit seed that depends only on the trial seed and the names, never on call order."""
    digest = hashlib.blake2b("\0".join((str(seed), *names)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dare_keep(shape: Sequence[int], density: float, seed: int, job: TensorJob, model: str,
              device: torch.device) -> torch.Tensor:
    """Bernoulli(density) keep mask for one task vector, reproducible from (seed, tensor, model)."""
    generator = torch.Generator(device).manual_seed(tensor_seed(seed, job.name, model))
    return torch.rand(tuple(shape), generator=generator, device=device) < density


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class StudyCache:
    """Values that depend only on the parents; kept where the parents are kept."""

    def __init__(self, parents: Parents) -> None:
        self.parents = parents
        self.values: dict[tuple, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        return sum(value.numel() * value.element_size() for value in self.values.values())

    def _get(self, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key not in self.values:
            self.values[key] = compute().to(self.parents.store_device)
        value = self.values[key]
        return value.to(self.parents.device) if self.parents.streamed else value

    def task_vector(self, base: Source, model: Source, base_t: torch.Tensor,
                    model_t: torch.Tensor) -> torch.Tensor:
        return self._get(("tau", base, model, base_t.dtype), lambda: model_t - base_t)

    def magnitude_rank(self, base: Source, model: Source, tau: torch.Tensor) -> torch.Tensor:
        def rank() -> torch.Tensor:
            magnitude = tau.abs().reshape(-1)
            if magnitude.device.type == "cpu":
                magnitude = magnitude.float()  # as mergekit.sparsify.magnitude does
            order = torch.argsort(magnitude, descending=True)
            ranks = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
            ranks[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
            return ranks.reshape(tau.shape)
        return self._get(("rank", base, model, tau.dtype), rank)

    def l1(self, base: Source, model: Source, tau: torch.Tensor) -> torch.Tensor:
        return self._get(("l1", base, model, tau.dtype), lambda: tau.abs().sum())

    def slerp_stats(self, base: Source, other: Source, v0: torch.Tensor, v1: torch.Tensor
                    ) -> torch.Tensor:
        """[norm0, norm1, dot] computed exactly as mergekit's slerp does for one output tensor."""
        def stats() -> torch.Tensor:
            dtype = _work_dtype(v0.dtype)
            a, b = v0.reshape(1, -1), v1.reshape(1, -1)
            chunks = [slice(start, start + _SLERP_CHUNK) for start in range(0, a.shape[1], _SLERP_CHUNK)]
            norm_a = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(a[:, c].to(dtype), dim=1, keepdim=True) for c in chunks]), dim=0)
            norm_b = torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(b[:, c].to(dtype), dim=1, keepdim=True) for c in chunks]), dim=0)
            norm_a = torch.where(norm_a > 1e-8, norm_a, 1)
            norm_b = torch.where(norm_b > 1e-8, norm_b, 1)
            dot = torch.stack([((a[:, c].to(dtype) / norm_a) * (b[:, c].to(dtype) / norm_b))
                               .sum(dim=1, keepdim=True) for c in chunks]).sum(dim=0).clamp(-1, 1)
            return dot
        return self._get(("slerp", base, other, v0.dtype), stats)


def _store(result: torch.Tensor, out: torch.Tensor) -> None:
    if result.data_ptr() != out.data_ptr():
        out.copy_(result)


def linear(job: TensorJob, inputs: list[torch.Tensor], out: torch.Tensor) -> None:
    """mergekit linear: sum of w_i * x_i in fp32 (addcmul, in input order), / sum w if normalize."""
    first = inputs[0]
    dtype = _work_dtype(first.dtype)
    weight = torch.tensor([[job.per_input["weight"][s.model] for s in job.sources]], dtype=dtype)
    coefficient_shape = (1,) * first.ndim
    result = out if out.dtype == dtype == first.dtype else torch.empty(first.shape, dtype=dtype)
    result.zero_()
    for tensor, coefficient in zip(inputs, weight.unbind(1)):
        result.addcmul_(tensor, coefficient.reshape(coefficient_shape))
    if job.shared["normalize"]:
        result.div_(weight.sum(dim=1).reshape(coefficient_shape))
    _store(result.to(first.dtype), out)


def slerp(job: TensorJob, inputs: list[torch.Tensor], cache: StudyCache, out: torch.Tensor) -> None:
    """mergekit slerp with the norms and dot cached: only the coefficients depend on t."""
    other = 1 - job.base
    v0, v1 = inputs[job.base], inputs[other]
    dot = cache.slerp_stats(job.sources[job.base], job.sources[other], v0, v1)
    dtype = _work_dtype(v0.dtype)
    t = torch.tensor([job.shared["t"]], dtype=dtype, device=v0.device).reshape(-1, 1)
    linear_branch = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear_branch, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear_branch, 1 - t, torch.sin((1 - t) * theta) / sin_theta).reshape(())
    coef_b = torch.where(linear_branch, t, torch.sin(t * theta) / sin_theta).reshape(())
    result = out if out.dtype == dtype == v0.dtype else torch.empty(v0.shape, dtype=dtype,
                                                                    device=v0.device)
    torch.mul(v0.to(dtype), coef_a, out=result)
    result.add_(v1.to(dtype) * coef_b)
    _store(result.to(v0.dtype), out)


def task_arithmetic_family(method_name: str, job: TensorJob, inputs: list[torch.Tensor],
                           cache: StudyCache, seed: int, out: torch.Tensor) -> None:
    """mergekit's GeneralizedTaskArithmeticMerge: base + lambda * sum(m_i w_i tau'_i) [/ sum(m_i w_i)]."""
    method = merge_methods.get(method_name)
    base = inputs[job.base]
    others = [i for i in range(len(inputs)) if i != job.base]
    if not others:
        _store(base, out)
        return
    deltas = base.new_empty((len(others), *base.shape))
    for row, index in enumerate(others):
        source = job.sources[index]
        tau = cache.task_vector(job.sources[job.base], source, base, inputs[index])
        deltas[row] = _sparsify(job, method.sparsification_method, tau, cache, index, seed)
    weights = torch.tensor([job.per_input["weight"][job.sources[i].model] for i in others],
                           dtype=deltas.dtype, device=deltas.device)
    while deltas.dim() > weights.dim():
        weights.unsqueeze_(-1)
    deltas.mul_(weights)
    normalize = job.shared["normalize"]
    if method.consensus_method:
        # keep d_i whose sign is the majority's (sign of the sum, ties to +); the dropped ones
        # add exact zeros in mergekit's sum, so clamping gives the same sums in fewer passes
        positive = deltas.sum(dim=0) >= 0
        mixed = torch.where(positive, deltas.clamp(min=0).sum(dim=0), deltas.clamp(max=0).sum(dim=0))
        if normalize:
            divisor = (weights * torch.where(positive, deltas > 0, deltas < 0)).sum(dim=0)
            divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        if normalize:
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if job.shared["lambda"] != 1:
        mixed *= job.shared["lambda"]
    if out.dtype == base.dtype:
        torch.add(base, mixed, out=out)
    else:
        out.copy_(base + mixed)


def _sparsify(job: TensorJob, kind: SparsificationMethod | None, tau: torch.Tensor,
              cache: StudyCache, index: int, seed: int) -> torch.Tensor:
    source, base = job.sources[index], job.sources[job.base]
    density = job.per_input["density"][source.model]
    if kind is None or density >= 1:
        return tau
    rescale = job.shared["rescale"]
    if kind == SparsificationMethod.magnitude:
        if density <= 0 or tau.numel() == 0:
            return torch.zeros_like(tau)
        keep = cache.magnitude_rank(base, source, tau) < max(1, int(density * tau.numel()))
        work = tau
    else:  # random (DARE); mergekit upcasts to fp32 on the CPU except for bf16
        keep = dare_keep(tau.shape, density, seed, job, source.model, tau.device)
        work_dtype = tau.dtype if tau.device.type != "cpu" or tau.dtype == torch.bfloat16 else torch.float32
        work = tau.to(work_dtype)
    masked = work * keep
    if rescale:
        before, after = cache.l1(base, source, work), masked.abs().sum()
        if not (before < _RESCALE_EPS or after < _RESCALE_EPS):
            masked = masked * (before / after)
    return masked.to(tau.dtype)

