"""The task-arithmetic family: task_arithmetic, ties, dare_ties and dare_linear.

mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge.merge_group``, op for op, with what does not
depend on a trial's parameters cached per study:
- task vectors tau = model - base;
- per-tensor magnitude ranks, so any TIES density becomes ``rank < k`` with mergekit's exact
  top-k count k = max(1, int(density * numel)) and mergekit's own tie order (its argsort);
- L1 norms of the task vectors (the numerator of a rescale).
In fp32 on the CPU a tensor is one fused pass (``kernels.task_arithmetic``); otherwise torch ops
run a block at a time (``_torch_blocks``). Both take mergekit's steps in its order: sparsify,
weight, sign consensus, sum, normalize, lambda, add the base. DARE masks are drawn from
(trial seed, tensor, model), so a config and a seed give the same weights in any tensor order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from mergekit import merge_methods
from mergekit.sparsify import SparsificationMethod
from numba.typed import List

from merge_core import kernels
from merge_core.methods import common
from merge_core.methods.common import Scratch, StudyCache, tensor_seed
from merge_core.methods.registry import Cached, Method, Usage
from merge_core.planner import Source, TensorJob

_RESCALE_EPS = 1e-7  # mergekit.sparsify.rescaled_masked_tensor's eps
_NO_RANKS = torch.empty(0, dtype=torch.int32)


def _dare_work_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What mergekit's bernoulli sparsification computes in: fp32 on the CPU except for bf16."""
    return torch.float32 if device.type == "cpu" and dtype != torch.bfloat16 else dtype


def magnitude_rank(cache: StudyCache, base: Source, model: Source, tau: torch.Tensor) -> torch.Tensor:
    """Each element's place in mergekit's descending |tau| order (its argsort, so its tie order)."""

    def rank() -> torch.Tensor:
        magnitude = tau.abs().reshape(-1)
        if magnitude.device.type == "cpu":
            magnitude = magnitude.float()  # as mergekit.sparsify.magnitude does
        order = torch.argsort(magnitude, descending=True)
        ranks = torch.empty(order.numel(), dtype=torch.int32, device=order.device)
        ranks[order] = torch.arange(order.numel(), dtype=torch.int32, device=order.device)
        return ranks.reshape(tau.shape)

    return cache.get(("rank", base, model, tau.dtype), rank)


def dare_mask(
    shape: Sequence[int],
    density: float,
    seed: int,
    job: TensorJob,
    model: str,
    device: torch.device,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
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


class _Sparsified:
    """One model's task vector and mergekit's sparsification of it: the mask rule and the rescale.

    ``kind``/``limit``/``key``/``ranks``/``factor`` are what the fused kernels take. The torch
    path asks ``write`` for one block at a time; its masks are float 1/0 in the work dtype, applied
    by multiplication as mergekit applies them (a float-by-bool product or ``torch.where`` is
    several times slower on the CPU). A rescale's L1 sum, which needs the whole tensor, is taken
    here, once per tensor.
    """

    def __init__(
        self,
        job: TensorJob,
        kind: SparsificationMethod | None,
        cache: StudyCache,
        index: int,
        seed: int,
        tau: torch.Tensor,
        fused: bool,
    ) -> None:
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
            self.ranks = magnitude_rank(cache, base, source, tau).reshape(-1)
        else:  # random (DARE)
            self.kind, self.limit = kernels.RANDOM, kernels.threshold(density)
            self.key = tensor_seed(seed, job.name, source.model)
            self.work_dtype = _dare_work_dtype(tau.dtype, tau.device)
            if tau.device.type != "cpu":
                self.drawn = dare_mask(
                    tau.shape,
                    density,
                    seed,
                    job,
                    source.model,
                    tau.device,
                    self.scratch.get(("mask", index), numel, self.work_dtype),
                ).reshape(-1)
        if job.shared["rescale"]:  # mergekit's rescaled_masked_tensor: L1 sums over whole tensors
            absolute = self.scratch.get("abs", numel, self.work_dtype)
            if fused:
                kernels.masked_abs(
                    self.tau.numpy(),
                    self.ranks.numpy(),
                    self.kind,
                    self.limit,
                    self.key,
                    absolute.numpy(),
                    common.parts(numel),
                )
            else:
                for span in common.spans(self.tau):
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


def merge(
    method: Method, job: TensorJob, inputs: list[torch.Tensor], cache: StudyCache, seed: int, out: torch.Tensor
) -> None:
    """base + lambda * sum(m_i w_i tau'_i) [/ sum(m_i w_i)], as mergekit's merge_group computes it.

    The same ops as mergekit's, in the same order, one block of elements at a time, where mergekit
    makes several [n_models, *shape] temporaries per tensor. Only a rescale's L1 sum needs the
    whole tensor, and it is taken over the whole tensor, as mergekit takes it.
    """
    gta = merge_methods.get(method.name)
    base = inputs[job.base]
    others = [i for i in range(len(inputs)) if i != job.base]
    if not others:
        common.store(base, out)
        return
    fused = common.fused(base.device, base.dtype)
    parts = [
        _Sparsified(
            job,
            gta.sparsification_method,
            cache,
            index,
            seed,
            cache.task_vector(job.sources[job.base], job.sources[index], base, inputs[index]),
            fused,
        )
        for index in others
    ]
    weights = torch.tensor(
        [job.per_input["weight"][job.sources[i].model] for i in others], dtype=base.dtype, device=base.device
    ).unsqueeze(1)
    consensus, normalize, scale = gta.consensus_method is not None, job.shared["normalize"], job.shared["lambda"]
    flat_base = base.reshape(-1)
    direct = out.dtype == base.dtype and out.is_contiguous()
    flat_out = out.view(-1) if direct else torch.empty_like(flat_base)
    total_weight = weights.sum(dim=0)  # the divisor when normalizing without a sign vote
    total_weight[total_weight.abs() < 1e-8] = 1
    if fused:  # every step below, per element, one tile at a time (kernels._task_arithmetic)
        taus, ranks = List(p.tau.numpy() for p in parts), List(p.ranks.numpy() for p in parts)
        kinds = np.array([p.kind for p in parts], dtype=np.int64)
        limits = np.array([p.limit for p in parts], dtype=np.int64)
        keys = np.array([p.key for p in parts], dtype=np.uint64)
        factors = np.array([p.factor for p in parts], dtype=np.float32)
        kernels.task_arithmetic(
            flat_base.numpy(),
            flat_out.numpy(),
            taus,
            ranks,
            kinds,
            limits,
            keys,
            factors,
            weights.reshape(-1).numpy(),
            consensus,
            normalize,
            np.float32(total_weight.item()),
            np.float32(scale),
            common.parts(flat_base.numel()),
        )
    else:
        _torch_blocks(parts, weights, total_weight, consensus, normalize, scale, flat_base, flat_out, cache.scratch)
    if not direct:
        out.copy_(flat_out.reshape(out.shape))


def _torch_blocks(
    parts: list[_Sparsified],
    weights: torch.Tensor,
    total_weight: torch.Tensor,
    consensus: bool,
    normalize: bool,
    scale: float,
    flat_base: torch.Tensor,
    flat_out: torch.Tensor,
    scratch: Scratch,
) -> None:
    """The family in torch ops (GPUs; bf16, fp16, fp64 on the CPU), into reused buffers."""
    spans = common.spans(flat_base)
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
        for row, part in enumerate(parts):  # sparsify: tau_i * mask_i (* the rescale factor)
            part.write(span, deltas[row])
        deltas.mul_(weights)  # weight: d_i = w_i * tau'_i
        if consensus:
            # sign consensus: mergekit keeps d_i whose sign is the majority's (the sign of the sum,
            # ties to +), as a float 1/0 mask: d_i * s > 0 exactly when sign(d_i) == s. Here
            # s = copysign(1, sum): a sum is -0.0 only when every term is a zero, and zeros never agree
            sign = torch.copysign(
                column[:width].fill_(1), torch.sum(deltas, dim=0, out=mixed_buffer[:width]), out=column[:width]
            )
            agree = torch.gt(torch.mul(deltas, sign, out=agree_rows[:, :width]), 0, out=agree_rows[:, :width])
            mixed = torch.sum(deltas.mul_(agree), dim=0, out=mixed_buffer[:width])  # sum the agreeing d_i
            if normalize:  # divisor: the agreeing weights' sum, 0 -> 1
                divisor = torch.sum(agree.mul_(weights), dim=0, out=divisor_buffer[:width])
                divisor.masked_fill_(torch.eq(divisor, 0, out=zero_divisor[:width]), 1)
        else:
            mixed = torch.sum(deltas, dim=0, out=mixed_buffer[:width])  # sum
            divisor = total_weight
        if normalize:  # normalize
            mixed /= divisor
        if scale != 1:  # lambda
            mixed *= scale
        torch.add(flat_base[span], mixed, out=flat_out[span])  # add the base


def footprint(method: Method, job: TensorJob, dtype: torch.dtype, usage: Usage) -> None:
    """Values: the cached task vectors, magnitude ranks (int32) and L1 norms of the job's models.
    Scratch: the slots ``_Sparsified`` and ``_torch_blocks`` take, a block of each (all of it on
    a GPU); the kernels' tiles are a few KB of numba temporaries."""
    gta = merge_methods.get(method.name)
    kind, device = gta.sparsification_method, usage.device
    models = len(job.sources) - (job.base is not None)
    numel, size = math.prod(job.shape), dtype.itemsize
    block = common.block(numel, device)
    if Cached.TASK_VECTORS in method.needs:
        usage.values += models * numel * size
    if Cached.MAGNITUDE_RANKS in method.needs:
        usage.values += models * numel * 4
    work = size if kind != SparsificationMethod.random else _dare_work_dtype(dtype, device).itemsize
    if Cached.L1_NORMS in method.needs and job.shared.get("rescale"):
        usage.values += models * work
        usage.need("abs", numel * work)  # |tau * mask|, for the L1 sum over the whole tensor
    if common.fused(device, dtype):
        return
    usage.need("deltas", models * block * size)  # a block of every model's delta, and of their sum
    usage.need("mixed", block * size)
    if gta.consensus_method:  # the sign agreement, the majority sign, the divisor
        usage.need("agree", models * block * size)
        usage.need("sign", block * size)
        usage.need("divisor", block * size)
        usage.need("zero-divisor", block)
    if kind is not None:
        usage.need("mask", models * block * work)
    if kind == SparsificationMethod.random and device.type == "cpu":
        usage.need("keep", block)  # the kept flags of a block, before they become the mask
