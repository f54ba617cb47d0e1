"""`soupsearch export`: pick the winner on the select split, score it on test, write it out.

The best ``study.select_top`` trials by search score are rebuilt with their own seeds and scored on
select items; the winner (never chosen on test) is rebuilt, must reproduce its search score
exactly, is scored on test, and its weights are written from that very candidate. It is then
judged against its best parent (search.verdict), from the parents' scores the study keeps.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from atomic import atomic_folder
from evals.objectives import Objective
from evals.results import EvalResult
from merge_core.config import load_config
from merge_core.export import check_out_dir, write_folder
from search import baselines, output
from search.experiment import Experiment, ExperimentError
from search.space import full_space, method_space, to_config
from search.study import Settings, open_study
from search.tracking import Tracker
from search.verdict import Verdict, compare
from search.workbench import Workbench


def finalists(study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The Pareto front for multi-objective studies, else the ``top`` best complete trials."""
    if len(study.directions) > 1:
        return study.best_trials
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (-t.value, t.number))[:top]


def check_unchanged(experiment: Experiment, candidates: list[optuna.trial.FrozenTrial]) -> None:
    """ExperimentError if the finalists were run under another search space or other fidelity rungs
    than the experiment file gives now: their configs could not be rebuilt from it as they ran."""
    methods = experiment.space.methods
    for trial in candidates:
        method = trial.params.get("method", methods[0])
        space = {"method": full_space(experiment)["method"]} if len(methods) > 1 else {}
        space |= method_space(experiment, method) if method in methods else {}
        changed = sorted(
            n for n in space.keys() | trial.distributions.keys() if space.get(n) != trial.distributions.get(n)
        )
        if changed:
            raise ExperimentError(
                f"trial {trial.number} was run with another search space than the file gives now "
                f"({changed[0]} differs); export with the experiment file the study ran with"
            )
        if trial.user_attrs.get("fidelity") not in experiment.evaluation.fidelity:
            raise ExperimentError(
                f"evaluation.fidelity: trial {trial.number} was scored on {trial.user_attrs.get('fidelity')} "
                f"search items, not a rung of {experiment.evaluation.fidelity}; export with the experiment "
                "file the study ran with"
            )


def _scores(result: EvalResult) -> dict:
    return {
        task: {"metric": s.metric, "n": len(s.per_item), "mean": s.mean, "ci_low": s.ci_low, "ci_high": s.ci_high}
        for task, s in result.items()
    }


def model_card(
    experiment: Experiment,
    trial: optuna.trial.FrozenTrial,
    method: str,
    config_yaml: str,
    select: EvalResult,
    test: EvalResult,
    verdict: Verdict,
) -> str:
    rows = [
        f"| {split} | {s.task} | {s.metric} | {len(s.per_item)} | {100 * s.mean:.1f} "
        f"| [{100 * s.ci_low:.1f}, {100 * s.ci_high:.1f}] |"
        for split, result in (("select", select), ("test", test))
        for s in result.values()
    ]
    parents = "\n".join(f"- {alias}: `{ref}`" for alias, ref in experiment.models.items())
    return f"""# {experiment.name}: trial {trial.number}

Found by soupsearch (study `{experiment.study_name}`), chosen among the
best search trials on the **select** split; the **test** split was scored once, after the choice.

Method: `{method}`, merge seed {trial.user_attrs["seed"]}. Parents:
{parents}

| split | task | metric | n | score (%) | 95% CI |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## Against its parents

Every parent was scored as it is, on the same select and test items. The best parent is the one
with the best select objective (never chosen on test); each difference is this merge minus that
parent, in percentage points, with a 95% CI from a paired bootstrap over items, stratified by task.
Select also chose this merge among the finalists, so the test difference is the unbiased one.

{verdict.markdown()}

## Configuration (mergekit)

```yaml
{config_yaml}```
"""


def export(experiment: Experiment, settings: Settings, out: Path) -> dict:
    """Choose the winner on select among the finalists, verify its rebuilt weights against its search
    score, write the merge folder with its card and scores, and log them on the parent run."""
    check_out_dir(out)
    study = open_study(experiment, settings, create=False)
    candidates = finalists(study, experiment.study.select_top)
    if not candidates:
        raise ExperimentError(f"study {experiment.study_name!r} has no complete trial to export; run it first")
    check_unchanged(experiment, candidates)  # before the parents are scored again under the new file
    output.say(
        f"export: {len(candidates)} finalist(s) by search score (trial {', '.join(str(t.number) for t in candidates)})"
        "; each is rebuilt and scored on select, and the best one checked, scored on test and written"
    )
    bench = Workbench(experiment, settings.device)
    tracker = Tracker(settings.tracking_uri, experiment.name)
    parent_run = study.user_attrs["mlflow_parent_run_id"]
    parents = baselines.score(study, experiment, bench, tracker, parent_run)  # kept by `run`: read, not scored
    objective = experiment.evaluation.objective_function
    shown = output.Progress("export", len(candidates) + 3, "step")
    chosen, select = choose(experiment, objective, bench, candidates, shown)
    config = to_config(experiment, chosen.params, bench.refs)
    plan = bench.engine.plan(config)
    reproduced = verify(experiment, objective, study, bench, chosen, plan, shown)
    test = bench.score("test")
    if not test.ok:
        raise RuntimeError(f"trial {chosen.number} failed on the test split: {test.error}")
    shown.update(f"trial {chosen.number} on test: {objective(test):.4f}")
    verdict = compare(f"trial {chosen.number}", {"select": select, "test": test}, parents, objective, settings.seed)
    text = yaml.safe_dump(config, sort_keys=False)
    card = model_card(experiment, chosen, config["merge_method"], text, select, test, verdict)
    record = {
        "trial": chosen.number,
        "seed": chosen.user_attrs["seed"],
        "objective": objective.name,
        "search_objective_reproduced": reproduced,
        "select": _scores(select),
        "test": _scores(test),
        "select_objective": objective(select),
        "test_objective": objective(test),
        "finalists": [t.number for t in candidates],
        "verdict": verdict.record(),
    }
    write(out, bench, plan, config, text, card, record)
    shown.update(f"wrote {out}: weights, mergekit_config.yml, README.md, scores.json")
    shown.close()
    log(tracker, parent_run, chosen, text, card, record, {"select": select, "test": test}, verdict)
    return record


def choose(
    experiment: Experiment,
    objective: Objective,
    bench: Workbench,
    candidates: list[optuna.trial.FrozenTrial],
    shown: output.Progress,
) -> tuple[optuna.trial.FrozenTrial, EvalResult]:
    """The finalist with the best select objective (the first on ties), and its select scores."""
    chosen, best = None, None
    for trial in candidates:
        bench.build(to_config(experiment, trial.params, bench.refs), trial.user_attrs["seed"])
        select = bench.score("select")
        shown.update(f"trial {trial.number} on select: " + (f"{objective(select):.4f}" if select.ok else select.error))
        if select.ok and (best is None or objective(select) > objective(best)):
            chosen, best = trial, select
    if chosen is None:
        raise RuntimeError(f"every finalist failed on the select split: {select.error}")
    return chosen, best


def verify(
    experiment: Experiment,
    objective: Objective,
    study: optuna.Study,
    bench: Workbench,
    chosen: optuna.trial.FrozenTrial,
    plan,
    shown: output.Progress,
) -> float | list[float]:
    """Rebuild the chosen trial into the candidate and check that it reproduces the trial's own
    search score, item for item; the candidate then holds the weights that ``write`` saves."""
    bench.build(plan, chosen.user_attrs["seed"])
    # scored rung by rung and in batches of the size the trial used, as other batches could flip a
    # borderline item in low precision
    if "batch_size" in chosen.user_attrs:
        bench.evaluator.use_batch_size(chosen.user_attrs["batch_size"])
    rungs = [r for r in experiment.evaluation.fidelity if r <= chosen.user_attrs["fidelity"]]
    *_, (_, _, search) = bench.score_rungs(rungs)
    if not search.ok:
        raise RuntimeError(f"trial {chosen.number} failed on the search split: {search.error}")
    reproduced = objective.means(search) if len(study.directions) > 1 else objective(search)
    if reproduced != (chosen.values if len(study.directions) > 1 else chosen.value):
        raise RuntimeError(
            f"trial {chosen.number}: the rebuilt merge scores {reproduced} on search, "
            f"not the {chosen.values} it scored in the study"
        )
    shown.update(
        f"trial {chosen.number} rebuilt: its search score on {chosen.user_attrs['fidelity']} items "
        "reproduced, item for item"
    )
    return reproduced


def write(out: Path, bench: Workbench, plan, config: dict, text: str, card: str, record: dict) -> None:
    """The merge folder as mergekit-yaml writes it (``text``: the config as written), with the model
    card and scores.json, whole or not at all."""
    with atomic_folder(out) as staging:
        write_folder(bench.engine, plan, load_config(config), text, staging, name=out.name)
        (staging / "README.md").write_text(card)
        (staging / "scores.json").write_text(json.dumps(record, indent=2) + "\n")


def log(
    tracker: Tracker,
    parent_run: str,
    chosen: optuna.trial.FrozenTrial,
    text: str,
    card: str,
    record: dict,
    per_item: dict[str, EvalResult],
    verdict: Verdict,
) -> None:
    """The export on the study's parent MLflow run: objectives, card, config, scores, per-item results, verdict."""
    tracker.log(
        parent_run,
        metrics={
            "export/select_objective": record["select_objective"],
            "export/test_objective": record["test_objective"],
        },
        texts={"export/README.md": card, "export/mergekit_config.yml": text},
        dicts={"export/scores.json": record}
        | {f"export/per_item/{split}.json": result.record() for split, result in per_item.items()},
    )
    tracker.tag(parent_run, "soupsearch.exported_trial", str(chosen.number))
    verdict.log(tracker, parent_run)
