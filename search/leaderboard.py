"""The leaderboard: what `run` ends with and `status` prints, and MLflow keeps as leaderboard.json.

Complete trials and the parents (``BASELINE`` rows) are ranked together by their score on the
items of the top fidelity rung. Pruned trials come after them: their score is on the fewer items
of the rung where they stopped, so it is never ranked against a full one. Failed and interrupted
trials come last, with their reason. Every row says on how many items (per task) its score is.
"""

from __future__ import annotations

import math
from collections import Counter

import optuna
from optuna.trial import TrialState

from search import baselines

GROUPS = {"COMPLETE": 0, "BASELINE": 0, "PRUNED": 1, "FAIL": 2}
SHOWN = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def _rank(row: dict) -> tuple:
    value = row["value"] if row["value"] is not None else -math.inf
    return GROUPS[row["state"]], -(row["fidelity"] or 0), -value


def _note(trial: optuna.trial.FrozenTrial, retried: dict[int, optuna.trial.FrozenTrial]) -> str:
    if trial.number in retried:
        retry = retried[trial.number]
        return f"{retry.user_attrs.get('retry_reason', 'interrupted')}; re-run as trial {retry.number}"
    # ours, or Optuna's own (a NaN objective, say)
    return trial.user_attrs.get("fail_reason", trial.system_attrs.get("fail_reason", ""))


def trial_value(trial: optuna.trial.FrozenTrial) -> float | None:
    """A complete trial's (first) objective; a pruned one's objective at the rung where it stopped
    (Optuna's own value for it is the last reported step: one item's score under Wilcoxon)."""
    if trial.state == TrialState.PRUNED:
        return trial.user_attrs.get("objective")
    return trial.values[0] if trial.values else None


def leaderboard(study: optuna.Study) -> list[dict]:
    """Every finished and failed trial and every parent scored as a baseline, in ranking order."""
    trials = study.get_trials(deepcopy=False, states=SHOWN)
    retried = {t.user_attrs["retry_of"]: t for t in study.get_trials(deepcopy=False) if "retry_of" in t.user_attrs}
    rows = [
        {
            "trial": trial.number,
            "state": trial.state.name,
            "value": trial_value(trial),
            "method": trial.params.get("method", ""),
            "fidelity": trial.user_attrs.get("fidelity"),
            "merge_s": trial.user_attrs.get("merge_s"),
            "eval_s": trial.user_attrs.get("eval_s"),
            "seed": trial.user_attrs.get("seed"),
            "note": _note(trial, retried),
        }
        for trial in trials
    ]
    return sorted(rows + baselines.rows(study), key=_rank)


def summary(study: optuna.Study, top: int = 10) -> str:
    """The study's counts, then up to ``top`` trials of each kind (complete, pruned, failed), every
    parent, and how many rows are left out."""
    counts = {state.name: len(study.get_trials(deepcopy=False, states=(state,))) for state in TrialState}
    rows, shown, hidden = [], Counter(), Counter()
    for row in leaderboard(study):
        if row["state"] == "BASELINE" or shown[row["state"]] < top:
            shown[row["state"]] += 1
            rows.append(row)
        else:
            hidden[row["state"].lower()] += 1
    width = max([5] + [len(str(row["trial"])) for row in rows])  # a baseline's trial column is its alias
    said = ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n)
    if not rows:
        return f"study {study.study_name}: {said or 'no trial'}, no parent scored yet"
    lines = [
        f"study {study.study_name}: {said or 'no trial yet'}",
        f"{'trial':>{width}}  {'state':<8} {'value':>8} {'items':>5}  {'merge s':>7}  {'eval s':>7}  "
        f"{'seed':>10}  note",
    ]
    for row in rows:
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        items = "" if row["fidelity"] is None else row["fidelity"]
        timing = [f"{row[k]:7.2f}" if row[k] is not None else f"{'':>7}" for k in ("merge_s", "eval_s")]
        lines.append(
            f"{row['trial']:>{width}}  {row['state']:<8} {value:>8} {items:>5}  {timing[0]}  {timing[1]}  "
            f"{row['seed'] if row['seed'] is not None else '':>10}  {str(row['note'])[:60]}"
        )
    if hidden:
        lines.append(
            f"... {', '.join(f'{n} more {kind}' for kind, n in hidden.items())} not shown "
            "(every row: the parent run's leaderboard.json in MLflow)"
        )
    return "\n".join(lines)
