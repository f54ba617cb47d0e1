"""The verdict against the best parent: chosen on select, judged per split with a paired, stratified CI."""

import pytest

from evals.objectives import Objective
from evals.results import EvalResult, TaskScore
from evals.stats import stratified_paired_bootstrap
from search.verdict import ITERS, OBJECTIVE, Comparison, compare

METRIC = "exact_match,strict-match"


def _result(split: str, **tasks: list[float]) -> EvalResult:
    """Per-item scores of each task, on doc ids 0, 1, ...: the same items for every model."""
    scores = {task: TaskScore(task, split, METRIC, list(range(len(items))), items) for task, items in tasks.items()}
    return EvalResult(split, scores, seconds=1.0, model_seconds=1.0, batch_size=8)


def _items(correct: int, n: int = 20) -> list[float]:
    return [1.0] * correct + [0.0] * (n - correct)


def test_sentences_read_as_specified():
    assert (
        Comparison("test", OBJECTIVE, 6.5, 2.0, 11.0).sentence()
        == "beats its best parent on test (+6.5 points, 95% CI [+2.0, +11.0])"
    )
    assert (
        Comparison("test", OBJECTIVE, -4.0, -9.0, 1.0).sentence()
        == "does not beat its best parent on test (-4.0 points, 95% CI [-9.0, +1.0])"
    )
    # no gain is no win; the interval's side of 0 is recorded beside the point estimate
    assert not Comparison("select", OBJECTIVE, 0.0, -5.0, 5.0).beats
    assert Comparison("test", OBJECTIVE, 6.5, 2.0, 11.0).ci_excludes_zero
    assert not Comparison("test", OBJECTIVE, 3.0, -1.0, 7.0).ci_excludes_zero
    # a gain within the noise says so
    assert (
        Comparison("test", OBJECTIVE, 3.0, -1.0, 7.0).sentence()
        == "beats its best parent on test (+3.0 points, 95% CI [-1.0, +7.0]; not significant: the interval includes 0)"
    )


def test_best_parent_is_chosen_on_select_never_on_test():
    objective = Objective(weights={"t": 1.0})
    winner = {"select": _result("select", t=_items(14)), "test": _result("test", t=_items(10))}
    # "sharp" is best on select (12 of 20) but worst on test; "broad" would win on test
    parents = {
        "broad": {"select": _result("select", t=_items(8)), "test": _result("test", t=_items(18))},
        "sharp": {"select": _result("select", t=_items(12)), "test": _result("test", t=_items(4))},
    }
    verdict = compare("trial 7", winner, parents, objective, seed=3)
    assert verdict.best_parent == "sharp"
    test = next(c for c in verdict.comparisons if c.split == "test")
    reference = stratified_paired_bootstrap({"t": _items(10)}, {"t": _items(4)}, {"t": 1.0}, ITERS, 3)
    assert test.points == pytest.approx(100 * (10 - 4) / 20)
    assert (test.ci_low, test.ci_high) == (100 * reference.ci_low, 100 * reference.ci_high)
    assert test.beats and test.ci_excludes_zero
    lines = verdict.lines()
    assert lines[1].split() == ["trial", "7", "70.0%", "50.0%"]
    assert lines[2].split() == ["broad", "40.0%", "90.0%"]  # every parent's test score is shown too
    assert lines[3].split()[:3] == ["sharp", "60.0%", "20.0%"] and "best parent" in lines[3]
    assert lines[-1] == f"trial 7 {test.sentence()}"
    assert verdict.record()["parents"]["broad"] == {"select_objective": 0.4, "test_objective": 0.9}
    assert verdict.record()["winner"] == {"name": "trial 7", "select_objective": 0.7, "test_objective": 0.5}
    assert verdict.headline == f"trial 7 {test.sentence()}"
    # a tie on select goes to the parent listed first, whatever the test scores say
    tied = {"first": parents["sharp"], "second": {**parents["broad"], "select": parents["sharp"]["select"]}}
    assert compare("trial 7", winner, tied, objective).best_parent == "first"


def test_a_weighted_objective_is_judged_as_a_whole_and_task_by_task():
    objective = Objective(weights={"add": 3.0, "gsm": 1.0})
    winner = {split: _result(split, add=_items(15), gsm=_items(4, n=10)) for split in ("select", "test")}
    parent = {split: _result(split, add=_items(10), gsm=_items(6, n=10)) for split in ("select", "test")}
    verdict = compare("trial 2", winner, {"only": parent}, objective, seed=0)
    test = {c.scope: c for c in verdict.comparisons if c.split == "test"}
    assert list(test) == [OBJECTIVE, "add", "gsm"]
    # add: +25 points, gsm: -20 points; the objective weighs them 3:1
    assert test["add"].points == pytest.approx(25.0) and test["gsm"].points == pytest.approx(-20.0)
    assert test[OBJECTIVE].points == pytest.approx((3 * 25.0 - 20.0) / 4)
    reference = stratified_paired_bootstrap(
        {"add": _items(15), "gsm": _items(4, n=10)},
        {"add": _items(10), "gsm": _items(6, n=10)},
        objective.weights,
        ITERS,
        0,
    )
    assert (test[OBJECTIVE].ci_low, test[OBJECTIVE].ci_high) == (100 * reference.ci_low, 100 * reference.ci_high)
    lines = verdict.lines()
    assert f"trial 2 {test[OBJECTIVE].sentence()}" in lines
    assert f"trial 2 on gsm {test['gsm'].sentence()}" in lines
    assert test["gsm"].sentence().startswith("does not beat its best parent on test (-20.0 points")
    record = verdict.record()
    assert record["best_parent"] == "only" and record["best_parent_chosen_on"] == "select"
    assert record["test"]["objective"]["points"] == test[OBJECTIVE].points
    assert record["test"]["tasks"]["add"]["beats"] is True and record["test"]["tasks"]["gsm"]["beats"] is False
    assert "| only (best parent) | 52.5 | 52.5 |" in verdict.markdown()


def test_models_scored_on_different_items_are_not_compared():
    objective = Objective(weights={"t": 1.0})
    winner = {"select": _result("select", t=_items(5)), "test": _result("test", t=_items(5))}
    parent = {"select": _result("select", t=_items(5)), "test": _result("test", t=_items(5, n=21))}
    with pytest.raises(RuntimeError, match="different test items of t"):
        compare("trial 0", winner, {"p": parent}, objective)
