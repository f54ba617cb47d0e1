"""Confidence intervals for per-item scores, and paired tests between two models on the same items."""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value for 0/1 scores of two models on the same items.

    Only discordant items count: under H0 each of the n = b + c of them favours A with
    probability 1/2, so p = min(1, 2 * P[Binomial(n, 1/2) <= min(b, c)]).
    """
    _paired(a, b)
    if not all(s in (0, 1) for s in (*a, *b)):
        raise ValueError("McNemar's test needs 0/1 scores; use paired_bootstrap for graded ones")
    only_a = sum(1 for x, y in zip(a, b) if x > y)
    only_b = sum(1 for x, y in zip(a, b) if y > x)
    n = only_a + only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # mean of A - B over the items
    ci_low: float
    ci_high: float
    p_value: float  # two-sided: twice the smaller share of resampled means on either side of 0


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], iters: int = 10_000, seed: int = 0, level: float = 0.95
) -> PairedDifference:
    """Percentile bootstrap of mean(A - B), resampling items (not scores) so pairs stay together."""
    import numpy as np

    _paired(a, b)
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    chunks = [min(1000, iters - start) for start in range(0, iters, 1000)]  # bounded memory
    means = np.concatenate([diffs[rng.integers(0, len(diffs), (k, len(diffs)))].mean(1) for k in chunks])
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    p_value = min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0)))
    return PairedDifference(float(diffs.mean()), float(low), float(high), float(p_value))
