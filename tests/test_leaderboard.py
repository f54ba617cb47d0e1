"""The leaderboard on a constructed study: what is ranked against what, and what every row says."""

import optuna
from optuna.trial import TrialState, create_trial

from search.leaderboard import leaderboard, summary

TOP_RUNG = 48


def _trial(state: TrialState, value: float | None = None, **attrs) -> optuna.trial.FrozenTrial:
    return create_trial(state=state, value=value, params={}, distributions={}, user_attrs=attrs)


def _study() -> optuna.Study:
    """The case of the issue, a pruned 0.3542 on 16 items against a complete 0.2986 on 48, among
    others: a failure, an interrupted trial re-run, and two parents scored as baselines."""
    study = optuna.create_study(study_name="constructed", direction="maximize")
    timing = {"merge_s": 0.2, "eval_s": 3.0}
    study.add_trial(_trial(TrialState.COMPLETE, 0.2986, fidelity=TOP_RUNG, seed=10, **timing))
    # Optuna gives a pruned trial its last reported step as value; ours is the mean where it stopped
    study.add_trial(_trial(TrialState.PRUNED, 1.0, fidelity=16, objective=0.3542, seed=11, **timing))
    study.add_trial(_trial(TrialState.COMPLETE, 0.3100, fidelity=TOP_RUNG, seed=12, **timing))
    study.add_trial(_trial(TrialState.FAIL, fail_reason="merge failed: OutOfMemoryError", seed=13, merge_s=0.1))
    study.add_trial(_trial(TrialState.FAIL, seed=14, merge_s=0.2))
    study.add_trial(
        _trial(
            TrialState.COMPLETE,
            0.2500,
            fidelity=TOP_RUNG,
            seed=14,
            retry_of=4,
            retry_reason="interrupted: host:42 ended mid-trial",
            **timing,
        )
    )
    study.add_trial(_trial(TrialState.PRUNED, 0.0, fidelity=16, objective=0.1000, seed=16, **timing))
    runs = {}
    for alias, value in (("general", 0.3000), ("math", 0.2000)):
        runs[alias] = {"mlflow_run_id": f"run-{alias}", "merge_s": 0.05}
        study.set_user_attr(
            f"baseline/{alias}/search", {"limit": TOP_RUNG, "values": [value], "result": {"seconds": 2.5}}
        )
    study.set_user_attr("baselines", runs)
    return study


def test_complete_trials_and_parents_rank_above_pruned_ones_then_failures():
    rows = leaderboard(_study())
    assert [(row["trial"], row["state"]) for row in rows] == [
        (2, "COMPLETE"),
        ("general", "BASELINE"),
        (0, "COMPLETE"),
        (5, "COMPLETE"),
        ("math", "BASELINE"),
        (1, "PRUNED"),
        (6, "PRUNED"),
        (3, "FAIL"),
        (4, "FAIL"),
    ]
    by_trial = {row["trial"]: row for row in rows}
    assert by_trial[1]["value"] == 0.3542 and by_trial[1]["fidelity"] == 16  # its mean on 16 items, not 1.0
    assert by_trial[0]["fidelity"] == by_trial["general"]["fidelity"] == TOP_RUNG
    for trial in (0, 1, 2, 5, 6):
        assert (by_trial[trial]["merge_s"], by_trial[trial]["eval_s"]) == (0.2, 3.0)
    assert by_trial[3]["note"] == "merge failed: OutOfMemoryError" and by_trial[3]["value"] is None
    assert by_trial[4]["note"] == "interrupted: host:42 ended mid-trial; re-run as trial 5"


def test_summary_has_an_items_column_and_counts_the_rows_it_leaves_out():
    lines = summary(_study(), top=2).splitlines()
    assert lines[0] == "study constructed: 3 complete, 2 pruned, 2 fail"
    assert lines[1].split() == ["trial", "state", "value", "items", "merge", "s", "eval", "s", "seed", "note"]
    table = [line.split() for line in lines[2:-1]]
    assert [row[:4] for row in table] == [
        ["2", "COMPLETE", "0.3100", "48"],
        ["general", "BASELINE", "0.3000", "48"],
        ["0", "COMPLETE", "0.2986", "48"],
        ["math", "BASELINE", "0.2000", "48"],
        ["1", "PRUNED", "0.3542", "16"],
        ["6", "PRUNED", "0.1000", "16"],
        ["3", "FAIL", "0.10", "13"],
        ["4", "FAIL", "0.20", "14"],
    ]  # no items, no value: merge s, seed
    assert " ".join(table[6]).endswith("merge failed: OutOfMemoryError")
    assert lines[-1].startswith("... 1 more complete not shown")  # trial 5: top=2 complete trials shown


def test_a_study_with_no_trial_and_no_parent_says_so_in_one_line():
    study = optuna.create_study(study_name="empty", direction="maximize")
    assert summary(study) == "study empty: no trial, no parent scored yet"
