"""Confidence intervals for per-item scores, and paired tests between two models on the same items."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054


def mean_ci(scores: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean with a 95% interval: Wilson's score interval for 0/1 scores, else the normal one.

    Wilson stays inside [0, 1] and keeps its coverage near 0% and 100% accuracy, where tiny
    models often sit; the normal interval collapses to a point there.
    """
    n = len(scores)
    if n == 0:
        raise ValueError("no scores")
    mean = sum(scores) / n
    if all(s in (0, 1) for s in scores):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        # Exactly 0 (1) at 0% (100%), where the closed form leaves a rounding residue of ~1e-17.
        return mean, 0.0 if mean == 0 else centre - half, 1.0 if mean == 1 else centre + half
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _paired(a: Sequence[float], b: Sequence[float]) -> None:
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need two equal, non-empty lists; got {len(a)} and {len(b)} items")


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # mean of A - B over the items (a weighted mean of per-task means when stratified)
    ci_low: float
    ci_high: float
    p_value: float  # two-sided: twice the smaller share of resampled means on either side of 0


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], iters: int = 10_000, seed: int = 0, level: float = 0.95
) -> PairedDifference:
    """Percentile bootstrap of mean(A - B), resampling items (not scores) so pairs stay together."""
    return stratified_paired_bootstrap({"": a}, {"": b}, {"": 1.0}, iters, seed, level)


def stratified_paired_bootstrap(
    a: Mapping[str, Sequence[float]],
    b: Mapping[str, Sequence[float]],
    weights: Mapping[str, float],
    iters: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> PairedDifference:
    """Percentile bootstrap of ``sum_t w_t * mean_t(A - B) / sum_t w_t`` over tasks t: a weighted
    objective's paired difference between two models scored on the same items.

    Stratified: each resample draws every task's items from that task alone, with replacement and
    as many as it has, keeping each item's A and B scores together; the resampled per-task mean
    differences are combined with the weights. With one task this is the plain paired bootstrap.
    The interval holds the central ``level`` share of the resampled differences.
    """
    import numpy as np

    if set(a) != set(weights) or set(b) != set(weights):
        raise ValueError(f"scores for tasks {sorted(a)} and {sorted(b)} do not match the weights' {sorted(weights)}")
    total = sum(weights.values())
    diffs = {}
    for task in weights:
        _paired(a[task], b[task])
        diffs[task] = np.asarray(a[task], dtype=float) - np.asarray(b[task], dtype=float)
    rng = np.random.default_rng(seed)
    chunks = [min(1000, iters - start) for start in range(0, iters, 1000)]  # bounded memory
    means = np.concatenate(
        [
            sum(
                w / total * diffs[t][rng.integers(0, len(diffs[t]), (k, len(diffs[t])))].mean(1)
                for t, w in weights.items()
            )
            for k in chunks
        ]
    )
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    p_value = min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0)))
    mean = sum(w / total * diffs[t].mean() for t, w in weights.items())
    return PairedDifference(float(mean), float(low), float(high), float(p_value))
