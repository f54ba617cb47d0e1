"""`soupsearch validate`: check an experiment without running it, and describe its search space."""

from __future__ import annotations

from merge_core import Engine, Parents
from merge_core.config import load_config
from search.experiment import Experiment, ExperimentError, resolve_model
from search.soup import soup_config
from search.space import expand_warm_start, full_space, to_config


def sample_configs(experiment: Experiment, refs: dict[str, str]) -> dict[str, dict]:
    """One concrete mergekit config per method (each range at its midpoint) and per warm start."""
    space = full_space(experiment)
    configs = {}
    for method in experiment.space.methods:
        middle = {name: (d.low + d.high) / 2 for name, d in space.items() if name != "method"}
        configs[f"{method} (midpoint)"] = to_config(experiment, middle | {"method": method}, refs)
    for index, start in enumerate(experiment.warm_starts):
        where = f"warm_starts[{index}]"
        params = expand_warm_start(experiment, start, where)
        missing = [n for n in full_space(experiment) if n != "method" and n not in params
                   and n.startswith(f"{params.get('method', experiment.space.methods[0])}/")]
        if missing:
            raise ExperimentError(f"{where}: gives no value for {', '.join(missing)}")
        configs[where] = to_config(experiment, params, refs)
    return configs


def validate(experiment: Experiment, load: bool = False) -> str:
    """A description of the experiment; raises ExperimentError (or MergeInputError) naming the problem."""
    refs = {alias: str(resolve_model(ref, load=load)) for alias, ref in experiment.models.items()}
    lines = [f"experiment {experiment.name}: study {experiment.study_name!r}, sampler {experiment.study.sampler}, "
             f"pruner {experiment.study.pruner}, {experiment.study.trials} trials, seed {experiment.seed}",
             "models: " + ", ".join(f"{alias}={refs[alias]}" for alias in experiment.models)
             + f" (base {experiment.base_model})",
             f"objective: {experiment.evaluation.weights.name}; fidelity rungs (search items): "
             f"{experiment.evaluation.fidelity}"]
    if experiment.soup is not None:
        soup = experiment.soup
        lines.append(f"greedy soup over {len(soup.ingredients)} ingredients, order {soup.order}, "
                     f"noise-aware {soup.noise_aware}")
        configs = {"uniform soup": soup_config(experiment, refs, soup.ingredients)}
    else:
        lines.append("search space:")
        lines += [f"  {name:<36} {dist}" for name, dist in full_space(experiment).items()]
        configs = sample_configs(experiment, refs)
    engine = Engine(Parents.open(dict.fromkeys(refs.values()))) if load else None
    for label, config in configs.items():
        # mergekit's own MergeConfiguration checks every config; --load also plans it against the weights
        engine.plan(config) if engine else load_config(config)
    lines.append(f"{len(configs)} sample config(s) accepted by mergekit"
                 + (" and planned against the parents' weights" if load else "") + ": " + ", ".join(configs))
    return "\n".join(lines)
