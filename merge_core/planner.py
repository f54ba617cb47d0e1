"""Turn a mergekit config into one job per output tensor, exactly as mergekit's MergePlanner does.

The traversal mirrors mergekit 0.1.5 `plan.py` (models -> one slice per module, base appended,
embeddings from the first slice, final norm and lm_head from the last, t = idx/(n-1) per slice),
and parameters are resolved by mergekit's own `resolve_parameters`, so gradients, filters and
precedence are mergekit's. It differs only in reading configs and shapes from the loaded parents
instead of from disk, and in checking everything that would fail later before any arithmetic.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from mergekit.architecture import ConfiguredModuleArchitecture, WeightInfo, arch_info_for_config
from mergekit.common import ModelReference, set_config_value
from mergekit.config import (
    ConfigReader,
    InputSliceDefinition,
    MergeConfiguration,
    OutputModuleDefinition,
    OutputSliceDefinition,
)
from mergekit.merge_methods import MergeMethod
from mergekit.parameter_resolver import resolve_parameter, resolve_parameters
from mergekit.sparsify import SparsificationMethod
from pydantic import ValidationError
from transformers import PretrainedConfig

from merge_core.config import check_method, torch_dtype
from merge_core.errors import MergeInputError
from merge_core.parents import Parents, model_key
from user_input import one_line


@dataclass(frozen=True)
class Source:
    model: str  # parent key
    tensor: str  # tensor name inside that parent


@dataclass(frozen=True)
class TensorJob:
    """Everything needed to build one output tensor."""

    name: str
    sources: tuple[Source, ...]  # in mergekit's model order
    base: int | None  # index of the base model in `sources`
    shared: Mapping[str, Any]  # global method parameters (t, lambda, normalize, ...)
    per_input: Mapping[str, Mapping[str, Any]]  # parameter -> {model key: value}
    shape: tuple[int, ...]
    in_dtype: torch.dtype | None  # inputs are converted to this first (config `dtype`)
    out_dtype: torch.dtype  # what the candidate stores

    @property
    def models(self) -> list[str]:
        return [source.model for source in self.sources]


@dataclass(frozen=True)
class MergePlan:
    method: str
    jobs: tuple[TensorJob, ...]
    out_config: PretrainedConfig  # the donor's config with dtype and layer count updated
    donor: str  # base_model or first referenced model: tokenizer and config come from it


def plan_merge(config: MergeConfiguration, parents: Parents) -> MergePlan:
    method = check_method(config.merge_method)
    referenced = config.referenced_models()
    configs = {model_key(model): parents[model].config for model in referenced}
    arch = _common_architecture(configs)
    _check_vocabularies(config, configs)
    donor = model_key(config.base_model or referenced[0])
    modules = _normalize(config, arch, configs, method)
    out_config = _out_config(config, arch, configs[donor], modules)
    planner = _Planner(config, method, parents, configs, arch, out_config)
    for name, module in modules.items():
        planner.plan_module(name, module)
    return MergePlan(config.merge_method, tuple(planner.jobs), out_config, donor)


def _common_architecture(configs: Mapping[str, PretrainedConfig]):
    archs = {}
    for key, model_config in configs.items():
        try:
            archs[key] = arch_info_for_config(model_config)
        except (RuntimeError, TypeError):  # none or several architectures in config.json
            raise MergeInputError(
                f"model {key}: config.json must name exactly one architecture, not {model_config.architectures}"
            ) from None
        if archs[key] is None:
            raise MergeInputError(f"model {key}: architecture {model_config.architectures} is not known to mergekit")
    first_key, first = next(iter(archs.items()))
    for key, arch in archs.items():
        if arch != first:
            raise MergeInputError(
                f"models have different architectures: {first_key} is "
                f"{first.architectures[0]}, {key} is {arch.architectures[0]}"
            )
    return first


def _check_vocabularies(config: MergeConfiguration, configs: Mapping[str, PretrainedConfig]) -> None:
    sizes = {key: getattr(model_config, "vocab_size", None) for key, model_config in configs.items()}
    if len(set(sizes.values())) > 1 and config.tokenizer_source is None:
        listed = ", ".join(f"{key} ({size})" for key, size in sizes.items())
        raise MergeInputError(f"vocab sizes differ and no tokenizer_source is given: {listed}")


def _normalize(config: MergeConfiguration, arch, configs, method: MergeMethod) -> dict[str, OutputModuleDefinition]:
    """mergekit's MergePlanner.normalize_config, reading layer counts from the loaded configs."""
    if config.models:
        modules = {name: OutputModuleDefinition(models=config.models) for name in arch.modules}
    elif config.slices:
        if len(arch.modules) != 1:
            raise MergeInputError("slices: this architecture has several modules; use modules:")
        modules = {next(iter(arch.modules)): OutputModuleDefinition(slices=config.slices)}
    else:
        modules = {name: module.model_copy(deep=True) for name, module in config.modules.items()}
        for name in modules:
            if name not in arch.modules:
                raise MergeInputError(
                    f"modules: {name!r} is not a module of {arch.architectures[0]} ({', '.join(arch.modules)})"
                )
    base = config.base_model
    for name, module in modules.items():
        layers = arch.modules[name].architecture.num_layers
        if module.models:
            sources = [
                InputSliceDefinition(
                    model=m.model, parameters=m.parameters, layer_range=(0, layers(configs[model_key(m.model)]))
                )
                for m in module.models
            ]
            if base and all(m.model != base for m in module.models):
                sources.append(InputSliceDefinition(model=base, layer_range=(0, layers(configs[model_key(base)]))))
            module.slices, module.models = [OutputSliceDefinition(sources=sources)], None
        for index, out_slice in enumerate(module.slices):
            where = f"{name}.slices[{index}]"
            for source in out_slice.sources:
                start, end = source.layer_range
                available = layers(configs[model_key(source.model)])
                if not 0 <= start < end <= available:
                    raise MergeInputError(
                        f"{where}: layer_range [{start}, {end}] is outside model "
                        f"{source.model}, which has {available} layers"
                    )
            lengths = {s.layer_range[1] - s.layer_range[0] for s in out_slice.sources}
            if len(lengths) > 1:
                raise MergeInputError(f"{where}: sources have different numbers of layers {lengths}")
            try:
                method.validate_inputs(
                    [s.model for s in out_slice.sources], out_slice.base_model or base, group_name=where
                )
            except ValueError as problem:
                raise MergeInputError(f"merge_method {method.spec.name}: {problem}") from None
    return modules


def _out_config(
    config: MergeConfiguration, arch, donor: PretrainedConfig, modules: Mapping[str, OutputModuleDefinition]
) -> PretrainedConfig:
    """mergekit's _model_out_config: the donor's config with dtype and per-module layer counts."""
    out = copy.deepcopy(donor)
    if config.out_dtype or config.dtype:
        out.dtype = config.out_dtype or config.dtype  # what mergekit sets as torch_dtype (an alias)
    for name, module in modules.items():
        key = arch.modules[name].architecture.num_layers_config_key()
        if key:
            set_config_value(
                out, key, sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in module.slices)
            )
    return out


class _Planner:
    def __init__(
        self,
        config: MergeConfiguration,
        method: MergeMethod,
        parents: Parents,
        configs: Mapping[str, PretrainedConfig],
        arch,
        out_config: PretrainedConfig,
    ) -> None:
        self.config, self.method, self.parents = config, method, parents
        self.configs, self.arch, self.out_config = configs, arch, out_config
        self.jobs: list[TensorJob] = []
        self.out_layers = 0

    def _module_arch(self, module: str, model_config: PretrainedConfig) -> ConfiguredModuleArchitecture:
        definition = self.arch.modules[module]
        return ConfiguredModuleArchitecture(
            info=definition.architecture, config=model_config, weight_prefix=definition.weight_prefix
        )

    def plan_module(self, name: str, module: OutputModuleDefinition) -> None:
        self.out_layers = 0
        out_arch = self._module_arch(name, self.out_config)
        reader = ConfigReader(config=self.config, t=0, module=module)
        first, last = module.slices[0], module.slices[-1]
        for weight in out_arch.pre_weights():
            self.plan_tensor(
                weight, [weight] * len(first.sources), [s.model for s in first.sources], reader.for_out_slice(first)
            )
        for out_slice in module.slices:
            count = out_slice.sources[0].layer_range[1] - out_slice.sources[0].layer_range[0]
            slice_reader = reader.for_out_slice(out_slice)
            for offset in range(count):
                t = offset / (count - 1) if count > 1 else 1
                weights_out = out_arch.layer_weights(index=self.out_layers)
                weights_in = [
                    self._module_arch(name, self.configs[model_key(s.model)]).layer_weights(
                        index=s.layer_range[0] + offset
                    )
                    for s in out_slice.sources
                ]
                for index, weight in enumerate(weights_out):
                    self.plan_tensor(
                        weight,
                        [w[index] for w in weights_in],
                        [s.model for s in out_slice.sources],
                        slice_reader.with_t(t),
                    )
                self.out_layers += 1
        for weight in out_arch.post_weights():
            self.plan_tensor(
                weight, [weight] * len(first.sources), [s.model for s in last.sources], reader.for_out_slice(last)
            )

    def _resolve_name(self, model: ModelReference, weight: WeightInfo) -> str | None:
        headers = self.parents[model].headers
        names = [weight.name, *(weight.aliases or ()), *(weight.tied_names or ())]
        found = next((name for name in names if name in headers), None)
        if found is None and not weight.optional:
            raise MergeInputError(f"model {model}: tensor {weight.name} is missing")
        return found

    def plan_tensor(
        self, weight: WeightInfo, weights_in: list[WeightInfo], models: list[ModelReference], reader: ConfigReader
    ) -> None:
        pairs = list(zip(models, weights_in))  # zip: post weights pair first-slice infos, as mergekit
        names = [self._resolve_name(model, w) for model, w in pairs]
        if all(name is None for name in names):
            return  # an optional weight (e.g. an untied lm_head) that no parent has
        if any(name is None for name in names):
            raise MergeInputError(
                f"tensor {weight.name}: present in only some parents; mixed optional weights are not supported"
            )
        base = reader.base_model
        try:
            shared, per_model = resolve_parameters(
                self.method.spec,
                tensor_name=weight.name,
                inputs={model: w.name for model, w in pairs},
                sources=reader.parameter_sources,
                base_model=base,
                t=reader.t,
            )
        except (ValidationError, RuntimeError, ValueError) as problem:
            culprit = next(
                (p.name for p in self.method.spec.parameters if not _resolves(p, reader, weight.name, models)), "?"
            )
            if isinstance(problem, ValidationError):  # its location is mergekit's, not the user's
                problem = one_line(problem, located=False)
            raise MergeInputError(f"tensor {weight.name}: parameter {culprit}: {problem}") from None
        sources = tuple(Source(model_key(model), name) for (model, _), name in zip(pairs, names))
        headers = [self.parents[model].headers[name] for (model, _), name in zip(pairs, names)]
        if len({header.shape for header in headers}) > 1:
            shapes = ", ".join(f"{s.model}: {list(h.shape)}" for s, h in zip(sources, headers))
            raise MergeInputError(f"tensor {weight.name} has different shapes: {shapes}")
        in_dtype = torch_dtype(weight.force_dtype or self.config.dtype)
        listed = lambda: ", ".join(
            f"{s.model}: {str(h.dtype).removeprefix('torch.')}" for s, h in zip(sources, headers)
        )
        if any(not header.dtype.is_floating_point for header in headers):
            raise MergeInputError(f"tensor {weight.name}: not floating-point in every parent ({listed()})")
        if in_dtype is None and len({header.dtype for header in headers}) > 1:
            # the fast kernels compute in the stored dtype, which mixed parents do not have
            raise MergeInputError(
                f"tensor {weight.name}: parents store it in different dtypes ({listed()}); set the config's dtype"
            )
        per_input: dict[str, dict[str, Any]] = {}
        for model, values in per_model.items():
            for parameter, value in values.items():
                per_input.setdefault(parameter, {})[model_key(model)] = value
        job = TensorJob(
            name=weight.name,
            sources=sources,
            base=next((i for i, (m, _) in enumerate(pairs) if m == base), None),
            shared=shared,
            per_input=per_input,
            shape=headers[0].shape,
            in_dtype=in_dtype,
            out_dtype=torch_dtype(weight.force_dtype or self.config.out_dtype) or in_dtype or headers[0].dtype,
        )
        check_ranges(self.method, job)
        self.jobs.append(job)


def _resolves(parameter, reader: ConfigReader, tensor: str, models: list[ModelReference]) -> bool:
    """Whether one parameter resolves for every input; used only to name the one that does not."""
    try:
        for model in [None, *models]:
            resolve_parameter(
                parameter, tuple(reader.parameter_sources(model)), tensor_name=tensor, t=reader.t, model=model
            )
    except (ValidationError, RuntimeError, ValueError):
        return False
    return True


def check_ranges(method: MergeMethod, job: TensorJob) -> None:
    """Reject the parameter values that mergekit itself only rejects mid-merge, or silently NaNs."""
    bernoulli = getattr(method, "sparsification_method", None) == SparsificationMethod.random  # dare_*
    for parameter, value in [
        *job.shared.items(),
        *((p, v) for p, values in job.per_input.items() for v in values.values()),
    ]:
        if isinstance(value, float) and not math.isfinite(value):
            raise MergeInputError(f"tensor {job.name}: parameter {parameter} is {value}")
    densities = job.per_input.get("density", {})
    for model, density in densities.items():
        if bernoulli and density < 0:
            # torch.bernoulli inside mergekit raises for a keep probability below 0.
            raise MergeInputError(f"model {model}, tensor {job.name}: density {density} < 0")
        epsilon = job.per_input.get("epsilon", {}).get(model)
        if epsilon is not None and 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
            # mergekit's della_magprune raises for this mid-merge; say so up front.
            raise MergeInputError(
                f"model {model}, tensor {job.name}: density {density} +/- epsilon {epsilon} must stay inside (0, 1)"
            )
