"""Search spaces as Optuna distributions, and trial parameters as concrete mergekit configs.

Parameter names are ``METHOD/PARAMETER[/FILTER-or-MODEL][/ANCHOR]``, so each method's parameters
are conditional on ``method`` without two methods sharing (and confusing) one name.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from search.experiment import TASK_VECTOR_METHODS, Experiment, ExperimentError, Range, Searched

Params = Mapping[str, object]


def _anchor_names(name: str, anchors: int) -> list[str]:
    """One name for a plain value; ``name/I`` for each anchor of a gradient across the layers."""
    return [name] if anchors == 1 else [f"{name}/{i}" for i in range(anchors)]


def _searched(name: str, value: Searched | None, space: dict[str, BaseDistribution], anchors: int = 1) -> None:
    if isinstance(value, Range):
        for anchor in _anchor_names(name, anchors):
            space[anchor] = FloatDistribution(value.low, value.high, log=value.log)


def method_space(experiment: Experiment, method: str) -> dict[str, BaseDistribution]:
    """The distributions that ``method`` adds, in a fixed order."""
    section = getattr(experiment.space, method)
    space: dict[str, BaseDistribution] = {}
    if method == "slerp":
        for name in section.filters:
            for anchor in range(section.anchors):
                space[f"slerp/t/{name}/{anchor}"] = FloatDistribution(section.t.low, section.t.high)
    elif method == "linear":
        for alias in experiment.models:
            _searched(f"linear/weight/{alias}", section.weight, space)
    else:
        for alias in _task_vector_models(experiment):
            _searched(f"{method}/weight/{alias}", section.weight, space, section.anchors)
            _searched(f"{method}/density/{alias}", section.density, space, section.anchors)
        _searched(f"{method}/lambda", section.lambda_, space)
    return space


def full_space(experiment: Experiment) -> dict[str, BaseDistribution]:
    """Every distribution; ``method`` first when there is a choice of method."""
    methods = experiment.space.methods
    space: dict[str, BaseDistribution] = {}
    if len(methods) > 1:
        space["method"] = CategoricalDistribution(methods)
    for method in methods:
        space |= method_space(experiment, method)
    return space


def suggest(trial, experiment: Experiment) -> dict[str, object]:
    """Ask ``trial`` for the method, then for that method's parameters only (define-by-run)."""
    methods = experiment.space.methods
    method = trial.suggest_categorical("method", methods) if len(methods) > 1 else methods[0]
    params: dict[str, object] = {"method": method}
    for name, dist in method_space(experiment, method).items():
        params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    return params


MAX_GRID = 100_000  # grid points a study may hold: GridSampler lists them all at every start


def grid(experiment: Experiment) -> dict[str, list[object]]:
    """GridSampler's space: ``study.grid_points`` evenly spaced values per float (one method: the
    experiment's schema refuses a grid over several); ExperimentError if the grid is too large."""
    points, space = experiment.study.grid_points, full_space(experiment)
    if points ** len(space) > MAX_GRID:
        raise ExperimentError(
            f"study.grid_points: {points} values for each of {len(space)} searched parameters make "
            f"{points ** len(space)} grid points, more than {MAX_GRID}; lower grid_points or hold parameters fixed"
        )
    return {name: [float(v) for v in np.linspace(d.low, d.high, points)] for name, d in space.items()}


def expand_warm_start(experiment: Experiment, start: Mapping[str, object], where: str) -> dict[str, object]:
    """``slerp/t/mlp: [1, 0.5, 0]`` -> ``slerp/t/mlp/0: 1, ...``; unknown names raise naming ``where``."""
    space = full_space(experiment)
    params: dict[str, object] = {}
    for key, value in start.items():
        pairs = [(f"{key}/{i}", v) for i, v in enumerate(value)] if isinstance(value, list) else [(key, value)]
        for name, item in pairs:
            if name == "method" and len(experiment.space.methods) == 1:
                if item != experiment.space.methods[0]:
                    raise ExperimentError(f"{where}.method: {item!r} is not the space's method")
                continue
            if name not in space:
                raise ExperimentError(
                    f"{where}.{name}: not a parameter of the search space (parameters: {', '.join(space)})"
                )
            try:
                inside = space[name]._contains(space[name].to_internal_repr(item))
            except (ValueError, TypeError):
                inside = False  # not a number, or not one of a categorical's choices
            if not inside:
                raise ExperimentError(f"{where}.{name}: {item!r} is outside {space[name]}")
            params[name] = item
    return params


def _task_vector_models(experiment: Experiment) -> list[str]:
    return [alias for alias in experiment.models if alias != experiment.base_model]


def _resolved(section, field: str, name: str, params: Params, anchors: int = 1):
    """A field's value in the config: a held value as is, a searched one from ``params`` (a mergekit
    gradient if it has anchors)."""
    value = getattr(section, field)
    if not isinstance(value, Range):
        return value
    values = [params[anchor] for anchor in _anchor_names(name, anchors)]
    return values if anchors > 1 else values[0]


def to_config(experiment: Experiment, params: Params, refs: Mapping[str, str]) -> dict:
    """The mergekit config a trial's parameters describe; ``refs`` maps aliases to model paths."""
    method = params.get("method", experiment.space.methods[0])
    section = getattr(experiment.space, method)
    base = refs[experiment.base_model]
    config: dict = {"merge_method": method, "dtype": experiment.dtype}
    if method == "slerp":
        other = next(alias for alias in experiment.models if alias != experiment.base_model)
        gradients = [
            {"filter": name, "value": [params[f"slerp/t/{name}/{i}"] for i in range(section.anchors)]}
            for name in section.filters
            if name != "rest"
        ]
        gradients.append({"value": [params[f"slerp/t/rest/{i}"] for i in range(section.anchors)]})
        config |= {
            "base_model": base,
            "models": [{"model": base}, {"model": refs[other]}],
            "parameters": {"t": gradients},
        }
    elif method == "linear":
        config["models"] = [
            {
                "model": refs[alias],
                "parameters": {"weight": _resolved(section, "weight", f"linear/weight/{alias}", params)},
            }
            for alias in experiment.models
        ]
        config["parameters"] = {"normalize": section.normalize}
    else:
        assert method in TASK_VECTOR_METHODS
        models = []
        for alias in _task_vector_models(experiment):
            per_model = {"weight": _resolved(section, "weight", f"{method}/weight/{alias}", params, section.anchors)}
            if section.density is not None:
                per_model["density"] = _resolved(
                    section, "density", f"{method}/density/{alias}", params, section.anchors
                )
            models.append({"model": refs[alias], "parameters": per_model})
        config |= {"base_model": base, "models": models, "parameters": {}}
        if section.lambda_ is not None:
            config["parameters"]["lambda"] = _resolved(section, "lambda_", f"{method}/lambda", params)
        if section.normalize is not None:
            config["parameters"]["normalize"] = section.normalize
    return config
