"""Confidence intervals for per-item scores."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
        return mean, centre - half, centre + half
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((s - mean) ** 2 for s in scores) / (n - 1))
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half
