"""Fused CPU kernels (numba) for SLERP and the task-arithmetic family in fp32, and the CPU DARE draws.

Why our own kernels: torch runs one pass over memory per op, and the family's formula is about
ten ops per element and model, so a torch build on the CPU is bound by those passes, not by the
bytes of the parents (docs/performance.md has the figures). Here every element goes through
mergekit's whole formula in one pass, in cache-sized tiles, with the same fp32 ops in the same
order as mergekit's torch ops (no fused multiply-adds, no reassociation), so the result is bit for
bit mergekit's.

DARE masks need no stored draws: element i of a tensor is kept when the top 32 bits of the i-th
output of a SplitMix64 stream seeded by (trial seed, tensor, model) are below
floor(density * 2^32). That is Bernoulli(density) to 2^-32, any element can be drawn on its own,
so every pass and every thread recomputes the same mask.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

NONE, MAGNITUDE, RANDOM, ZERO = 0, 1, 2, 3  # how a task vector is sparsified
TILE = 4096  # elements per tile: every model's tile and the accumulators stay in L1/L2

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment and its two mixing multipliers
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_JIT = {"nogil": True, "error_model": "numpy"}  # numpy errors: no zero-division branch
_PARALLEL = {**_JIT, "cache": True, "parallel": True}


def threshold(density: float) -> int:
    """The DARE cut: an element is kept when its 32-bit draw is below this."""
    return min(max(int(density * 2**32), 0), 2**32)


@njit(inline="always")
def _draw(key: np.uint64, index: np.uint64) -> np.uint64:
    """Top 32 bits of output ``index`` (from 0) of the SplitMix64 stream seeded with ``key``."""
    z = key + (index + np.uint64(1)) * _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return (z ^ (z >> np.uint64(31))) >> np.uint64(32)


@njit(**_JIT, cache=True)
def keep_mask(key: int, cut: int, start: int, out: np.ndarray) -> None:
    """out[j] = 1 if element start + j is kept, else 0 (the DARE mask, any dtype)."""
    key, cut, first = np.uint64(key), np.uint64(cut), np.uint64(start)
    for j in range(out.size):
        out[j] = _draw(key, first + np.uint64(j)) < cut


@njit(inline="always")
def _sparsify(tau, ranks, kind, limit, key, start, row):
    """row = tau * mask, mergekit's masked task vector, for a tile starting at element ``start``.

    One loop per kind, each simple enough to vectorize; explicit, as numba's slice assignment is
    a slow generic copy."""
    one, zero = np.float32(1), np.float32(0)
    if kind == NONE:
        for j in range(row.size):
            row[j] = tau[j]
    elif kind == ZERO:
        for j in range(row.size):
            row[j] = zero
    elif kind == MAGNITUDE:
        for j in range(row.size):
            row[j] = tau[j] * (one if ranks[j] < limit else zero)
    else:
        key, cut, first = np.uint64(key), np.uint64(limit), np.uint64(start)
        for j in range(row.size):
            row[j] = tau[j] * (one if _draw(key, first + np.uint64(j)) < cut else zero)


@njit(**_PARALLEL)
def masked_abs(tau, ranks, kind, limit, key, out, parts) -> None:
    """out = |tau * mask| (the numerator of a rescale's L1 sum, which torch then takes), in
    ``parts`` spans on numba's threads, as every kernel here."""
    step = (tau.size + parts - 1) // parts
    for part in prange(parts):
        _masked_abs(tau, ranks, kind, limit, key, part * step, min(tau.size, (part + 1) * step), out)


@njit(**_JIT)
def _masked_abs(tau, ranks, kind, limit, key, start, stop, out) -> None:
    for lo in range(start, stop, TILE):
        hi = min(lo + TILE, stop)
        row = out[lo:hi]
        _sparsify(tau[lo:hi], ranks[lo:hi] if ranks.size else ranks, kind, limit, key, lo, row)
        for j in range(row.size):
            row[j] = abs(row[j])


@njit(inline="always")
def _clear(levels, width):
    for level in range(levels.shape[0]):
        for j in range(width):
            levels[level, j] = 0


@njit(inline="always")
def _add_row(levels, row, count):
    """Add row number ``count`` (from 1) of a sum over models, in torch's order.

    torch sums a [models, n] tensor over dim 0 (for n a multiple of 32, as model tensors are)
    in a cascade: rows go into level 0; every 16 rows level 0 is added into level 1 and cleared,
    every 256 level 1 into level 2, and so on; ``_total`` then adds the levels up. Up to 15
    models that is the plain row order; past 16 any other order differs in the last bits.
    """
    first = levels[0]
    for j in range(row.size):
        first[j] += row[j]
    if count % 16 == 0:
        for level in range(1, levels.shape[0]):
            lower, upper = levels[level - 1], levels[level]
            for j in range(row.size):
                upper[j] += lower[j]
                lower[j] = 0
            if count & (15 << (4 * level)):
                break


@njit(inline="always")
def _total(levels, width):
    total = levels[0, :width]
    for level in range(1, levels.shape[0]):
        upper = levels[level]
        for j in range(width):
            total[j] += upper[j]
    return total


@njit(**_PARALLEL)
def task_arithmetic(
    base, out, taus, ranks, kinds, limits, keys, factors, weights, consensus, normalize, divisor, scale, parts
) -> None:
    """out = mergekit's GeneralizedTaskArithmeticMerge of base and the task vectors ``taus``."""
    step = (base.size + parts - 1) // parts
    for part in prange(parts):
        _task_arithmetic(
            part * step,
            min(base.size, (part + 1) * step),
            base,
            out,
            taus,
            ranks,
            kinds,
            limits,
            keys,
            factors,
            weights,
            consensus,
            normalize,
            divisor,
            scale,
        )


@njit(**_JIT)
def _task_arithmetic(
    start, stop, base, out, taus, ranks, kinds, limits, keys, factors, weights, consensus, normalize, divisor, scale
) -> None:
    """out[start:stop] = mergekit's GeneralizedTaskArithmeticMerge over the same elements.

    Per element, in mergekit's order: d_i = w_i * sparsified tau_i; with sign consensus, the sign
    of sum(d_i) (ties to +) and the d_i that agree with it, their sum over sum(w_i of the agreeing)
    when normalizing (0 -> 1); without, sum(d_i) [/ divisor]; then * scale, then + base. Sums over
    models run in torch's order (``_add_row``). Explicit loops throughout: numba's slice
    assignment is a slow generic copy.
    """
    models = len(taus)
    deltas = np.empty((models, TILE), np.float32)
    term = np.empty(TILE, np.float32)
    sums = np.empty((4, TILE), np.float32)  # torch's four cascade levels
    agreeing_sums = np.empty((4, TILE), np.float32)
    sign = np.empty(TILE, np.float32)
    one, zero = np.float32(1), np.float32(0)
    for lo in range(start, stop, TILE):
        hi = min(lo + TILE, stop)
        width = hi - lo
        _clear(sums, width)
        for i in range(models):
            row, tau, rank = deltas[i, :width], taus[i][lo:hi], ranks[i]
            rank = rank[lo:hi] if rank.size else rank
            _sparsify(tau, rank, kinds[i], limits[i], keys[i], lo, row)
            factor, weight = factors[i], weights[i]
            for j in range(width):
                row[j] = (row[j] * factor) * weight
            _add_row(sums, row, i + 1)
        total = _total(sums, width)
        if consensus:
            for j in range(width):
                sign[j] = one if total[j] >= zero else -one  # mergekit: (sum >= 0) * 2 - 1
            _clear(sums, width)
            _clear(agreeing_sums, width)
            agreed = term[:width]
            for i in range(models):
                row, weight = deltas[i, :width], weights[i]
                for j in range(width):  # mergekit's mask: sign(d_i) == majority sign, as 1.0/0.0
                    agreed[j] = one if row[j] * sign[j] > zero else zero
                    row[j] = row[j] * agreed[j]
                    agreed[j] = agreed[j] * weight
                _add_row(sums, row, i + 1)
                _add_row(agreeing_sums, agreed, i + 1)
            total = _total(sums, width)
            if normalize:
                agreeing = _total(agreeing_sums, width)
                for j in range(width):
                    total[j] = total[j] / (agreeing[j] if agreeing[j] != zero else one)
        elif normalize:
            for j in range(width):
                total[j] = total[j] / divisor
        if scale != one:
            for j in range(width):
                total[j] = total[j] * scale
        target, origin = out[lo:hi], base[lo:hi]
        for j in range(width):
            target[j] = origin[j] + total[j]


@njit(**_PARALLEL)
def slerp(v0, v1, coefficient0, coefficient1, out, parts) -> None:
    """out = (coefficient0 * v0) + (coefficient1 * v1): mergekit's slerp in fp32."""
    step = (out.size + parts - 1) // parts
    for part in prange(parts):
        lo, hi = part * step, min(out.size, (part + 1) * step)
        a, b, target = v0[lo:hi], v1[lo:hi], out[lo:hi]  # slices: indexes from 0 vectorize
        for j in range(target.size):
            target[j] = a[j] * coefficient0 + b[j] * coefficient1
