"""The parents as baselines: each scored once per study, as it is, on exactly the trials' items.

A parent is built as a soup of itself alone (mergekit linear, weight 1), which reproduces its
weights bit for bit, and scored through the trials' own Workbench path: the search split rung by
rung up to the top fidelity rung, then select and test. Each result is kept in the study's user
attrs (one per parent and split, with the item count asked for), so a resumed run, ``status`` and
``export`` read it back instead of scoring again. Each parent has one MLflow run beside the trials.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import optuna

from search import output
from search.experiment import Experiment, ExperimentError
from search.tracking import Tracker, split_metrics

if TYPE_CHECKING:  # `status` reads the rows without loading torch through them
    from evals.results import EvalResult
    from search.workbench import Workbench

SPLITS = ("search", "select", "test")
RUNS = "baselines"  # user attr: alias -> its MLflow run id and build seconds


def _key(alias: str, split: str) -> str:
    return f"baseline/{alias}/{split}"


def _limits(experiment: Experiment) -> dict[str, int | None]:
    """Items per split, as trials and export ask for them (None: the whole split)."""
    evaluation = experiment.evaluation
    return {"search": evaluation.fidelity[-1], "select": evaluation.select_limit, "test": evaluation.test_limit}


def _score(bench: Workbench, experiment: Experiment, split: str) -> EvalResult:
    if split != "search":
        return bench.score(split)
    *_, (_, _, result) = bench.score_rungs(experiment.evaluation.fidelity)  # the very batches a trial scores
    return result


def missing(study: optuna.Study, experiment: Experiment) -> dict[str, list[str]]:
    """alias -> the splits on which the study holds no score of that parent on these items yet."""
    attrs, limits = study.user_attrs, _limits(experiment)
    todo = {
        alias: [
            split
            for split in SPLITS
            if _key(alias, split) not in attrs or attrs[_key(alias, split)]["limit"] != limits[split]
        ]
        for alias in experiment.models
    }
    return {alias: splits for alias, splits in todo.items() if splits}


def score(
    study: optuna.Study, experiment: Experiment, bench: Workbench, tracker: Tracker, parent_run: str
) -> dict[str, dict[str, EvalResult]]:
    """Every parent on every split (alias -> split -> result): read from the study, or scored, with
    a progress display, where the study holds no result on these items yet."""
    from evals.results import EvalResult
    from search.soup import soup_config

    attrs, limits, todo = study.user_attrs, _limits(experiment), missing(study, experiment)
    results = {
        alias: {
            split: EvalResult.from_record(attrs[_key(alias, split)]["result"])
            for split in SPLITS
            if split not in todo.get(alias, ())
        }
        for alias in experiment.models
    }
    objective, runs = experiment.evaluation.objective_function, attrs.get(RUNS, {})
    for alias in runs.keys() - todo.keys():  # scored in full by a process killed before it ended the run
        tracker.end_if_running(runs[alias]["mlflow_run_id"])
    if not todo:
        return results
    with output.progress("baselines", sum(map(len, todo.values())), "eval") as shown:
        for alias, splits in todo.items():
            report = bench.build(soup_config(experiment, bench.refs, [alias]), experiment.seed)
            if alias not in runs:
                runs[alias] = {
                    "mlflow_run_id": tracker.baseline_run(parent_run, study.study_name, alias),
                    "merge_s": report.seconds,
                }
                study.set_user_attr(RUNS, runs)
            run, status = runs[alias]["mlflow_run_id"], "FAILED"
            try:
                for split in splits:
                    result = _score(bench, experiment, split)
                    if not result.ok:  # a model as the user gave it, on the user's tasks: as `eval` judges it
                        raise ExperimentError(
                            f"model {alias} ({experiment.models[alias]}) cannot be scored on the {split} split: "
                            f"{result.error}"
                        )
                    # MLflow first: a process killed between the two writes leaves the split unrecorded
                    # in the study, so the next one scores and logs it again rather than never
                    fidelity = {"fidelity": limits[split]} if split == "search" else {}  # as a trial's column
                    tracker.log(
                        run,
                        metrics=split_metrics(split, objective(result), result) | fidelity,
                        dicts={f"per_item/{split}.json": result.record()},
                    )
                    # what a trial records: the objective, or each task's mean in a multi-objective study
                    values = objective.means(result) if len(study.directions) > 1 else [objective(result)]
                    study.set_user_attr(
                        _key(alias, split), {"limit": limits[split], "values": values, "result": result.record()}
                    )
                    results[alias][split] = result
                    shown.update(f"parent {alias} on {split}: {objective(result):.4f}", parent=alias)
                status = "FINISHED"
            finally:
                tracker.end(run, status)
    return results


def rows(study: optuna.Study) -> list[dict]:
    """Leaderboard rows: each parent scored so far, by its search score at the top rung."""
    attrs, rows = study.user_attrs, []
    for alias, run in attrs.get(RUNS, {}).items():
        search = attrs.get(_key(alias, "search"))
        if search is not None:
            rows.append(
                {
                    "trial": alias,
                    "state": "BASELINE",
                    "value": search["values"][0],
                    "method": "",
                    "fidelity": search["limit"],
                    "merge_s": run["merge_s"],
                    "eval_s": search["result"]["seconds"],
                    "seed": None,
                    "note": "",
                }
            )
    return rows
