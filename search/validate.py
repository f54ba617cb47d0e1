"""`soupsearch validate`: check an experiment without running it, and describe its search space."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from evals.harness import known_tasks, load_tasks
from evals.spec import TaskSpec
from evals.splits import split_items
from search.experiment import Experiment, ExperimentError, resolve_model
from search.soup import soup_config
from search.space import expand_warm_start, full_space, grid, to_config

if TYPE_CHECKING:  # mergekit's tables load only with --load: they take seconds to import
    from merge_core import Engine


def midpoint_configs(experiment: Experiment, refs: dict[str, str]) -> dict[str, dict]:
    """One concrete mergekit config per method, each range at its midpoint."""
    space = full_space(experiment)
    middle = {name: (d.low + d.high) / 2 for name, d in space.items() if name != "method"}
    return {
        f"{method} (midpoint)": to_config(experiment, middle | {"method": method}, refs)
        for method in experiment.space.methods
    }


def sample_configs(experiment: Experiment, refs: dict[str, str]) -> dict[str, dict]:
    """The midpoint configs, and one concrete mergekit config per warm start."""
    configs = midpoint_configs(experiment, refs)
    for index, start in enumerate(experiment.warm_starts):
        where = f"warm_starts[{index}]"
        params = expand_warm_start(experiment, start, where)
        missing = [
            n
            for n in full_space(experiment)
            if n != "method"
            and n not in params
            and n.startswith(f"{params.get('method', experiment.space.methods[0])}/")
        ]
        if missing:
            raise ExperimentError(f"{where}: gives no value for {', '.join(missing)}")
        configs[where] = to_config(experiment, params, refs)
    return configs


def configs_to_check(experiment: Experiment, refs: dict[str, str]) -> dict[str, dict]:
    """A soup experiment's uniform soup, else the sample configs."""
    if experiment.soup is not None:
        return {"uniform soup": soup_config(experiment, refs, experiment.soup.ingredients)}
    return sample_configs(experiment, refs)


def check_configs(experiment: Experiment, refs: dict[str, str], engine: Engine) -> list[str]:
    """The sample configs' labels, once mergekit's own MergeConfiguration accepts each and the
    parents' engine plans it against their weights (shapes, tensors): what `validate --load` and
    `run` check before any work."""
    configs = configs_to_check(experiment, refs)
    for config in configs.values():
        engine.plan(config)
    return list(configs)


def check_fidelity(experiment: Experiment) -> None:
    """ExperimentError if the top fidelity rung asks for more search items than a task's split holds
    (lm-eval would score fewer items than every record says). Reads the tasks' datasets."""
    top, seed = experiment.evaluation.fidelity[-1], experiment.evaluation.split_seed
    for name, task in load_tasks([TaskSpec.of(task) for task in experiment.evaluation.tasks]).items():
        held = len(split_items(name, len(task.eval_docs), seed).search)
        if held < top:
            raise ExperimentError(
                f"evaluation.fidelity: the top rung is {top} items, but task {name!r} has {held} search items "
                f"(a third of its {len(task.eval_docs)})"
            )


def validate(experiment: Experiment, load: bool = False) -> str:
    """A description of the experiment; raises a UserError naming the problem. The tasks are looked
    up in lm-eval's index; with ``load``, their datasets are read and the models opened too."""
    refs = {alias: str(resolve_model(ref, load=load)) for alias, ref in experiment.models.items()}
    lines = [
        f"experiment {experiment.name}: study {experiment.study_name!r}, sampler {experiment.study.sampler}, "
        f"pruner {experiment.study.pruner}, {experiment.study.trials} trials, seed {experiment.seed}",
        "models: "
        + ", ".join(f"{alias}={refs[alias]}" for alias in experiment.models)
        + f" (base {experiment.base_model})",
        f"objective: {experiment.evaluation.objective_function.name}; fidelity rungs (search items): "
        f"{experiment.evaluation.fidelity}",
    ]
    if experiment.soup is not None:
        soup = experiment.soup
        lines.append(
            f"greedy soup over {len(soup.ingredients)} ingredients, order {soup.order}, noise-aware {soup.noise_aware}"
        )
    else:
        lines.append("search space:")
        lines += [f"  {name:<36} {dist}" for name, dist in full_space(experiment).items()]
        if experiment.study.sampler == "grid":
            lines.append(f"grid: {math.prod(len(values) for values in grid(experiment).values())} points")
    if load:
        from merge_core import Engine, Parents

        labels = check_configs(experiment, refs, Engine(Parents.open(dict.fromkeys(refs.values()))))
        lines.append(
            f"{len(labels)} sample config(s) accepted by mergekit and planned against the parents' "
            f"weights: {', '.join(labels)}"
        )
    else:
        labels = list(configs_to_check(experiment, refs))
        lines.append(
            f"{len(labels)} sample config(s) built: {', '.join(labels)} (--load has mergekit check them "
            "against the weights)"
        )
    if load:
        check_fidelity(experiment)
    else:
        known_tasks([TaskSpec.of(task) for task in experiment.evaluation.tasks])
    lines.append(
        f"tasks {', '.join(experiment.evaluation.task_names)}: known to lm-eval" + (", datasets read" if load else "")
    )
    return "\n".join(lines)
