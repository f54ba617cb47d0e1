import math

import pytest

from evals.stats import mean_ci, paired_bootstrap, stratified_paired_bootstrap


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


def _plug_in_variance(diffs):
    mean = sum(diffs) / len(diffs)
    return sum((d - mean) ** 2 for d in diffs) / len(diffs)


def test_stratified_bootstrap_of_one_task_matches_the_normal_closed_form():
    # Graded scores, 400 items: the bootstrap distribution of the mean is close to normal, with the
    # plug-in sd / sqrt(n); 40k resamples put the 2.5% and 97.5% quantiles within 0.05 sd of it.
    a = [(i * 37 % 101) / 100 for i in range(400)]
    b = [(i * 53 % 97) / 100 for i in range(400)]
    diffs = [x - y for x, y in zip(a, b)]
    mean, sd = sum(diffs) / 400, math.sqrt(_plug_in_variance(diffs) / 400)
    result = stratified_paired_bootstrap({"t": a}, {"t": b}, {"t": 2.0}, iters=40_000, seed=3)
    assert result.mean == pytest.approx(mean, abs=1e-15)
    assert result.ci_low == pytest.approx(mean - 1.959964 * sd, abs=0.05 * sd)
    assert result.ci_high == pytest.approx(mean + 1.959964 * sd, abs=0.05 * sd)


def test_constant_differences_give_a_zero_width_interval_at_that_constant():
    b = [0.0, 0.25, 0.5, 0.75, 1.0] * 4
    one = stratified_paired_bootstrap({"t": [x + 0.25 for x in b]}, {"t": b}, {"t": 1.0}, iters=2000)
    assert (one.mean, one.ci_low, one.ci_high, one.p_value) == (0.25, 0.25, 0.25, 0.0)
    # per task constant: the weighted mean of the constants, 3/4 * 0.25 + 1/4 * -0.5
    two = stratified_paired_bootstrap(
        {"x": [x + 0.25 for x in b], "y": [0.0] * 6}, {"x": b, "y": [0.5] * 6}, {"x": 3.0, "y": 1.0}, iters=2000
    )
    assert (two.mean, two.ci_low, two.ci_high) == (0.0625, 0.0625, 0.0625)


def test_weighted_two_task_interval_matches_the_stratified_closed_form_variance():
    # Task x (150 items, weight 3) gains, task y (50 items, weight 1) loses: the objective's difference is
    # sum(w_t / W * mean_t) with variance sum((w_t / W)^2 * var_t / n_t), resampling within each task.
    # 0/1 scores make the resampled means a grid 0.1 sd apart: within 0.1 sd of the normal interval.
    x_a = [1 if i % 5 < 3 else 0 for i in range(150)]
    x_b = [1 if i % 3 == 0 else 0 for i in range(150)]
    y_a = [1 if i % 4 == 0 else 0 for i in range(50)]
    y_b = [1 if i % 5 < 4 else 0 for i in range(50)]
    dx = [a - b for a, b in zip(x_a, x_b)]
    dy = [a - b for a, b in zip(y_a, y_b)]
    mean = 3 / 4 * sum(dx) / 150 + 1 / 4 * sum(dy) / 50
    sd = math.sqrt((3 / 4) ** 2 * _plug_in_variance(dx) / 150 + (1 / 4) ** 2 * _plug_in_variance(dy) / 50)
    result = stratified_paired_bootstrap(
        {"x": x_a, "y": y_a}, {"x": x_b, "y": y_b}, {"x": 3.0, "y": 1.0}, iters=40_000, seed=3
    )
    assert result.mean == pytest.approx(mean, abs=1e-15)
    assert result.ci_low == pytest.approx(mean - 1.959964 * sd, abs=0.1 * sd)
    assert result.ci_high == pytest.approx(mean + 1.959964 * sd, abs=0.1 * sd)
