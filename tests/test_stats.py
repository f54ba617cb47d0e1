import math

import pytest

from evals.stats import mcnemar_exact, mean_ci, paired_bootstrap


def test_wilson_interval_matches_closed_form():
    # 7 of 10: Wilson 95% interval; R's prop.test(7, 10, correct=FALSE) gives [0.3967781, 0.8922087].
    mean, low, high = mean_ci([1] * 7 + [0] * 3)
    assert mean == 0.7
    assert low == pytest.approx(0.396778, abs=1e-6)
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


def test_mcnemar_exact_matches_the_binomial_closed_form():
    # 1 item only A gets right, 9 only B: p = 2 * (C(10,0) + C(10,1)) / 2^10; concordant items do not count.
    a = [1] + [0] * 9 + [1] * 5 + [0] * 5
    b = [0] + [1] * 9 + [1] * 5 + [0] * 5
    assert mcnemar_exact(a, b) == pytest.approx(2 * 11 / 1024, abs=1e-15)
    assert mcnemar_exact(b, a) == mcnemar_exact(a, b)
    assert mcnemar_exact([1, 0, 1], [1, 0, 1]) == 1.0


def test_paired_bootstrap_agrees_with_the_normal_interval_of_the_differences():
    # Differences: 30 items +1, 10 items 0, 10 items -1: mean 0.4, sd of the mean ~ 0.1050.
    a = [1] * 30 + [0] * 10 + [0] * 10
    b = [0] * 30 + [0] * 10 + [1] * 10
    diffs = [x - y for x, y in zip(a, b)]
    sd = math.sqrt(sum((d - 0.4) ** 2 for d in diffs) / len(diffs) / len(diffs))
    result = paired_bootstrap(a, b, iters=20_000, seed=1)
    assert result.mean == pytest.approx(0.4)
    assert result.ci_low == pytest.approx(0.4 - 1.96 * sd, abs=0.02)
    assert result.ci_high == pytest.approx(0.4 + 1.96 * sd, abs=0.02)
    assert result.p_value < 0.01
    same = paired_bootstrap(a, a, iters=1000)
    assert (same.mean, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
