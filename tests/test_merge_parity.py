"""`soupsearch merge` against the `mergekit-yaml` binary, config by config, on pico zoo models.

mergekit-yaml runs every config of the module in one interpreter (tests/cli_batch.py, through the
script's own entry point), which saves importing mergekit once per config."""

from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from merge_configs import RANDOM_METHODS, configs
from safetensors import safe_open

from search.cli import main
from tests.cli_batch import run_batch

pytestmark = pytest.mark.slow
MERGEKIT_YAML = "mergekit.scripts.run_yaml:main"  # the `mergekit-yaml` console script
CASES = sorted(configs(Path("zoo")))
SPARSIFIED = ("dare_linear", "della_linear")
DENSITY = 0.3


def sparsification(method: str, zoo: Path) -> dict:
    """One task vector at weight 1, sparsified at DENSITY by ``method``."""
    return {
        "merge_method": method,
        "base_model": str(zoo / "base"),
        "dtype": "float64",
        "models": [
            {
                "model": str(zoo / "specialist-gsm8k"),
                "parameters": {"weight": 1.0, "density": DENSITY, "epsilon": 0.1},
            }
        ],
    }


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as reader:
            tensors.update({name: reader.get_tensor(name) for name in reader.keys()})
    return tensors


@pytest.fixture(scope="module")
def mergekit_yaml(pico_zoo, tmp_path_factory) -> dict[str, tuple[Path, Path, dict]]:
    """Name -> (config file, mergekit-yaml's output folder, its exit code and stderr), for every
    config of the module."""
    folder = tmp_path_factory.mktemp("mergekit-yaml")
    every = configs(pico_zoo) | {f"{m}-statistics": sparsification(m, pico_zoo) for m in SPARSIFIED}
    runs = {}
    for name, config in every.items():
        (folder / name).mkdir()
        config_file = folder / name / "config.yaml"
        config_file.write_text(yaml.safe_dump(config))
        runs[name] = (config_file, folder / name / "mergekit")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    results = run_batch([([str(c), str(out)], out.parent) for c, out in runs.values()], env, MERGEKIT_YAML)
    return {name: (*runs[name], result) for name, result in zip(runs, results, strict=True)}


def build_both(name: str, built: dict, tmp: Path) -> tuple[Path, Path]:
    """mergekit-yaml's folder for config ``name`` and `soupsearch merge`'s, built here from the same file."""
    config_file, theirs, done = built[name]
    assert done["code"] == 0, done["stderr"][-3000:]
    ours = tmp / "ours"
    killed = tmp / ".ours.partial-killed"  # what a merge into the same folder that was killed left
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"half")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same summation order as mergekit-yaml (iterative karcher)
    try:
        assert main(["merge", str(config_file), str(ours), "--device", "cpu"]) == 0
    finally:
        torch.set_num_threads(threads)
    return theirs, ours


def within_one_ulp(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    ulp = torch.nextafter(theirs.abs(), torch.tensor(float("inf"), dtype=theirs.dtype)) - theirs.abs()
    return bool(((ours.float() - theirs.float()).abs() <= ulp.float()).all())


@pytest.mark.parametrize("name", CASES)
def test_same_folder_as_mergekit_yaml(name, pico_zoo, mergekit_yaml, tmp_path):
    theirs, ours = build_both(name, mergekit_yaml, tmp_path)
    expected, built = read_folder(theirs), read_folder(ours)
    assert list(built) == list(expected)
    for tensor, value in expected.items():
        assert (built[tensor].shape, built[tensor].dtype) == (value.shape, value.dtype), tensor
        if configs(pico_zoo)[name]["merge_method"] not in RANDOM_METHODS:
            assert within_one_ulp(built[tensor], value), tensor
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "mergekit_config.yml"):
        assert filecmp.cmp(ours / file, theirs / file, shallow=False), file
    assert not list(tmp_path.glob(".ours.partial-*"))  # neither this merge's staging nor a killed one's
    assert ours.stat().st_mode & 0o777 == theirs.stat().st_mode & 0o777  # as readable as mergekit-yaml's folder


def test_passthrough_changes_layer_count(mergekit_yaml, tmp_path):
    _, ours = build_both("passthrough_slices", mergekit_yaml, tmp_path)
    assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == 3
    assert "model.layers.2.mlp.down_proj.weight" in read_folder(ours)


@pytest.mark.parametrize("method", SPARSIFIED)
def test_random_sparsification_statistics_match_mergekit(method, pico_zoo, mergekit_yaml, tmp_path):
    """One task vector, weight 1: merged - base = tau * mask * (|tau|_1 / |tau*mask|_1), per tensor."""
    theirs, ours = build_both(f"{method}-statistics", mergekit_yaml, tmp_path)
    base = read_folder(pico_zoo / "base")
    tuned = read_folder(pico_zoo / "specialist-gsm8k")
    kept_fractions = {}
    for label, folder in (("mergekit", theirs), ("ours", ours)):
        kept = total = 0
        for name, merged in read_folder(folder).items():
            tau = tuned[name].double() - base[name].double()
            delta = merged - base[name].double()
            mask = delta != 0
            scale = tau.abs().sum() / tau[mask].abs().sum()
            # DARE works in fp32 on the CPU, hence the tolerance
            torch.testing.assert_close(delta[mask], tau[mask] * scale, rtol=1e-6, atol=1e-9)
            # untouched entries (tau == 0, e.g. unused token rows) cannot show whether they were kept
            kept, total = kept + int(mask.sum()), total + int((tau != 0).sum())
        kept_fractions[label] = kept / total
        # 4 binomial standard deviations around the keep probability
        assert abs(kept / total - DENSITY) < 4 * (DENSITY * (1 - DENSITY) / total) ** 0.5, label
    assert abs(kept_fractions["ours"] - kept_fractions["mergekit"]) < 0.01
