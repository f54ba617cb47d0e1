"""`soupsearch export`: pick the winner on the select split, score it on test, write it out.

The best ``study.select_top`` trials by search score are rebuilt with their own seeds and scored on
select items; the winner (never chosen on test) is rebuilt, must reproduce its search score
exactly, is scored on test, and its weights are written from that very candidate.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from evals.harness import EvalResult
from merge_core.config import load_config
from merge_core.export import write_folder
from search.experiment import Experiment, ExperimentError
from search.space import to_config
from search.study import Settings, open_study
from search.tracking import Tracker
from search.workbench import Workbench


def finalists(study: optuna.Study, top: int) -> list[optuna.trial.FrozenTrial]:
    """The Pareto front for multi-objective studies, else the ``top`` best complete trials."""
    if len(study.directions) > 1:
        return study.best_trials
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: (-t.value, t.number))[:top]


def _scores(result: EvalResult) -> dict:
    return {task: {"metric": s.metric, "n": len(s.per_item), "mean": s.mean, "ci_low": s.ci_low,
                   "ci_high": s.ci_high} for task, s in result.items()}


def model_card(experiment: Experiment, trial: optuna.trial.FrozenTrial, method: str, config_yaml: str,
               select: EvalResult, test: EvalResult) -> str:
    rows = [f"| {split} | {s.task} | {s.metric} | {len(s.per_item)} | {100 * s.mean:.1f} "
            f"| [{100 * s.ci_low:.1f}, {100 * s.ci_high:.1f}] |"
            for split, result in (("select", select), ("test", test)) for s in result.values()]
    parents = "\n".join(f"- {alias}: `{ref}`" for alias, ref in experiment.models.items())
    return f"""# {experiment.name}: trial {trial.number}

Found by soupsearch (study `{experiment.study_name}`), chosen among the
best search trials on the **select** split; the **test** split was scored once, after the choice.

Method: `{method}`, merge seed {trial.user_attrs['seed']}. Parents:
{parents}

| split | task | metric | n | score (%) | 95% CI |
|---|---|---|---|---|---|
{chr(10).join(rows)}

## Configuration (mergekit)

```yaml
{config_yaml}```
"""


def export(experiment: Experiment, settings: Settings, out: Path) -> dict:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExperimentError(f"--out {out}: exists and is not empty")
    study = open_study(experiment, settings, create=False)
    candidates = finalists(study, experiment.study.select_top)
    if not candidates:
        raise ExperimentError(f"study {experiment.study_name!r} has no complete trial to export; run it first")
    bench = Workbench(experiment, settings.device)
    objective = experiment.evaluation.weights
    chosen, best = None, None
    for trial in candidates:
        bench.build(to_config(experiment, trial.params, bench.refs), trial.user_attrs["seed"])
        select = bench.score("select")
        if select.ok and (best is None or objective(select) > objective(best)):
            chosen, best = trial, select
    if chosen is None:
        raise RuntimeError(f"every finalist failed on the select split: {select.error}")
    config = to_config(experiment, chosen.params, bench.refs)
    text = yaml.safe_dump(config, sort_keys=False)
    plan = bench.engine.plan(config)
    bench.build(plan, chosen.user_attrs["seed"])
    # the weights about to be written must reproduce the trial's own search score, item for item,
    # scored rung by rung and in batches of the size the trial used, as other batches could flip
    # a borderline item in low precision
    if "batch_size" in chosen.user_attrs:
        bench.evaluator.use_batch_size(chosen.user_attrs["batch_size"])
    rungs = [r for r in experiment.evaluation.fidelity if r <= chosen.user_attrs["fidelity"]]
    *_, (_, _, search) = bench.score_rungs(rungs)
    if not search.ok:
        raise RuntimeError(f"trial {chosen.number} failed on the search split: {search.error}")
    reproduced = [search[task].mean for task in objective.weights] if len(study.directions) > 1 else objective(search)
    if reproduced != (chosen.values if len(study.directions) > 1 else chosen.value):
        raise RuntimeError(f"trial {chosen.number}: the rebuilt merge scores {reproduced} on search, "
                           f"not the {chosen.values} it scored in the study")
    test = bench.score("test")
    if not test.ok:
        raise RuntimeError(f"trial {chosen.number} failed on the test split: {test.error}")
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        write_folder(bench.engine, plan, load_config(config), text, staging, name=out.name)
        card = model_card(experiment, chosen, config["merge_method"], text, best, test)
        (staging / "README.md").write_text(card)
        record = {"trial": chosen.number, "seed": chosen.user_attrs["seed"], "objective": objective.name,
                  "search_objective_reproduced": reproduced,
                  "select": _scores(best), "test": _scores(test),
                  "select_objective": objective(best), "test_objective": objective(test),
                  "finalists": [t.number for t in candidates]}
        (staging / "scores.json").write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tracker = Tracker(settings.tracking_uri, experiment.name)
    parent = study.user_attrs["mlflow_parent_run_id"]
    tracker.log(parent, metrics={"export/select_objective": record["select_objective"],
                                 "export/test_objective": record["test_objective"]},
                texts={"export/README.md": card, "export/mergekit_config.yml": text},
                dicts={"export/scores.json": record})
    tracker.tag(parent, "soupsearch.exported_trial", str(chosen.number))
    return record
