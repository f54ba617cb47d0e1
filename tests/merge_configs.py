"""mergekit configs over the pico zoo that the merge_core tests share (one per method or feature)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merge_core.methods import METHODS

# Methods whose masks come from mergekit's unseeded global RNG: compared by statistics only.
RANDOM_METHODS = frozenset(name for name, method in METHODS.items() if method.random_masks)


def configs(zoo: Path) -> dict[str, dict[str, Any]]:
    """Every mergekit 0.1.5 method once, plus gradients, filters, slices, passthrough and friends."""
    base, add, sub, mul, gsm = (
        str(zoo / name)
        for name in (
            "base",
            "specialist-addition",
            "specialist-subtraction",
            "specialist-multiplication",
            "specialist-gsm8k",
        )
    )

    def task_family(method: str, **extra: Any) -> dict[str, Any]:
        return {
            "merge_method": method,
            "base_model": base,
            "models": [
                {"model": add, "parameters": {"weight": 0.5, "density": 0.6, **extra}},
                {"model": sub, "parameters": {"weight": 0.3, "density": 0.4, **extra}},
                {"model": gsm, "parameters": {"weight": -0.2, "density": 0.8, **extra}},
            ],
        }

    return {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": add, "parameters": {"weight": 0.7}}, {"model": gsm, "parameters": {"weight": 0.3}}],
        },
        "linear_negative_unnormalized": {
            "merge_method": "linear",
            "parameters": {"normalize": False},
            "models": [{"model": base, "parameters": {"weight": 1.5}}, {"model": mul, "parameters": {"weight": -0.5}}],
        },
        "slerp_gradient": {
            "merge_method": "slerp",
            "base_model": base,
            "dtype": "float32",
            "models": [{"model": base}, {"model": gsm}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0]},
                    {"value": 0.3},
                ]
            },
        },
        "nuslerp": {
            "merge_method": "nuslerp",
            "base_model": base,
            "models": [{"model": add, "parameters": {"weight": 0.4}}, {"model": mul, "parameters": {"weight": 0.6}}],
        },
        "multislerp": {
            "merge_method": "multislerp",
            "models": [
                {"model": add, "parameters": {"weight": 1.0}},
                {"model": sub, "parameters": {"weight": 2.0}},
                {"model": gsm, "parameters": {"weight": 1.0}},
            ],
        },
        "karcher": {"merge_method": "karcher", "models": [{"model": add}, {"model": sub}, {"model": gsm}]},
        "passthrough_slices": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 2]}]},
                {"sources": [{"model": gsm, "layer_range": [1, 2], "parameters": {"scale": 0.5}}]},
            ],
        },
        "task_arithmetic": task_family("task_arithmetic"),
        "ties": task_family("ties"),
        "ties_filters_lambda": {
            **task_family("ties"),
            "parameters": {"lambda": 1.3, "density": [{"filter": "mlp", "value": 0.3}, {"value": [0.9, 0.5]}]},
        },
        "dare_ties": task_family("dare_ties"),
        "dare_linear": task_family("dare_linear"),
        "breadcrumbs": task_family("breadcrumbs", gamma=0.02),
        "breadcrumbs_ties": task_family("breadcrumbs_ties", gamma=0.02),
        "della": task_family("della", epsilon=0.1),
        "della_linear": task_family("della_linear", epsilon=0.1),
        "sce": {
            "merge_method": "sce",
            "base_model": base,
            "parameters": {"select_topk": 0.5},
            "models": [{"model": add}, {"model": sub}, {"model": gsm}],
        },
        "model_stock": {
            "merge_method": "model_stock",
            "base_model": base,
            "models": [{"model": add}, {"model": sub}, {"model": gsm}],
        },
        "nearswap": {
            "merge_method": "nearswap",
            "base_model": base,
            "parameters": {"t": 0.001},
            "models": [{"model": gsm}],
        },
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": gsm}]},
        "ram": {"merge_method": "ram", "base_model": base, "models": [{"model": add}, {"model": sub}]},
        "ramplus_tl": {
            "merge_method": "ramplus_tl",
            "base_model": base,
            "parameters": {"r": 0.2},
            "models": [{"model": add}, {"model": sub}],
        },
        "slices_two_slerp_bf16_out": {
            "merge_method": "slerp",
            "base_model": base,
            "out_dtype": "bfloat16",
            "parameters": {"t": [0.2, 0.8]},
            "slices": [
                {"sources": [{"model": base, "layer_range": [0, 1]}, {"model": add, "layer_range": [0, 1]}]},
                {
                    "sources": [{"model": base, "layer_range": [1, 2]}, {"model": add, "layer_range": [1, 2]}],
                    "parameters": {"t": 0.9},
                },
            ],
        },
        "task_arithmetic_bf16": {**task_family("task_arithmetic"), "dtype": "bfloat16"},
    }
