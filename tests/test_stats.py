import math

import pytest

from evals.stats import mean_ci


def test_wilson_interval_matches_closed_form():
    # 7 of 10: Wilson 95% interval, computed by hand from the textbook formula.
    mean, low, high = mean_ci([1] * 7 + [0] * 3)
    assert mean == 0.7
    assert low == pytest.approx(0.396781, abs=1e-6)
    assert high == pytest.approx(0.892208, abs=1e-6)


def test_interval_stays_inside_unit_range_at_zero_and_one():
    _, low, high = mean_ci([0] * 50)
    assert low == 0.0 and 0 < high < 0.08
    _, low, high = mean_ci([1] * 50)
    assert high == pytest.approx(1.0) and 0.92 < low < 1


def test_non_binary_scores_use_the_normal_interval():
    scores = [0.2, 0.4, 0.6, 0.8]
    mean, low, high = mean_ci(scores)
    sd = math.sqrt(sum((s - 0.5) ** 2 for s in scores) / 3)
    assert mean == pytest.approx(0.5)
    assert high - mean == pytest.approx(1.959964 * sd / 2, rel=1e-6)
