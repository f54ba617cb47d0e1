"""Read a mergekit configuration (YAML text, file or dict) into mergekit's own validated model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from mergekit import merge_methods
from mergekit.common import dtype_from_name
from mergekit.config import MergeConfiguration
from pydantic import ValidationError

from merge_core.errors import MergeInputError
from merge_core.parents import model_key
from user_input import one_line, parse_yaml, read_file

ConfigSource = str | Path | Mapping[str, Any] | MergeConfiguration


def load_config(source: ConfigSource, file: Path | None = None) -> MergeConfiguration:
    """Parse and check the parts of a config that need no model: structure, method, dtypes.
    ``file``: where a parsed ``source`` was read from, for the messages."""
    if isinstance(source, MergeConfiguration):
        return source.model_copy(deep=True)
    if isinstance(source, Path) or (
        isinstance(source, str) and "\n" not in source and source.endswith((".yaml", ".yml"))
    ):
        file = Path(source)
        raw = parse_yaml(read_file(file, "merge config file"), str(file))
    else:
        raw = parse_yaml(source, "merge config") if isinstance(source, str) else source
    where = f"{file}: " if file else ""
    if not isinstance(raw, Mapping):
        raise MergeInputError(f"{where}a merge config must be a mapping with merge_method and models/slices")
    try:
        # mergekit's own schema, with unknown keys refused: pydantic would drop a misspelt key silently
        config = MergeConfiguration.model_validate(dict(raw), extra="forbid")
    except ValidationError as problem:
        raise MergeInputError(f"{where}invalid merge config: {one_line(problem)}") from None
    except RuntimeError as problem:
        raise MergeInputError(f"{where}invalid merge config: {problem}") from None
    check_method(config.merge_method)
    for key in ("dtype", "out_dtype"):
        torch_dtype(getattr(config, key), key)
    unsupported = [
        key for key in ("tokenizer", "tokenizer_source", "chat_template") if getattr(config, key) is not None
    ]
    if unsupported:
        # The vocabulary permutation mergekit applies for these is not built yet.
        raise MergeInputError(
            f"config key {unsupported[0]!r} is not supported by soupsearch merge; "
            "use mergekit-yaml for tokenizer surgery"
        )
    _check_inputs(config, where)
    for model in config.referenced_models():
        if model.lora is not None or model.override_architecture is not None:
            raise MergeInputError(
                f"model {model}: LoRA adapters and architecture overrides are not supported; merge the adapter first"
            )
    return config


def _check_inputs(config: MergeConfiguration, where: str) -> None:
    """Each slice has sources, and lists each parent once: mergekit refuses a path given twice without
    naming it, and two spellings of one folder (``m`` and ``m/``) would be one parent here."""
    groups = {"models": config.models} if config.models else {}
    groups |= {f"slices[{i}].sources": s.sources for i, s in enumerate(config.slices or [])}
    for name, module in (config.modules or {}).items():
        groups |= {f"modules.{name}.models": module.models} if module.models else {}
        groups |= {f"modules.{name}.slices[{i}].sources": s.sources for i, s in enumerate(module.slices or [])}
    base = config.base_model
    base_key = model_key(base) if base is not None else None
    for key, inputs in groups.items():
        if not inputs:
            raise MergeInputError(f"{where}{key}: no models to merge")
        seen: dict[str, object] = {}
        for entry in inputs:
            model, folder = entry.model, model_key(entry.model)
            first = seen.setdefault(folder, model)
            if folder == base_key and model != base:
                raise MergeInputError(f"{where}{key}: model {model} is base_model {base} under another name")
            if first is not model:
                also = "" if str(first) == str(model) else f" (also as {first})"
                raise MergeInputError(f"{where}{key}: model {model} is listed twice{also}; list each parent once")


def check_method(name: str) -> merge_methods.MergeMethod:
    try:
        return merge_methods.get(name)
    except RuntimeError:
        known = ", ".join(sorted(m.spec.name for m in merge_methods.registered_methods()))
        raise MergeInputError(f"unknown merge_method {name!r}; mergekit registers: {known}") from None


def torch_dtype(name: str | None, key: str = "dtype") -> torch.dtype | None:
    try:
        dtype = dtype_from_name(name)
    except RuntimeError:
        dtype = torch.int64  # rejected below with the key's name
    if dtype is not None and not dtype.is_floating_point:
        raise MergeInputError(f"{key}: {name!r} is not a floating-point dtype (bfloat16, float16, float32 or float64)")
    return dtype
