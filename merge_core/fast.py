"""Fast paths for the methods a search spends its time in, equal to mergekit's formulas.

Each function repeats mergekit 0.1.5's arithmetic op for op (same dtypes, same reductions), so
results match its API bit for bit, but moves everything that does not depend on the trial's
parameters into a per-study cache:
- task vectors tau = model - base (task_arithmetic, ties, dare_*);
- per-tensor magnitude ranks, so any TIES density becomes `rank < k` with mergekit's exact
  top-k count k = max(1, int(density * numel)) and mergekit's own tie order (its argsort);
- L1 norms of the task vectors (DARE rescale numerator);
- SLERP norms and normalized dot products, so a new t costs one fused pass.
SLERP and the task-arithmetic family in fp32 on the CPU run as one fused pass per tensor
(merge_core.kernels); the rest runs torch ops, a cache-sized block at a time on the CPU. DARE
masks are drawn from a generator seeded by (trial seed, tensor, model): the same config and seed
give the same weights whatever order tensors are built in.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Sequence

import numba
import numpy as np
import torch
from mergekit import merge_methods
from mergekit.sparsify import SparsificationMethod
from numba.typed import List

from merge_core import kernels
from merge_core.parents import Parents
from merge_core.planner import MergePlan, Source, TensorJob

FAST_METHODS = frozenset({"linear", "slerp", "task_arithmetic", "ties", "dare_ties", "dare_linear"})
_SLERP_CHUNK = 1024 * 1024  # mergekit.merge_methods.slerp._CHUNK_ELEMENTS, for identical norms
_RESCALE_EPS = 1e-7  # mergekit.sparsify.rescaled_masked_tensor's eps
CPU_BLOCK = 1 << 18  # elements per torch block on the CPU (1 MiB in fp32): a block of every model stays in cache
KERNEL_MIN_SPAN = 1 << 16  # elements: a tensor under this runs its kernel on one thread


def tensor_seed(seed: int, *names: str) -> int:
    """A 63-bit seed that depends only on the trial seed and the names, never on call order."""
    digest = hashlib.blake2b("\0".join((str(seed), *names)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dare_mask(shape: Sequence[int], density: float, seed: int, job: TensorJob, model: str,
              device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bernoulli(density) mask (1 keep, 0 drop) for one task vector, from (seed, tensor, model).

    On a GPU the draws are one torch.rand stream. On the CPU they are ``kernels.keep_mask``'s
    counter-based draws, which the fused kernels recompute element by element; this full mask
    serves the tests that hand mergekit the same mask.
    """
    numel = math.prod(shape)
    if out is None:
        out = torch.empty(numel, dtype=torch.float32, device=device)
    key = tensor_seed(seed, job.name, model)
    if device.type != "cpu":
        generator = torch.Generator(device).manual_seed(key)
        torch.rand(out.shape, generator=generator, device=device, dtype=out.dtype, out=out)
        return torch.lt(out, density, out=out).reshape(tuple(shape))
    kept = torch.empty(numel, dtype=torch.uint8)
    kernels.keep_mask(key, kernels.threshold(density), 0, kept.numpy())
    return out.copy_(kept).reshape(tuple(shape))


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


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _dare_work_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What mergekit's bernoulli sparsification computes in: fp32 on the CPU except for bf16."""
    return torch.float32 if device.type == "cpu" and dtype != torch.bfloat16 else dtype


class StudyCache:
    """Values that depend only on the parents; kept where the parents are kept."""

    def __init__(self, parents: Parents) -> None:
        self.parents = parents
        self.values: dict[tuple, torch.Tensor] = {}
        self.scratch = Scratch(parents.device)

    @property
    def values_nbytes(self) -> int:
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

    def l1(self, base: Source, model: Source, tau: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._get(("l1", base, model, tau.dtype, dtype), lambda: tau.to(dtype).abs().sum())

    def slerp_stats(self, base: Source, other: Source, v0: torch.Tensor, v1: torch.Tensor
                    ) -> torch.Tensor:
        """The clamped dot product of the normalized tensors, computed exactly as mergekit's slerp does."""
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


def _fused(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether merge_core.kernels' fused passes build a tensor: fp32 on the CPU. numba has no bf16
    or fp16 arithmetic to repeat torch's per-op rounding with, so other dtypes, and GPUs, run
    torch ops."""
    return device.type == "cpu" and dtype == torch.float32


def _parts(numel: int) -> int:
    """Spans a kernel splits a tensor into: a few per numba thread (one dispatch costs little next
    to a span), one for a tensor under KERNEL_MIN_SPAN elements."""
    return max(1, min(2 * numba.get_num_threads(), numel // KERNEL_MIN_SPAN))


def _store(result: torch.Tensor, out: torch.Tensor) -> None:
    if result.data_ptr() != out.data_ptr():
        out.copy_(result)


def linear(job: TensorJob, inputs: list[torch.Tensor], out: torch.Tensor) -> None:
    """mergekit linear: sum of w_i * x_i in fp32 (addcmul, in input order), / sum w if normalize."""
    first = inputs[0]
    dtype = _work_dtype(first.dtype)
    weight = torch.tensor([[job.per_input["weight"][s.model] for s in job.sources]], dtype=dtype,
                          device=first.device)
    coefficient_shape = (1,) * first.ndim
    result = out if out.dtype == dtype == first.dtype else torch.empty(first.shape, dtype=dtype,
                                                                       device=first.device)
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
    direct = out.dtype == dtype == v0.dtype and out.is_contiguous()
    result = out.view(-1) if direct else torch.empty(v0.numel(), dtype=dtype, device=v0.device)
    a, b = v0.reshape(-1), v1.reshape(-1)
    if _fused(v0.device, v0.dtype):
        kernels.slerp(a.numpy(), b.numpy(), np.float32(coef_a), np.float32(coef_b), result.numpy(), _parts(a.numel()))
    else:
        spans = _spans(a)
        term = cache.scratch.get("slerp-term", spans[0].stop, dtype)
        for span in spans:  # mergekit's (s0 * v0) + (s1 * v1), one cache-sized block at a time
            piece = term[: span.stop - span.start]
            torch.mul(a[span].to(dtype), coef_a, out=result[span])
            torch.mul(b[span].to(dtype), coef_b, out=piece)
            result[span].add_(piece)
    if not direct:
        _store(result.reshape(v0.shape).to(v0.dtype), out)


def _block(numel: int, device: torch.device) -> int:
    """Elements per fused pass: cache-sized on the CPU, the whole tensor on a GPU."""
    return max(1, numel if device.type != "cpu" else min(numel, CPU_BLOCK))


def _spans(flat: torch.Tensor) -> list[slice]:
    """The blocks a fused pass walks."""
    numel = flat.numel()
    block = _block(numel, flat.device)
    return [slice(start, min(numel, start + block)) for start in range(0, max(numel, 1), block)]


def footprint(plan: MergePlan, parents: Parents) -> tuple[int, int]:
    """Bytes the fast path for ``plan`` keeps at most: (study-cache values, scratch on the device).

    Values: a task vector per non-base input, and an int32 magnitude rank each for TIES or an L1
    norm each for a rescale; SLERP's dot products. Scratch: the grow-only ``Scratch`` slots, each
    sized by the largest tensor that uses it (a block of it on the CPU, all of it on a GPU). This
    mirrors what the functions below allocate; ``tests/test_merge_fast.py`` holds it to the real
    allocations.
    """
    if plan.method not in FAST_METHODS or plan.method == "linear":
        return 0, 0
    values, slots = 0, {}
    device = parents.device

    def need(slot: str, nbytes: int) -> None:
        slots[slot] = max(slots.get(slot, 0), nbytes)

    method = merge_methods.get(plan.method)
    kind = getattr(method, "sparsification_method", None)  # slerp has none
    for job in plan.jobs:
        first = job.sources[0]
        dtype = job.in_dtype or parents[first.model].headers[first.tensor].dtype
        numel, size = math.prod(job.shape), dtype.itemsize
        block = _block(numel, device)
        if plan.method == "slerp":  # the cached dot product, and the torch path's term for one block
            values += _work_dtype(dtype).itemsize
            if not _fused(device, dtype):
                need("slerp-term", block * _work_dtype(dtype).itemsize)
            continue
        models = len(job.sources) - (job.base is not None)
        values += models * numel * (size + (4 if plan.method == "ties" else 0))
        work = size if kind != SparsificationMethod.random else _dare_work_dtype(dtype, device).itemsize
        if kind is not None and job.shared.get("rescale"):
            values += models * work  # the L1 norms
            need("abs", numel * work)  # |tau * mask|, for the L1 sum over the whole tensor
        if _fused(device, dtype):  # the kernels' tiles are a few KB of numba temporaries
            continue
        need("deltas", models * block * size)  # a block of every model's delta, and of their sum
        need("mixed", block * size)
        if method.consensus_method:  # the sign agreement, the majority sign, the divisor
            need("agree", models * block * size)
            need("sign", block * size)
            need("divisor", block * size)
            need("zero-divisor", block)
        if kind is not None:
            need("mask", models * block * work)
        if kind == SparsificationMethod.random and device.type == "cpu":
            need("keep", block)  # the kept flags of a block, before they become the mask
    return values, sum(slots.values())


def task_arithmetic_family(method_name: str, job: TensorJob, inputs: list[torch.Tensor],
                           cache: StudyCache, seed: int, out: torch.Tensor) -> None:
    """mergekit's GeneralizedTaskArithmeticMerge: base + lambda * sum(m_i w_i tau'_i) [/ sum(m_i w_i)].

    The same ops as mergekit's, in the same order, one block of elements at a time, where mergekit
    makes several [n_models, *shape] temporaries per tensor. Only a rescale's L1 sum needs the
    whole tensor, and it is taken over the whole tensor, as mergekit takes it.
    """
    method = merge_methods.get(method_name)
    base = inputs[job.base]
    others = [i for i in range(len(inputs)) if i != job.base]
    if not others:
        _store(base, out)
        return
    fused = _fused(base.device, base.dtype)
    parts = [_Sparsified(job, method.sparsification_method, cache, index, seed,
                         cache.task_vector(job.sources[job.base], job.sources[index], base, inputs[index]), fused)
             for index in others]
    weights = torch.tensor([job.per_input["weight"][job.sources[i].model] for i in others],
                           dtype=base.dtype, device=base.device).unsqueeze(1)
    consensus, normalize, scale = method.consensus_method is not None, job.shared["normalize"], job.shared["lambda"]
    flat_base = base.reshape(-1)
    direct = out.dtype == base.dtype and out.is_contiguous()
    flat_out = out.view(-1) if direct else torch.empty_like(flat_base)
    total_weight = weights.sum(dim=0)  # the divisor when normalizing without a sign vote
    total_weight[total_weight.abs() < 1e-8] = 1
    if fused:
        taus, ranks = List(p.tau.numpy() for p in parts), List(p.ranks.numpy() for p in parts)
        kinds = np.array([p.kind for p in parts], dtype=np.int64)
        limits = np.array([p.limit for p in parts], dtype=np.int64)
        keys = np.array([p.key for p in parts], dtype=np.uint64)
        factors = np.array([p.factor for p in parts], dtype=np.float32)
        kernels.task_arithmetic(flat_base.numpy(), flat_out.numpy(), taus, ranks, kinds, limits, keys, factors,
                                weights.reshape(-1).numpy(), consensus, normalize, np.float32(total_weight.item()),
                                np.float32(scale), _parts(flat_base.numel()))
    else:
        _torch_blocks(parts, weights, total_weight, consensus, normalize, scale, flat_base, flat_out,
                      cache.scratch)
    if not direct:
        out.copy_(flat_out.reshape(out.shape))


def _torch_blocks(parts: list[_Sparsified], weights: torch.Tensor, total_weight: torch.Tensor, consensus: bool,
                  normalize: bool, scale: float, flat_base: torch.Tensor, flat_out: torch.Tensor,
                  scratch: Scratch) -> None:
    """The family in torch ops (GPUs; bf16, fp16, fp64 on the CPU), into reused buffers."""
    spans = _spans(flat_base)
    block, dtype = spans[0].stop, flat_base.dtype  # reused buffers: fresh ones cost page faults
    rows = scratch.get("deltas", len(parts) * block, dtype).view(len(parts), block)
    mixed_buffer = scratch.get("mixed", block, dtype)
    if consensus:
        agree_rows = scratch.get("agree", len(parts) * block, dtype).view(len(parts), block)
        column, divisor_buffer = scratch.get("sign", block, dtype), scratch.get("divisor", block, dtype)
        zero_divisor = scratch.get("zero-divisor", block, torch.bool)
    for span in spans:
        width = span.stop - span.start
        deltas = rows[:, :width]
        for row, part in enumerate(parts):
            part.write(span, deltas[row])
        deltas.mul_(weights)
        if consensus:
            # mergekit's sign consensus keeps d_i whose sign is the majority's (the sign of the sum,
            # ties to +), as a float 1/0 mask: d_i * s > 0 exactly when sign(d_i) == s. Here
            # s = copysign(1, sum): a sum is -0.0 only when every term is a zero, and zeros never agree
            sign = torch.copysign(column[:width].fill_(1), torch.sum(deltas, dim=0, out=mixed_buffer[:width]),
                                  out=column[:width])
            agree = torch.gt(torch.mul(deltas, sign, out=agree_rows[:, :width]), 0, out=agree_rows[:, :width])
            mixed = torch.sum(deltas.mul_(agree), dim=0, out=mixed_buffer[:width])
            if normalize:
                divisor = torch.sum(agree.mul_(weights), dim=0, out=divisor_buffer[:width])
                divisor.masked_fill_(torch.eq(divisor, 0, out=zero_divisor[:width]), 1)
        else:
            mixed = torch.sum(deltas, dim=0, out=mixed_buffer[:width])
            divisor = total_weight
        if normalize:
            mixed /= divisor
        if scale != 1:
            mixed *= scale
        torch.add(flat_base[span], mixed, out=flat_out[span])


_NO_RANKS = torch.empty(0, dtype=torch.int32)


class _Sparsified:
    """One model's task vector and mergekit's sparsification of it: the mask rule and the rescale.

    ``kind``/``limit``/``key``/``ranks``/``factor`` are what the fused kernels take. The torch
    path asks ``write`` for one block at a time; its masks are float 1/0 in the work dtype, applied
    by multiplication as mergekit applies them (a float-by-bool product or ``torch.where`` is
    several times slower on the CPU). A rescale's L1 sum, which needs the whole tensor, is taken
    here, once per tensor.
    """

    def __init__(self, job: TensorJob, kind: SparsificationMethod | None, cache: StudyCache,
                 index: int, seed: int, tau: torch.Tensor, fused: bool) -> None:
        source, base = job.sources[index], job.sources[job.base]
        density = job.per_input["density"][source.model]
        self.tau, numel = tau.reshape(-1), tau.numel()
        self.kind, self.limit, self.key, self.ranks, self.factor = kernels.NONE, 0, 0, _NO_RANKS, 1.0
        self.work_dtype = tau.dtype
        self.drawn: torch.Tensor | None = None  # a GPU's whole DARE mask
        self.scratch, self.index = cache.scratch, index
        if kind is None or density >= 1:
            return
        if kind == SparsificationMethod.magnitude:
            if density <= 0 or numel == 0:
                self.kind = kernels.ZERO
                return
            self.kind, self.limit = kernels.MAGNITUDE, max(1, int(density * numel))
            self.ranks = cache.magnitude_rank(base, source, tau).reshape(-1)
        else:  # random (DARE)
            self.kind, self.limit = kernels.RANDOM, kernels.threshold(density)
            self.key = tensor_seed(seed, job.name, source.model)
            self.work_dtype = _dare_work_dtype(tau.dtype, tau.device)
            if tau.device.type != "cpu":
                self.drawn = dare_mask(tau.shape, density, seed, job, source.model, tau.device,
                                       self.scratch.get(("mask", index), numel, self.work_dtype)).reshape(-1)
        if job.shared["rescale"]:  # mergekit's rescaled_masked_tensor: L1 sums over whole tensors
            absolute = self.scratch.get("abs", numel, self.work_dtype)
            if fused:
                kernels.masked_abs(self.tau.numpy(), self.ranks.numpy(), self.kind, self.limit, self.key,
                                   absolute.numpy(), _parts(numel))
            else:
                for span in _spans(self.tau):
                    torch.abs(self.masked(span, absolute[span]), out=absolute[span])
            before, after = cache.l1(base, source, self.tau, self.work_dtype), absolute.sum()
            if not (before < _RESCALE_EPS or after < _RESCALE_EPS):
                self.factor = before / after

    def mask(self, span: slice) -> torch.Tensor:
        if self.drawn is not None:
            return self.drawn[span]
        mask = self.scratch.get(("mask", self.index), span.stop - span.start, self.work_dtype)
        if self.kind == kernels.MAGNITUDE:
            return torch.lt(self.ranks[span], self.limit, out=mask)
        kept = self.scratch.get("keep", mask.numel(), torch.uint8)
        kernels.keep_mask(self.key, self.limit, span.start, kept.numpy())
        return mask.copy_(kept)

    def masked(self, span: slice, out: torch.Tensor) -> torch.Tensor:
        """tau * mask over a block, in the work dtype."""
        return torch.mul(self.tau[span].to(self.work_dtype), self.mask(span), out=out)

    def write(self, span: slice, row: torch.Tensor) -> None:
        if self.kind == kernels.ZERO:
            row.zero_()
        elif self.kind == kernels.NONE:
            row.copy_(self.tau[span])
        else:
            target = row if self.work_dtype == row.dtype else torch.empty_like(row, dtype=self.work_dtype)
            self.masked(span, target)
            if isinstance(self.factor, torch.Tensor):
                target.mul_(self.factor)
            if target is not row:
                row.copy_(target)
