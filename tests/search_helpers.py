"""Small pico-zoo experiments for the search tests."""

from __future__ import annotations

from pathlib import Path

import yaml

PICO_SLERP = {
    "name": "pico-slerp",
    "models": {"general": "zoo:pico/general", "math": "zoo:pico/specialist-gsm8k"},
    "base_model": "general",
    "dtype": "float32",
    "space": {"slerp": {"anchors": 2}},
    "warm_starts": [{"slerp/t/self_attn": [0, 1], "slerp/t/mlp": [1, 0], "slerp/t/rest": [0.5, 0.5]}],
    "evaluation": {"tasks": ["tiny_gsm8k"], "fidelity": [8], "select_limit": 8, "test_limit": 8},
    "study": {"sampler": "tpe", "trials": 3},
    "device": "cpu",
}


def write_experiment(folder: Path, experiment: dict = PICO_SLERP, name: str = "exp.yaml", **changes) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump({**experiment, **changes}, sort_keys=False))
    return path
